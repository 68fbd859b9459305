"""Red team of the scaling code (docs/scaling.md): a password in a --state / --usage-db URL never
reaches a message, log line or status, whatever the URL looks like; what a sender controls (an
address, a body: the value of a `limit` key) cannot shape a Redis key."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyplug.state import redact_url
from policyplug.state.redis_limiter import RedisLimiter

SECRET = "s3cret-Pw"
URLS = [
    f"redis:/:{SECRET}@x",  # a typo: one slash
    f"redis://:pa/{SECRET}@127.0.0.1:1/0",  # an unescaped slash in the password
    f"redis://u:{SECRET}@[::1:1/0",  # does not parse
    f"redis+sentinel://:{SECRET}@h1/",
    f"redis+sentinel://:{SECRET}@h1:26379",
    f"postgres://u:{SECRET}@[",  # libpq quotes the URI it cannot parse
    f"postgresql://u:{SECRET}@127.0.0.1:1/db?x=%zz",
    f"postgresql://u:{SECRET}@127.0.0.1:1/db",
    f"postgresql://u:p@{SECRET}@127.0.0.1:1/db",  # an unescaped @ in the password
]


# a Redis URL that parses starts the service (Redis is asked on the first limit): the outage test covers it
@pytest.mark.parametrize("url", [u for u in URLS if not u.startswith("redis://:pa/")])
def test_serve_never_prints_the_password_of_a_bad_url(tmp_path: Path, url: str) -> None:
    policy = tmp_path / "p.policy"
    policy.write_text('policy "p"\ndefault allow\n')
    option = "--usage-db" if url.startswith("postgres") else "--state"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "policyplug",
            "serve",
            str(policy),
            "--socket",
            str(tmp_path / "s.sock"),
            option,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert SECRET not in output, output
    assert "Traceback" not in output, output


@pytest.mark.parametrize(
    "url", [u for u in URLS if u.startswith("redis")] + ["redis://default:" + SECRET + "@h:1"]
)
def test_redact_url_hides_user_and_password(url: str) -> None:
    assert SECRET not in redact_url(url)
    assert redact_url(url).split(":", 1)[0] == url.split(":", 1)[0]  # the scheme stays, to tell what it is


def test_a_redis_outage_logs_and_shows_no_password(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RedisLimiter(f"redis://:{SECRET}@127.0.0.1:1/0", failure="open", timeout=0.2)
    with caplog.at_level(logging.DEBUG):
        assert limiter.hit("r\x00eve@evil.example", 1000.0, 60, 5) is False  # open: the outage lets it pass
    text = caplog.text + repr(limiter.status())
    assert "unreachable" in caplog.text
    assert SECRET not in text, text


@settings(max_examples=200, deadline=None)
@given(value=st.text(max_size=3000))
def test_a_limit_key_of_any_value_is_a_fixed_redis_key(value: str) -> None:
    """`limit per sender.address` keys by what a sender chose: `:`, `*`, `{}` (a Cluster hash tag),
    newlines, lone surrogates, megabytes. The Redis key is the prefix and a hash, nothing of the value."""
    limiter = RedisLimiter.__new__(RedisLimiter)
    limiter.prefix = "policyplug:limit:"
    key = limiter.key_for(f"rule\x00{value}")
    assert re.fullmatch(r"policyplug:limit:[0-9a-f]{32}", key), key
    assert key != limiter.key_for(f"rule\x00{value}x")


def test_ldap_attribute_values_of_unexpected_types_are_text() -> None:
    """A directory (or ldap3 without the schema) may give ints, datetimes, bytes that are not UTF-8,
    None: each becomes text, and one odd value does not fail the whole refresh."""
    import datetime

    from policyplug.directory_ldap import _values

    found = {
        "Level": 3,
        "when": [datetime.datetime(2026, 1, 1), None],
        "raw": b"\xff\xfeok",
        "many": [1, b"x", "y"],
    }
    assert _values(found, "level") == ["3"]
    assert _values(found, "when") == ["2026-01-01 00:00:00"]
    assert _values(found, "raw") == ["\ufffd\ufffdok"]
    assert _values(found, "many") == ["1", "x", "y"]
    assert _values(found, "absent") == []


def test_ldap_connections_never_follow_referrals(tmp_path: Path) -> None:
    """A referral would make ldap3 bind with policyplug's DN and password to the server it names."""
    from policyplug.directory_ldap import LdapConfig, LdapDirectory

    config = tmp_path / "ldap.toml"
    config.write_text('url = "ldap://127.0.0.1:1"\nusers_base = "dc=x"\n')
    directory = LdapDirectory(LdapConfig.load(config))
    import ldap3

    seen = {}
    original = ldap3.Connection.__init__

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs)
        original(self, *args, **kwargs)

    ldap3.Connection.__init__ = spy
    try:
        with pytest.raises(ldap3.core.exceptions.LDAPException):  # nothing listens on port 1
            directory._connection()
    finally:
        ldap3.Connection.__init__ = original
    assert seen.get("auto_referrals") is False, seen
