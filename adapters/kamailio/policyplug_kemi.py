"""policyplug inside Kamailio: a KEMI routing script for app_python3 (Kamailio 5.6).

kamailio.cfg loads it (see adapters/kamailio/kamailio.cfg and docs/kamailio.md):

    loadmodule "app_python3.so"
    modparam("app_python3", "load", "/usr/share/policyplug/kamailio/policyplug_kemi.py")
    cfgengine "python"

Its settings come from a TOML file, $POLICYPLUG_KAMAILIO_CONFIG or
/etc/policyplug/kamailio.toml (every key is described in docs/kamailio.md).

The policy is loaded once, in Kamailio's main process before it forks its workers, so every
worker decides in-process with no extra hop. Each out-of-dialog MESSAGE, SUBSCRIBE (presence),
PUBLISH, NOTIFY, INVITE and REGISTER (and in-dialog MESSAGE and NOTIFY) is decided and the
decision enforced:

    allow     -> relayed statefully (t_relay: retransmissions are absorbed by the transaction,
                 the policy is not asked again); REGISTER -> saved in the location table
    deny      -> 403 with the reason in a Warning header (stateful reply)
    drop      -> no relay, no reply; the transaction absorbs retransmissions for a while
    redirect  -> Request-URI rewritten, then routed as allow
    route via -> next hop ($du) set to the hop
    copy to   -> a MESSAGE to the archive address carrying the original as message/cpim
    disclaimer-> appended to a text/plain MESSAGE body

Any exception answers 500 and is logged with the request's Call-ID; the route always returns
an int, so a worker is never left in a broken state.
"""

from __future__ import annotations

import base64
import gc
import os
import secrets
import shutil
import site
import sys
import time
import tomllib
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import KSR  # provided by app_python3 inside Kamailio

CONFIG_PATH = os.environ.get("POLICYPLUG_KAMAILIO_CONFIG", "/etc/policyplug/kamailio.toml")
HERE = Path(__file__).resolve().parent


def _read_config(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        config = tomllib.load(f)
    # where policyplug is installed, when that is not Kamailio's own Python (a venv, say):
    # addsitedir also reads .pth files (editable installs); the new entries go first, so the
    # versions policyplug was installed with win over older Debian ones in dist-packages
    before = list(sys.path)
    for entry in config.get("python_path", []):
        site.addsitedir(entry)
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return config


CONFIG = _read_config(CONFIG_PATH)

from htable_limiter import HtableLimiter  # noqa: E402  (needs the paths set above)
from sip_event import (  # noqa: E402
    Conflict,
    Unreadable,
    all_headers_parsed,
    body_text,
    client_of,
    event_parts,
    media_type,
    message_sections,
    message_text,
    parse_headers,
    split_message,
    split_text,
)

from policyplug import Event, PolicyError  # noqa: E402
from policyplug.addresses import AddressError, event_address  # noqa: E402
from policyplug.audit.multiprocess_log import RING_BYTES, AuditSpool, SharedAuditLog, SpoolChainer, after_fork  # noqa: E402
from policyplug.host import PolicyHost  # noqa: E402
from policyplug.state import make_limiter  # noqa: E402
from policyplug.usage.backends import open_usage_store  # noqa: E402

COPY_HEADER = "X-Policyplug-Copy"
COPY_MARK = COPY_HEADER.lower()
COPY_MARK_BYTES = COPY_MARK.encode()
DIALOG_FORMING = ("INVITE", "SUBSCRIBE")
# methods read from the request line itself; any other first word is asked of Kamailio ($rm)
METHODS = frozenset(
    (
        "MESSAGE",
        "INVITE",
        "ACK",
        "BYE",
        "CANCEL",
        "OPTIONS",
        "REGISTER",
        "SUBSCRIBE",
        "NOTIFY",
        "PUBLISH",
        "INFO",
        "REFER",
        "PRACK",
        "UPDATE",
    )
)
IN_DIALOG_DECIDED = ("MESSAGE", "NOTIFY")

FOLLOW_INTERVAL = 0.1  # seconds
# what a MESSAGE whose text cannot be extracted with certainty gets (docs/kamailio.md, "The message text")
UNREADABLE_CHOICES = ("refuse", "decide")
# the event field that says so, when this policyplug's events have it
CONTENT_COMPLETE = "content_complete" in getattr(Event, "__slots__", ())
DECISION_CACHE_SIZE = 4096  # per worker
STATE_TABLE = "policyplug_state"  # htable: generation and path of the policy published to workers


def log(level: str, text: str) -> None:
    getattr(KSR, level)(f"policyplug: {text}\n")


def _ksr(path: str) -> Any:
    """KSR.<path>, looked up once: the functions every relayed request calls are found here, not
    through two attribute lookups per call. One of a module Kamailio did not load fails when it is
    called, with the error KSR.<path> gives."""
    try:
        found: Any = KSR
        for name in path.split("."):
            found = getattr(found, name)
        return found
    except AttributeError as exc:
        error = exc

        def missing(*_args: Any) -> Any:
            raise error

        return missing


pv_get = _ksr("pv.get")
process_maxfwd = _ksr("maxfwd.process_maxfwd")
sanity_check_defaults = _ksr("sanity.sanity_check_defaults")
t_precheck_trans = _ksr("tmx.t_precheck_trans")
t_check_trans = _ksr("tm.t_check_trans")
t_relay = _ksr("tm.t_relay")
has_totag = _ksr("siputils.has_totag")
isdsturiset = _ksr("isdsturiset")
setdsturi = _ksr("setdsturi")


def raw_message() -> str | bytes:
    """The request as received: its text when it is ASCII (nearly always: it is used as it is),
    else its bytes. KSR.pv.get decodes text as UTF-8 and raises on anything else, and a body need
    not be UTF-8: such a request is fetched again through base64."""
    try:
        text = pv_get("$mb") or ""
    except UnicodeDecodeError:
        return base64.b64decode(KSR.pv.get("$(mb{s.encode.base64})") or "")
    return text if text.isascii() else text.encode("utf-8", "surrogatepass")


def request_method(raw: str | bytes) -> str:
    """The method: the request line's first word, as Kamailio parsed it (the request got here, so
    it parsed), without asking for $rm; asked for when the text does not start with a known method."""
    if isinstance(raw, str):
        method = raw[: raw.find(" ", 0, 12)]
    else:
        method = raw[: raw.find(b" ", 0, 12)].decode("latin-1")
    return method if method in METHODS else (pv_get("$rm") or "")


def has_copy_mark(raw: str | bytes) -> bool:
    """Might the request carry the copy header (in any case)? Rare: looked at closer only then."""
    return COPY_MARK in raw.lower() if isinstance(raw, str) else COPY_MARK_BYTES in raw.lower()


def request_body(raw: str | bytes) -> str:
    return (
        split_text(raw)[1]
        if isinstance(raw, str)
        else split_message(raw)[1].decode("utf-8", errors="replace")
    )


def parse_sas(sas: str) -> tuple[str, int, str] | None:
    """$sas ("udp:192.0.2.1:5060", "tcp:[::1]:5060") -> (ip, port, transport), None if not that."""
    proto, _, hostport = sas.partition(":")
    host, _, port = hostport.rpartition(":")
    if proto and host and port.isdigit():
        return (host[1:-1] if host.startswith("[") else host), int(port), proto
    return None


# $sas -> the event's `client` (the same dict for every request from one address: nobody changes
# it; Event.to_json copies it). Few distinct sources come by a proxy (its peers, an edge proxy).
_CLIENTS: dict[str, dict[str, Any]] = {}


def client() -> dict[str, Any]:
    """The event's `client` of this request (sip_event.client_of of its source)."""
    sas = pv_get("$sas") or ""
    found = _CLIENTS.get(sas)
    if found is None:
        parsed = parse_sas(sas)
        if parsed is None:  # $sas is not "proto:host:port": the three variables one by one
            return client_of(KSR.pv.get("$si") or "", int(KSR.pv.get("$sp") or 0), KSR.pv.get("$pr") or "udp")
        found = client_of(*parsed)
        if len(sas) <= 64:
            if len(_CLIENTS) >= 1024:
                _CLIENTS.clear()  # many sources: start afresh rather than grow
            _CLIENTS[sas] = found
    return found


def sip_event(
    kind: str,
    sender: Any,
    recipient: Any,
    body: str,
    subject: str,
    method: str,
    size: int,
    payload: list[str],
    headers: dict[str, str],
    client: dict[str, Any],
) -> Event:
    """The event of a request, its time now: every member is already in its final form here (sip_event
    made them), so Event.from_members sets them without Event.__init__'s keyword call and defaults."""
    return Event.from_members(
        kind,
        "sip",
        sender,
        recipient,
        body,
        subject,
        method,
        size,
        payload,
        headers,
        client,
        datetime.now(UTC),
    )


def quoted(text: str) -> str:
    """A SIP quoted-string: no CR/LF, quotes and backslashes escaped, bounded."""
    text = " ".join(str(text).split())[:200]
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sip_uri(address: str) -> str:
    """Policy addresses may be written as user@domain (shared with XMPP policies)."""
    return address if address.startswith(("sip:", "sips:")) else "sip:" + address


class PolicyplugKamailio(PolicyHost):
    """The policy host inside Kamailio (policyplug.host: loading, file times, warnings, recording)
    and the SIP glue around it."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        super().__init__(
            config["policy"],
            # `state = "redis://..."`: windows shared with every node and service using that Redis
            # (docs/scaling.md); otherwise in this Kamailio's shared memory
            limiter=(
                make_limiter(config["state"], config.get("state_failure", "closed"))
                if config.get("state")
                else HtableLimiter(KSR, config.get("limits_htable", "policyplug_limits"))
            ),
            warn=lambda text: log("warn", text),
        )
        self.server_name = config.get("server_name", "policyplug")
        self.routes: dict[str, str] = {k.lower(): v for k, v in config.get("routes", {}).items()}
        self.extra_local = frozenset(d.lower() for d in config.get("local_domains", []))
        self.self_uri = config.get("self_uri")  # where copies are sent to be routed like any request
        self.unreadable_content = config.get("unreadable_content", "refuse")
        if self.unreadable_content not in UNREADABLE_CHOICES:
            raise ValueError(
                f"{CONFIG_PATH}: unreadable_content must be one of {', '.join(UNREADABLE_CHOICES)}, "
                f"not {self.unreadable_content!r}"
            )
        if self.unreadable_content == "decide" and not CONTENT_COMPLETE:
            log(
                "warn",
                'unreadable_content = "decide": this policyplug\'s events have no content_complete field, '
                "so a MESSAGE whose text could not all be read is decided on what could be read, unmarked",
            )
        self.audit_bodies = bool(config.get("audit_bodies", False))
        self.audit_headers = config.get("audit_headers", "call-id")
        if self.audit_headers not in ("call-id", "all"):
            raise ValueError(
                f'{CONFIG_PATH}: audit_headers must be "call-id" or "all", not {self.audit_headers!r}'
            )
        audit_path = config.get("audit_log")
        self.chainer: SpoolChainer | None = None
        self.sealed_log: SharedAuditLog | None = None
        if audit_path:
            level = config.get("audit_level", "denied")
            bodies = bool(config.get("audit_bodies", False))
            node = config.get("node")
            sealer = None
            if config.get("audit_seal_key"):  # the timer process seals (sync_audit); docs/audit.md
                from policyplug.audit.seal import Sealer

                sealer = Sealer.from_options(
                    config["audit_seal_key"],
                    config.get("audit_seal_interval"),
                    config.get("audit_syslog"),
                    hostname=node,
                    syslog_batches=bool(config.get("audit_syslog_batches", False)),
                )
            shared_log = SharedAuditLog(
                audit_path,
                level=level,
                include_bodies=bodies,
                node=node,
                max_bytes=config.get("audit_max_bytes"),
                sealer=sealer,
            )
            self.sealed_log = shared_log if sealer is not None else None
            if config.get("audit_spool", True):
                # workers spool, the timer process chains (policyplug/audit/multiprocess_log/)
                spool = Path(config.get("audit_spool_dir", f"{audit_path}.spool"))
                self.audit = AuditSpool(
                    spool,
                    level=level,
                    include_bodies=bodies,
                    node=node,
                    ring_bytes=int(config.get("audit_ring_bytes", RING_BYTES)),
                )
                self.chainer = SpoolChainer(spool, shared_log)
            else:
                self.audit = shared_log
        # usage counts for `policyplug report` at any audit level (docs/kamailio.md): every worker
        # tallies its own decisions into the store (SQLite or PostgreSQL), opened after the fork
        # (self.usage: see open_usage)
        self.usage_db: str | None = config.get("usage_db")
        self._usage_pid = 0
        self._usage_retry = 0.0
        self._records = self.audit is not None or bool(self.usage_db)  # else record is not called
        self.state_dir = Path(config.get("state_dir", "/var/lib/policyplug/kamailio"))
        # copies this server sends itself carry this token, so they are routed without a decision;
        # nobody outside can forge it, and every worker knows the same one, also after
        # `kamcmd app_python.reload` has run this file again in each of them
        self.copy_token = self._copy_token()
        self.generation = 0
        self._audit_errors = 0
        self._local: frozenset[str] = frozenset()
        self._local_of: Any = None  # the policy self._local was made for
        # derived from the policy in force by _refresh, again whenever it changes (a reload)
        self._derived_of: Any = None
        self._reads_text = self._policy_reads_text = self._all_headers = True
        # decisions of a cacheable policy (runtime.Policy.cacheable: only kind and addresses
        # decide), by (kind, sender, recipient)
        self._decisions: dict[tuple[str, str, str], Any] | None = None
        self._decide: Any = None
        self._domains: dict[str, str] = {}  # Request-URI -> its domain as Kamailio parses it ($rd)
        self._next_follow = 0.0
        self._load_initial()

    def _copy_token(self) -> str:
        path = self.state_dir / "copy-token"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            token = path.read_text().strip()
            if len(token) == 32:
                return token
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC, 0o600)  # damaged: make a new one
        token = secrets.token_hex(16)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        return token

    # -- the policy ---------------------------------------------------------------------------------
    #
    # Reloading is done once, by a timer process (rtimer, every second, kamailio.cfg): it checks the
    # policy files, and only when the new text is valid copies it into a snapshot folder and bumps
    # a generation number in shared memory (htable). Workers compare that number on each request
    # (one htable read) and load the snapshot. So every worker runs the same policy, and an
    # invalid text is never loaded by anyone, whenever each worker happens to look.

    def _load_initial(self) -> None:
        snapshot = self._shared_snapshot()
        if snapshot is not None:  # `kamcmd app_python.reload` runs this file again in a worker
            self.generation, path = snapshot
            # a snapshot keeps the files' relative places under its own folder, which may be above the
            # policy's (files from --allow-path / POLICYPLUG_ALLOW_PATH folders): it was checked when made
            policy = self.load(path, allowed_paths=[self.state_dir])
        else:
            policy = self.load()
        log("info", f"policy {policy.name!r} revision {policy.revision} loaded from {self.policy_path}")
        self.install(policy)  # and its warnings logged

    def _shared_snapshot(self) -> tuple[int, str] | None:
        try:
            generation = KSR.htable.sht_get(STATE_TABLE, "generation")
            path = KSR.htable.sht_get(STATE_TABLE, "snapshot")
        except Exception:  # no htable yet (mod_init of a first start)
            return None
        if isinstance(generation, int) and generation > 0 and isinstance(path, str):
            return generation, path
        return None

    def watch(self) -> None:
        """Timer process: validate a changed policy and publish it to the workers."""
        if not self.changed():
            return
        try:
            policy = self.load()
        except PolicyError as exc:
            self.mark_seen()  # do not retry the same text every second
            KSR.htable.sht_inc(STATE_TABLE, "failed_reloads")
            log("err", f"{self.policy_path} is invalid, keeping revision {self.policy.revision}:\n{exc}")
            return
        self.generation += 1
        path = self._snapshot(policy, self.generation)
        KSR.htable.sht_sets(STATE_TABLE, "snapshot", str(path))
        KSR.htable.sht_seti(STATE_TABLE, "generation", self.generation)
        log(
            "info",
            f"policy {policy.name!r} revision {policy.revision} published to the workers "
            f"(generation {self.generation})",
        )
        self.install(policy)  # and its warnings logged

    def _snapshot(self, policy: Any, generation: int) -> Path:
        """Copy the policy and every file it read, keeping their relative places."""
        files = [self.policy_path.resolve(), *(Path(f).resolve() for f in policy.files)]
        root = Path(os.path.commonpath([str(f.parent) for f in files]))
        target = self.state_dir / f"generation-{generation}"
        for source in files:
            destination = target / source.relative_to(root)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
        for old in self.state_dir.glob("generation-*"):  # keep the last few
            if old.name.split("-")[-1].isdigit() and int(old.name.split("-")[-1]) < generation - 3:
                shutil.rmtree(old, ignore_errors=True)
        return target / self.policy_path.resolve().relative_to(root)

    def _follow(self) -> None:
        """Worker: load the policy the timer process published, if it is newer than ours
        (looked up at most every FOLLOW_INTERVAL: the timer publishes once a second anyway)."""
        now = time.monotonic()
        if now < self._next_follow:
            return
        self._next_follow = now + FOLLOW_INTERVAL
        generation = KSR.htable.sht_get(STATE_TABLE, "generation")
        if not isinstance(generation, int) or generation <= self.generation:
            return
        path = KSR.htable.sht_get(STATE_TABLE, "snapshot")
        try:
            self.policy = self.load(path, allowed_paths=[self.state_dir])  # warnings: logged by the timer
        except (PolicyError, OSError) as exc:  # a snapshot was valid when made: say so loudly
            log("err", f"snapshot {path} did not load, keeping revision {self.policy.revision}: {exc}")
        self.generation = generation

    # -- a request ----------------------------------------------------------------------------------

    def request_route(self) -> int:
        raw = raw_message()
        method = request_method(raw)
        if process_maxfwd(10) < 0:
            KSR.sl.sl_send_reply(483, "Too Many Hops")
            return 1
        if sanity_check_defaults() < 0:
            return 1  # sanity has answered (400 and the like)
        if method == "CANCEL":
            if KSR.tm.t_check_trans() > 0:
                KSR.tm.t_relay()
            return 1
        if method != "ACK":
            if t_precheck_trans() > 0:  # a retransmission another worker is processing
                t_check_trans()
                return 1
            if t_check_trans() == 0:  # a retransmission: tm answered it, no new decision
                return 1
        if has_totag() > 0:
            return self.in_dialog(method, raw)
        if method == "OPTIONS" and KSR.is_myself_ruri() and not KSR.pv.get("$rU"):
            KSR.siputils.options_reply()  # a keepalive to the server itself (monitoring, tests)
            return 1
        if method == "ACK":
            if KSR.tm.t_check_trans() > 0:
                KSR.tm.t_relay()
            return 1
        self._follow()
        return self.decide_and_enforce(method, raw, initial=True)

    def in_dialog(self, method: str, raw: str | bytes) -> int:
        if KSR.rr.loose_route() < 0 and method != "ACK":
            KSR.sl.sl_send_reply(404, "Not here")
            return 1
        if method in IN_DIALOG_DECIDED:
            self._follow()
            return self.decide_and_enforce(method, raw, initial=False)
        if method == "ACK" or KSR.tm.t_relay() < 0:
            if method == "ACK":
                KSR.forward()  # ACK for 2xx: stateless, as RFC 3261 proxies do
            else:
                KSR.sl.sl_reply_error()
        return 1

    def _is_our_copy(self) -> bool:
        value = KSR.hdr.get(COPY_HEADER)
        return (
            value is not None
            and secrets.compare_digest(value.strip(), self.copy_token)
            and bool(KSR.is_myself_srcip())
        )

    def _refresh(self) -> None:
        """What the adapter derives from the policy in force: does anything read a MESSAGE's text
        (the policy's body or subject, or audit_bodies; if not, it is not extracted, and what cannot
        be extracted is a reason to refuse only when the policy reads it), does the event carry
        every header, and how the policy is asked (its decisions cached when it is cacheable).
        Nothing of an older policy is kept."""
        policy = self.policy
        reads = getattr(policy, "reads", None)
        self._policy_reads_text = reads is None or bool({"body", "subject"} & reads)
        self._reads_text = self.audit_bodies or self._policy_reads_text
        self._all_headers = self.audit_headers == "all" or reads is None or "headers" in reads
        if getattr(policy, "cacheable", False):
            self._decisions, self._decide = {}, self._cached_decide
        else:
            self._decisions, self._decide = None, policy.decide
        self._derived_of = policy

    def reads_text(self) -> bool:
        if self._derived_of is not self.policy:
            self._refresh()
        return self._reads_text

    def event_headers(self, headers: dict[str, str]) -> dict[str, str]:
        """The event's `headers`: every header when the policy reads `headers` (or audit_headers =
        "all"), else only the Call-ID, which ties an audit record to Kamailio's logs and traces: the
        rest would be encoded into every record for nobody (about 3 µs a message, docs/kamailio.md)."""
        if self._derived_of is not self.policy:
            self._refresh()
        return headers if self._all_headers else {"call-id": headers.get("call-id", "")}

    def decide(self, event: Event) -> Any:
        """The policy's decision, from this worker's cache when the policy is cacheable."""
        if self._derived_of is not self.policy:
            self._refresh()
        return self._decide(event)

    def _cached_decide(self, event: Event) -> Any:
        decisions = self._decisions
        assert decisions is not None
        key = (event.kind, event.sender.key, event.recipient.key)
        decision = decisions.get(key)
        if decision is None:
            decision = self.policy.decide(event)
            if not decision.errors:
                if len(decisions) >= DECISION_CACHE_SIZE:
                    decisions.clear()  # many distinct pairs: start afresh rather than grow
                decisions[key] = decision
        return decision

    def decide_and_enforce(self, method: str, raw: str | bytes, *, initial: bool) -> int:
        section, body, size = message_sections(raw)
        repeated: dict[str, list[str]] = {}
        headers = parse_headers(section, repeated)
        all_headers = all_headers_parsed(section)
        # the copy header (any case): found among the parsed headers (or, past the first
        # MAX_HEADERS lines, in the text), then looked at closer (each KSR call costs)
        if initial and (COPY_MARK in headers if all_headers else has_copy_mark(raw)):
            ours = self._is_our_copy()
            KSR.hdr.remove(COPY_HEADER)  # the token never leaves; a forged one reaches nobody
            if ours:
                return self.relay(method)
        # the recipient: the Request-URI of an initial request (where it will be routed); inside a
        # dialog the Request-URI is a device's contact, and the To URI names the party
        from_uri, to_uri = pv_get("$fu"), pv_get("$ru" if initial else "$tu")
        if not from_uri:
            return self.reply(400, "Bad Request", "missing or malformed From header")
        if not to_uri:
            return self.reply(400, "Bad Request", "malformed Request-URI")
        if not from_uri.startswith(("sip:", "sips:")) or not to_uri.startswith(("sip:", "sips:")):
            return self.reply(416, "Unsupported URI Scheme", "only sip: and sips: addresses are decided")
        # the event of sip_event.event_json, made directly: its fields have the right types by
        # construction, Event.from_json's checks of untrusted JSON are not needed on this path
        if self._derived_of is not self.policy:
            self._refresh()
        read_text = self._reads_text
        parts = event_parts(
            method, headers, body, size, repeated, all_headers=all_headers, read_text=read_text
        )
        if parts is None:
            return self.relay(method, to_uri) if initial else self.relay_in_dialog()
        kind, text, subject, size, payload, _headers, problem = parts
        if problem is not None and not self._policy_reads_text:
            problem = None  # only the audit record keeps the text: it keeps what could be read
        if problem is not None:
            if isinstance(problem, Conflict):  # the recipient might read it either way
                return self.reply(400, "Bad Request", str(problem))
            if self.unreadable_content == "refuse":
                if problem.args and "Content-Encoding" in str(problem):
                    KSR.hdr.append_to_reply("Accept-Encoding: identity\r\n")
                return self.reply(415, "Unsupported Media Type", f"message text cannot be checked: {problem}")
        try:
            sender, recipient = event_address(from_uri, "sip"), event_address(to_uri, "sip")
        except AddressError as exc:
            return self.reply(400, "Bad Request", str(exc))
        event = sip_event(
            kind,
            sender,
            recipient,
            text,
            subject,
            method,
            size,
            payload,
            headers if self._all_headers else {"call-id": headers.get("call-id", "")},
            client(),
        )
        if CONTENT_COMPLETE:  # set either way: Event.from_members leaves members it does not know unset
            event.content_complete = problem is None  # type: ignore[attr-defined]
        decision = self._decide(event)
        if self.usage_db and self._usage_pid != os.getpid():
            self.open_usage()
        if (
            self._records
            and not self.record(event, decision)
            and self.audit.stats["errors"] != self._audit_errors
        ):
            # a failing disk: said loudly in Kamailio's log (once per failure), decisions go on
            self._audit_errors = self.audit.stats["errors"]
            log(
                "err",
                f"audit record not written ({self._audit_errors} so far): {self.audit.stats['last_error']}",
            )
        verdict = decision.decision
        for address in decision.copy_to:
            self.send_copy(event, address, raw, headers.get("content-type", ""))
        if verdict == "deny":
            return self.reply(403, "Forbidden", decision.reason or "not permitted by policy")
        if verdict == "drop":
            KSR.tm.t_newtran()
            KSR.tm.t_release()  # kept on tm's wait timer: retransmissions are absorbed, not re-decided
            return 1
        if (
            decision.disclaimers
            and method == "MESSAGE"
            and media_type(headers.get("content-type", "")) == "text/plain"
        ):
            KSR.textops.set_body(
                "\n\n".join(
                    [self.plain_text(event, headers, repeated, body, read_text), *decision.disclaimers]
                ),
                "text/plain",
            )
        if verdict == "redirect" and decision.redirect_to:
            KSR.seturi(sip_uri(decision.redirect_to))
            to_uri = None  # the Request-URI is another now: its domain is asked for
        elif decision.route_via:
            KSR.setdsturi(sip_uri(decision.route_via))
        return self.relay(method, to_uri) if initial else self.relay_in_dialog()

    @staticmethod
    def plain_text(
        event: Event,
        headers: dict[str, str],
        repeated: dict[str, list[str]],
        body: str | bytes,
        read_text: bool,
    ) -> str:
        """The text of a text/plain MESSAGE, for a disclaimer to follow (extracted now if it was not)."""
        if read_text:
            return event.body
        try:
            return message_text(headers, repeated, body)[0]
        except (Unreadable, Conflict):
            return body_text(body)

    # -- enforcement helpers ------------------------------------------------------------------------

    def reply(self, code: int, reason_phrase: str, why: str) -> int:
        """A stateful reply carrying why in a Warning header (RFC 3261 20.43, code 399)."""
        KSR.hdr.append_to_reply(f"Warning: 399 {self.server_name} {quoted(why)}\r\n")
        if KSR.tm.t_newtran() < 0 or KSR.tm.t_reply(code, reason_phrase) < 0:
            KSR.sl.sl_send_reply(code, reason_phrase)
        return 1

    def relay(self, method: str, request_uri: str | None = None) -> int:
        """Route an out-of-dialog request on: registrar, location lookup, static routes, DNS.
        `request_uri`: the Request-URI ($ru) when it is known, so its domain can be remembered."""
        if method == "REGISTER":
            if KSR.registrar.save("location", 0) < 0:
                KSR.sl.sl_reply_error()
            return 1
        if method in DIALOG_FORMING:
            KSR.rr.record_route()  # in-dialog NOTIFY and MESSAGE come back here to be decided
        if not isdsturiset():  # a bool in KEMI, unlike the int results of module functions
            domain = self.request_domain(request_uri)
            if domain in self.local_domains() or (domain not in self.routes and KSR.is_myself_ruri()):
                # ours: by the policy's domains, or addressed to this server itself (its IP, an alias)
                code = KSR.registrar.lookup("location")
                if code < 0:
                    KSR.tm.t_newtran()
                    KSR.tm.t_reply(
                        404 if code == -1 else 480, "Not Found" if code == -1 else "Temporarily Unavailable"
                    )
                    return 1
            elif domain in self.routes:
                setdsturi(self.routes[domain])
        if t_relay() < 0:
            KSR.sl.sl_reply_error()
        return 1

    def request_domain(self, request_uri: str | None) -> str:
        """The Request-URI's domain, lower-case: $rd, asked for once per Request-URI text (it is
        what Kamailio parses out of that text; few distinct ones come by)."""
        if request_uri is None:
            return (KSR.pv.get("$rd") or "").lower()
        domain = self._domains.get(request_uri)
        if domain is None:
            domain = (pv_get("$rd") or "").lower()
            if len(request_uri) <= 256:
                if len(self._domains) >= 1024:
                    self._domains.clear()  # many distinct ones: start afresh rather than grow
                self._domains[request_uri] = domain
        return domain

    def relay_in_dialog(self) -> int:
        if KSR.tm.t_relay() < 0:
            KSR.sl.sl_reply_error()
        return 1

    def local_domains(self) -> frozenset[str]:
        """The policy's local domains and the configured ones; made again only when the policy changes."""
        if self._local_of is not self.policy:
            self._local, self._local_of = self.policy.local_domains | self.extra_local, self.policy
        return self._local

    def send_copy(self, event: Event, address: str, raw: str | bytes, content_type: str) -> None:
        """A MESSAGE to the archive carrying the original as message/cpim (RFC 3862), sent
        through this server so it is routed like any request (location lookup, routes)."""
        if not self.self_uri:
            log("err", f"copy to {address} skipped: `self_uri` is not set in the adapter's config")
            return
        content_type = content_type or "text/plain"
        original_body = request_body(raw)
        cpim = (
            f"From: <{event.sender.raw}>\r\nTo: <{event.recipient.raw}>\r\n"
            f"DateTime: {event.time.isoformat()}\r\n\r\n"
            f"Content-Type: {content_type}\r\n\r\n{original_body}"
        )
        archive = sip_uri(address)
        headers = (
            f"From: <sip:policyplug@{self.server_name}>;tag={secrets.token_hex(6)}\r\n"
            f"To: <{archive}>\r\n{COPY_HEADER}: {self.copy_token}\r\n"
            f"X-Policyplug-Original-Call-ID: {KSR.pv.get('$ci') or ''}\r\n"
            f"Content-Type: message/cpim\r\n"
        )
        if KSR.tm.t_uac_send("MESSAGE", archive, self.self_uri, "", headers, cpim) < 0:
            log("err", f"copy to {archive} could not be sent (Call-ID {KSR.pv.get('$ci')})")

    def open_usage(self) -> None:
        """Each worker its own store connection and tally (self.usage, counted into by record). Never
        fails the request: a store that cannot be opened is logged, and tried again 10 s later."""
        self.usage = None  # a store opened before a fork is not this process's
        if time.monotonic() < self._usage_retry:
            return
        try:
            # no background writer: Kamailio runs a worker's Python only while it handles a request
            self.usage = open_usage_store(self.usage_db, background=False)
        except Exception as exc:
            self._usage_retry = time.monotonic() + 10
            from policyplug.usage.postgres_store import safe_url

            log("err", f"usage store {safe_url(self.usage_db)} not opened, decisions not counted: {exc}")
            return
        self._usage_pid = os.getpid()

    def sync_audit(self) -> int:
        """Timer process: chain what the workers spooled (or fsync the directly written log)."""
        if self.chainer is not None:
            self.chainer.run_once()
        elif self.audit is not None:
            self.audit.sync()
        if self.sealed_log is not None:
            self.sealed_log.seal_if_due()
        return 1


class kamailio:  # noqa: N801  (the class name app_python3 looks for)
    def __init__(self) -> None:
        self.adapter = PolicyplugKamailio(CONFIG)

    def child_init(self, rank: int) -> int:
        # Kamailio forks in C, where Python's own at-fork handlers may not run: each process draws
        # its own audit record ids and opens its own spool file
        after_fork()
        return 0

    def ksr_request_route(self, msg: Any) -> int:
        try:
            return self.adapter.request_route()
        except Exception as exc:  # never a silent drop, never a broken worker: 500 and the Call-ID
            call_id = KSR.pv.get("$ci")
            log(
                "err",
                f"internal error on {KSR.pv.get('$rm')} Call-ID {call_id}: {type(exc).__name__}: {exc}\n"
                + traceback.format_exc(limit=6),
            )
            try:
                KSR.hdr.append_to_reply(
                    f'Warning: 399 {self.adapter.server_name} "policyplug internal error"\r\n'
                )
                KSR.sl.sl_send_reply(500, "Server Internal Error")
            except Exception:
                pass
            return 1

    def ksr_onsend_route(self, msg: Any) -> int:
        return 1  # app_python3 calls it for every message sent: nothing to do, allow the send

    def ksr_reply_route(self, msg: Any) -> int:
        return 1  # replies are relayed as they are

    def ksr_policyplug_sync(self, msg: Any, event_name: str | None = None) -> int:
        """rtimer callback (every 100 ms): chain the spooled audit records, fsync the log."""
        try:
            return self.adapter.sync_audit()
        except Exception as exc:
            log("err", f"audit sync failed: {exc}")
            return 1

    def ksr_policyplug_watch(self, msg: Any, event_name: str | None = None) -> int:
        """rtimer callback (every second): reload a changed, valid policy for every worker."""
        try:
            self.adapter.watch()
        except Exception as exc:
            log("err", f"policy watch failed: {type(exc).__name__}: {exc}\n" + traceback.format_exc(limit=6))
        return 1


def mod_init() -> kamailio:
    handler = kamailio()
    # Everything loaded so far (the policy, its compiled code, the libraries) lives as long as
    # Kamailio: keep it out of the garbage collector's scans, and its pages shared by the forked
    # workers instead of copied when a collection touches them.
    gc.collect()
    gc.freeze()
    return handler
