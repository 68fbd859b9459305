"""Property test of mod_policyplug's content reader (docs/semantics.md, "What body and subject
are"), run by lua5.4 with Prosody's own util.stanza and util.xml (tests/prosody_content_harness.lua):
for random messages made of texts in every place a client shows text, mixed with text-free and
unknown payloads, every shown text is in `body` (subjects in `subject`) in document order, and
the content is flagged unreadable exactly when an encrypted payload or a too-deep forward is there.
The real-Prosody tests of the same rules are in tests/integration/test_prosody_content.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "adapters" / "prosody" / "mod_policyplug.lua"
HARNESS = Path(__file__).resolve().parent / "prosody_content_harness.lua"
XHTML = "<html xmlns='http://jabber.org/protocol/xhtml-im'><body xmlns='http://www.w3.org/1999/xhtml'>{}</body></html>"
FORWARD = "<forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client'>{}</message></forwarded>"


class Reader:
    def __init__(self) -> None:
        lua = shutil.which("lua5.4")
        if lua is None or not Path("/usr/lib/prosody/util/stanza.lua").exists():
            pytest.skip("needs lua5.4 and Prosody's libraries")
        self.process = subprocess.Popen(
            [lua, str(HARNESS), str(MODULE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )

    def read(self, inner: str) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"<message xmlns='jabber:client' to='b@acme.example'>{inner}</message>\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())


@pytest.fixture(scope="module")
def reader() -> Iterator[Reader]:
    r = Reader()
    yield r
    assert r.process.stdin is not None
    r.process.stdin.close()
    r.process.wait(timeout=10)


# a text: printable, with XML's special characters and non-ASCII, never containing the markers
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="#"), max_size=12)

# Places a client shows text: name -> (function of an escaped text giving XML, where it lands)
SHOWN = {
    "body": (lambda t: f"<body>{t}</body>", "body"),
    "body-lang": (lambda t: f"<body xml:lang='de'>{t}</body>", "body"),
    "xhtml": (lambda t: XHTML.format(f"<p>{t}</p>"), "body"),
    "xhtml-span": (lambda t: XHTML.format(f"<p><span>{t}</span></p>"), "body"),
    "oob-url": (lambda t: f"<x xmlns='jabber:x:oob'><url>{t}</url></x>", "body"),
    "oob-desc": (lambda t: f"<x xmlns='jabber:x:oob'><desc>{t}</desc></x>", "body"),
    "forwarded": (lambda t: FORWARD.format(f"<body>{t}</body>"), "body"),
    "carbon": (
        lambda t: (
            "<received xmlns='urn:xmpp:carbons:2'>" + FORWARD.format(f"<body>{t}</body>") + "</received>"
        ),
        "body",
    ),
    "nick": (lambda t: f"<nick xmlns='http://jabber.org/protocol/nick'>{t}</nick>", "body"),
    "reaction": (
        lambda t: f"<reactions xmlns='urn:xmpp:reactions:0' id='x'><reaction>{t}</reaction></reactions>",
        "body",
    ),
    "form": (
        lambda t: f"<x xmlns='jabber:x:data' type='form'><field var='v'><value>{t}</value></field></x>",
        "body",
    ),
    "invite": (
        lambda t: (
            "<x xmlns='http://jabber.org/protocol/muc#user'><invite to='c@acme.example'>"
            f"<reason>{t}</reason></invite></x>"
        ),
        "body",
    ),
    "subject": (lambda t: f"<subject>{t}</subject>", "subject"),
    "forwarded-subject": (lambda t: FORWARD.format(f"<subject>{t}</subject>"), "subject"),
}
# Payloads with no text a client shows, and ones nobody but the recipient can read
TEXTLESS = [
    "<active xmlns='http://jabber.org/protocol/chatstates'/>",
    "<request xmlns='urn:xmpp:receipts'/>",
    "<markable xmlns='urn:xmpp:chat-markers:0'/>",
    "<origin-id xmlns='urn:xmpp:sid:0' id='x'/>",
    "<thread>t</thread>",
    "<unknown xmlns='urn:example:x'><deep><deeper/></deep></unknown>",
]
ENCRYPTED = [
    "<encrypted xmlns='eu.siacs.conversations.axolotl'><payload>AAAA</payload></encrypted>",
    "<encrypted xmlns='urn:xmpp:omemo:2'><payload>AAAA</payload></encrypted>",
    "<openpgp xmlns='urn:xmpp:openpgp:0'>AAAA</openpgp>",
    "<x xmlns='jabber:x:encrypted'>AAAA</x>",
]

PART = st.one_of(
    st.tuples(st.just("shown"), st.sampled_from(sorted(SHOWN)), TEXT),
    st.tuples(st.just("textless"), st.sampled_from(TEXTLESS), st.just("")),
    st.tuples(st.just("encrypted"), st.sampled_from(ENCRYPTED), st.just("")),
)


@given(parts=st.lists(PART, max_size=8))
def test_every_shown_text_is_read_in_order(reader: Reader, parts: list[tuple[str, str, str]]) -> None:
    xml, expected = [], {"body": [], "subject": []}
    for i, (what, place, text) in enumerate(parts):
        if what == "shown":
            marked = f"#{i}#{text}"  # a marker per part: found in order, whatever the texts
            build, lands = SHOWN[place]
            xml.append(build(escape(marked)))
            expected[lands].append(marked)
        else:
            xml.append(place)
    answer = reader.read("".join(xml))
    assert "error" not in answer, answer
    for field in ("body", "subject"):
        got = answer[field] or ""
        at = 0
        for marked in expected[field]:
            found = got.find(marked, at)
            assert found >= 0, (field, marked, got, xml)
            at = found + len(marked)
        if not expected[field]:
            assert answer[field] is None or "#" not in answer[field], answer
    assert (answer["unreadable"] is not None) == any(what == "encrypted" for what, _, _ in parts), (
        answer,
        xml,
    )


@given(depth=st.integers(min_value=1, max_value=14), text=TEXT)
def test_forwarded_chains_are_read_to_their_limit(reader: Reader, depth: int, text: str) -> None:
    inner = f"<body>#{escape(text)}</body>"
    for _ in range(depth):
        inner = FORWARD.format(inner)
    answer = reader.read("<body>outer</body>" + inner)
    if depth <= 8:
        assert answer["unreadable"] is None and f"#{text}" in answer["body"], answer
    else:
        assert answer["unreadable"] == "nested deeper than 8", answer


@given(text=TEXT)
def test_attribute_texts_are_read(reader: Reader, text: str) -> None:
    answer = reader.read(
        f"<body>x</body><x xmlns='jabber:x:conference' jid='r@rooms.acme.example' "
        f"reason={quoteattr('#' + text)}/>" + XHTML.format(f"<img src='a' alt={quoteattr('%' + text)}/>")
    )
    assert f"#{text}" in answer["body"] and f"%{text}" in answer["body"], answer
