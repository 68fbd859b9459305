"""Warnings for policies that load but would lock an operator's server up (`policyplug check`).

Two pitfalls every new deployment met (docs/prosody.md, "Safe starting points"):

- A policy whose default refuses and whose rules never allow a `login` (or, in Prosody, an `iq`):
  the Prosody module decides every kind by default, so every session is closed at login, and
  roster, discovery and ping IQs are refused; Kamailio refuses every REGISTER.
- A server's own component domains (MUC, HTTP upload, the policy component) left out of
  `local domains`: traffic to them is then "outbound", refused or audited like a stranger's.
  The policy cannot know the server's hosts, so this is found two ways: from the server's
  configuration (`check --prosody-config`), and from the policy itself, when a test or a condition
  names a subdomain of a local domain that is not local.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from .addresses import normalise_domain
from .diagnostics import Diagnostic, Location
from .events import Event
from .limits import MemoryLimiter
from .runtime import Policy

# kinds whose refusal locks users out, and where: (kind, what refusing all of them does)
LOCKOUT_KINDS = (
    ("login", "every login would be refused (Prosody closes every session, Kamailio refuses every REGISTER)"),
    ("iq", "every IQ would be refused in Prosody (roster, service discovery, ping: clients fail to start)"),
)
_QUOTED = re.compile(r"\"([^\"\\]*)\"|'([^'\\]*)'")
_DOMAIN = re.compile(r"^(?:[a-z0-9-]+\.)+[a-z0-9-]+\Z")
# VirtualHost "x" / Component "y" ["module"] at the start of a line of prosody.cfg.lua
_PROSODY_INCLUDE = re.compile(r"""^\s*Include\s*\(?\s*["']([^"']+)["']""")
_PROSODY_HOST = re.compile(r"""^\s*(VirtualHost|Component)\s*\(?\s*["']([^"']+)["']""")


def _warning(location: Location, message: str) -> Diagnostic:
    return Diagnostic(location, message, "warning", None)


# the clients a first login comes from: if every one is refused, so is everyone's first login
_CLIENTS = (
    {"ip": "127.0.0.1", "port": 5222, "secure": True},
    {"ip": "10.0.0.10", "port": 5222, "secure": True},
    {"ip": "192.168.1.10", "port": 5222, "secure": True},
)


def lockout_warnings(policy: Policy) -> list[Diagnostic]:
    """Kinds a local user is refused from every client: a login, and an IQ to the user's own server."""
    model = policy.model
    if model is None or not model.local_domains:
        return []
    domain = sorted(model.local_domains)[0]
    user = f"user@{domain}/policyplug-check"
    found = []
    for kind, consequence in LOCKOUT_KINDS:
        refusals = []
        for client in _CLIENTS:
            event = Event.from_json({"kind": kind, "from": user, "to": domain, "client": client})
            decision = policy.decide(event, limiter=MemoryLimiter())  # the policy's own windows untouched
            if decision.decision in ("allow", "redirect"):
                break
            refusals.append(decision)
        else:
            by = refusals[0].rule
            rule = next((r for r in model.rules if r.node.name == by), None)
            where = rule.node.location if rule is not None else model.default.location
            found.append(
                _warning(
                    where,
                    f"the '{kind}' event of {user} to {domain} is refused "
                    f"({refusals[0].decision} by {by or 'default'}), from every client "
                    f"tried: {consequence}; allow it in a rule (rules/starter-prosody.policy, "
                    "rules/starter-kamailio.policy), or leave the kind out of the "
                    "adapter's kinds",
                )
            )
    return found


def _subdomain_of(domain: str, local: Iterable[str]) -> str | None:
    return next((parent for parent in local if domain.endswith("." + parent)), None)


def _not_local(domain: str, local: frozenset[str]) -> str | None:
    try:
        domain = normalise_domain(domain)
    except Exception:  # not a domain at all: nothing to say
        return None
    if domain in local or not _DOMAIN.match(domain):
        return None
    return _subdomain_of(domain, local)


def subdomain_warnings(policy: Policy) -> list[Diagnostic]:
    """Subdomains of local domains, named in tests or conditions, that are not local themselves."""
    model = policy.model
    if model is None or not model.local_domains:
        return []
    local = model.local_domains
    seen: set[str] = set()
    found = []

    def note(domain: str, parent: str, location: Location) -> None:
        if domain in seen:
            return
        seen.add(domain)
        found.append(
            _warning(
                location,
                f"'{domain}' is a subdomain of the local domain '{parent}' but not in "
                "`local domains`: traffic to it is outbound; if it is one of your "
                "server's components (MUC, upload, the policy component), add it to "
                "`local domains`",
            )
        )

    for test in model.tests:
        event = test.event
        if event is None:
            continue
        for raw, where in (
            (event.sender, event.sender_location),
            (event.recipient, event.recipient_location),
        ):
            domain = raw.split("/", 1)[0].rsplit("@", 1)[-1]
            parent = _not_local(domain, local)
            if parent:
                note(normalise_domain(domain), parent, where or test.location)
    for rule in model.rules:
        for expression in [*rule.node.when, *rule.node.unless]:
            for match in _QUOTED.finditer(expression.text):
                text = match.group(1) if match.group(1) is not None else match.group(2)
                parent = _not_local(text, local)
                if parent:
                    note(normalise_domain(text), parent, expression.location)
    return found


def prosody_hosts(
    config: Path, _depth: int = 0, _seen: set[Path] | None = None
) -> list[tuple[str, Location]]:
    """The VirtualHost and Component names of a Prosody configuration and the files it Includes
    (relative to its folder, as Prosody reads them), with where they are. Each file is read once:
    files that Include each other (or `*.cfg.lua` from inside that folder) would otherwise be read
    again at every level, (files)^8 reads."""
    seen = set() if _seen is None else _seen
    resolved = config.resolve()
    if resolved in seen:
        return []
    seen.add(resolved)
    hosts = []
    for number, line in enumerate(config.read_text(encoding="utf-8").splitlines(), 1):
        match = _PROSODY_HOST.match(line)
        if match:
            hosts.append(
                (match.group(2), Location(str(config), number, match.start(2) + 1, len(match.group(2))))
            )
        elif (included := _PROSODY_INCLUDE.match(line)) and _depth < 8:
            for path in (
                sorted(config.parent.glob(included.group(1)))
                if "*" in included.group(1)
                else [config.parent / included.group(1)]
            ):
                if path.is_file():
                    hosts += prosody_hosts(path, _depth + 1, seen)
    return hosts


def server_host_warnings(policy: Policy, prosody_config: Path) -> list[Diagnostic]:
    """Hosts and components of the Prosody configuration that the policy does not count as local."""
    model = policy.model
    if model is None:
        return []
    try:
        hosts = prosody_hosts(prosody_config)
    except (OSError, UnicodeDecodeError) as exc:  # said, not raised: the policy itself was checked
        return [
            _warning(Location(str(prosody_config), 1, 1), f"cannot read the Prosody configuration: {exc}")
        ]
    found = []
    for host, where in hosts:
        try:
            domain = normalise_domain(host)
        except Exception:
            domain = host.lower()
        if domain not in model.local_domains:
            found.append(
                _warning(
                    where,
                    f"'{host}' is served by this Prosody but is not in the policy's "
                    f"`local domains` ({policy.name}): traffic to it is outbound, refused "
                    "or audited like a stranger's; add it to `local domains`",
                )
            )
    return found


def lint_policy(policy: Policy, prosody_config: Path | None = None) -> list[Diagnostic]:
    """Every operator warning for a loaded policy (printed by `policyplug check`)."""
    found = lockout_warnings(policy) + subdomain_warnings(policy)
    if prosody_config is not None:
        found += server_host_warnings(policy, prosody_config)
    return found
