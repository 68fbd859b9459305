"""Error bounces and chat-state notifications are counted apart from messages (issue 19.8, docs/reports.md)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from policyplug import Event, load_policy
from policyplug.usage.report import build_tables
from policyplug.usage.store import UsageStore, traffic_kind

POLICY = load_policy(text='policy "n"\nlocal domains ["acme.example"]\ndefault allow\n')
CHAT_STATES = "http://jabber.org/protocol/chatstates"


def count(store: UsageStore, event: Event) -> None:
    store.count(event, POLICY.decide(event), POLICY.activation(event)["direction"])


def test_kinds() -> None:
    at = {"time": "2026-11-24T10:00:00Z"}
    assert traffic_kind(Event.message("a@acme.example", "b@x.example", body="hi", **at)) == "message"
    assert (
        traffic_kind(Event.message("d@x.example", "a@acme.example", type="error", body="hi", **at))
        == "message-error"
    )
    assert (
        traffic_kind(Event.message("a@acme.example", "b@x.example", payload=[CHAT_STATES], **at))
        == "message-chatstate"
    )
    # a chat state beside text is a message someone wrote
    assert (
        traffic_kind(
            Event.message(
                "a@acme.example", "b@x.example", body="hi", payload=["jabber:client", CHAT_STATES], **at
            )
        )
        == "message"
    )
    assert (
        traffic_kind(Event.groupchat("a@acme.example", "room@muc.x.example", payload=[CHAT_STATES], **at))
        == "groupchat-chatstate"
    )
    assert (
        traffic_kind(
            Event.message(
                "sip:a@acme.example", "sip:b@x.example", payload=["application/im-iscomposing+xml"], **at
            )
        )
        == "message-chatstate"
    )
    assert traffic_kind(Event.presence("a@acme.example", "b@x.example", type="error", **at)) == "presence"


def test_bounces_and_chat_states_are_not_a_users_messages(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    store = UsageStore(db)
    at = {"time": "2026-11-24T10:00:00Z"}
    for _ in range(3):
        count(store, Event.message("alice@acme.example", "dave@partner.example", body="hello", **at))
    for _ in range(5):
        count(store, Event.message("alice@acme.example", "dave@partner.example", payload=[CHAT_STATES], **at))
    for _ in range(2):  # the s2s bounce of a failed delivery, "from" the remote user
        count(
            store,
            Event.message("dave@partner.example", "alice@acme.example", type="error", body="hello", **at),
        )
    store.close()
    with sqlite3.connect(db) as conn:
        kinds = dict(conn.execute("SELECT kind, SUM(count) FROM traffic GROUP BY kind").fetchall())
    assert kinds == {"message": 3, "message-chatstate": 5, "message-error": 2}
    users = next(t for t in build_tables(db) if t.title.startswith("Busiest users"))
    assert users.rows == [
        ("alice@acme.example", 3, 3)
    ]  # dave sent nothing; alice's chat states are not messages
