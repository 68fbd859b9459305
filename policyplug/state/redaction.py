"""URLs as they may be shown: every log line, status and message names a state or usage URL this way."""

from __future__ import annotations

import re

# from after `scheme:` (and its slashes) to the URL's last `@`: user and password, whatever they hold
# (an unescaped `/` or `@` in a password, a URL too broken for urlsplit)
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:/*).*@")


def redact_url(url: str) -> str:
    """The URL with its user and password shown as `***`, for every log line, status and message
    (redis://, redis+sentinel://, postgresql://)."""
    return _USERINFO.sub(r"\1***@", url)
