"""Users, groups and attributes from an LDAP directory (`serve --directory-ldap CONFIG.toml`).

The operator's TOML file names the server, the bind DN and a password *file* (credentials stay out
of the policy text and the process list), where users and groups are, and which LDAP attribute
becomes which `attrs.KEY` (docs/scaling.md, "Groups and attributes from LDAP"). The whole directory
is read (paged searches) into a snapshot of the same shape as a `directory "FILE"` JSON file:
bare address -> {"groups": [...], "attrs": {...}}. Decisions read the snapshot from memory, as they
read the JSON directory: LDAP is never asked while deciding.

The snapshot is read again every `refresh_interval` seconds and when the policy is reloaded, on a
thread of its own. A refresh that fails (server down, bad credentials, a search that times out)
leaves the last good snapshot in force; the failure is logged and counted (status, metrics).

Groups come from group entries (groupOfNames `member`, groupOfUniqueNames `uniqueMember`, nested
groups followed), from a `memberOf` attribute on the user entries (Active Directory, OpenLDAP's
memberof overlay), or both. A group's name is its `cn` (group_name_attribute).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .addresses import AddressError, parse_address

log = logging.getLogger("policyplug.directory")

Snapshot = dict[str, dict[str, Any]]


class DirectoryConfigError(ValueError):
    pass


@dataclass
class LdapConfig:
    path: Path
    urls: list[str]
    bind_dn: str | None
    password: str | None
    users_base: str
    users_filter: str = "(objectClass=inetOrgPerson)"
    address_attributes: list[str] = field(default_factory=lambda: ["mail"])
    address_domain: str | None = None
    groups_base: str | None = None
    groups_filter: str = "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames)(objectClass=group))"
    group_name_attribute: str = "cn"
    member_attributes: list[str] = field(default_factory=lambda: ["member", "uniqueMember"])
    member_of_attribute: str | None = None
    nested_groups: bool = True
    attributes: dict[str, tuple[str, bool]] = field(
        default_factory=dict
    )  # attrs key -> (LDAP attribute, all values?)
    refresh_interval: float = 300.0
    timeout: float = 10.0
    page_size: int = 1000
    start_tls: bool = False
    ca_file: str | None = None

    @classmethod
    def load(cls, path: str | Path) -> LdapConfig:
        """Read and check the TOML file; errors name the file and the field."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise DirectoryConfigError(f"{path}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise DirectoryConfigError(f"{path}: not valid TOML: {exc}") from None

        def want(
            name: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False
        ) -> Any:
            if name not in raw:
                if required:
                    raise DirectoryConfigError(f"{path}: field '{name}' is missing")
                return default
            value = raw[name]
            if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
                raise DirectoryConfigError(
                    f"{path}: field '{name}' has the wrong type ({type(value).__name__})"
                )
            return value

        def strings(name: str, default: list[str]) -> list[str]:
            value = want(name, (str, list), default)
            value = [value] if isinstance(value, str) else value
            if not value or not all(isinstance(v, str) and v for v in value):
                raise DirectoryConfigError(f"{path}: field '{name}' must be a string or a list of strings")
            return list(value)

        known = {
            "url",
            "bind_dn",
            "password_file",
            "users_base",
            "users_filter",
            "address_attribute",
            "address_domain",
            "groups_base",
            "groups_filter",
            "group_name_attribute",
            "member_attribute",
            "member_of_attribute",
            "nested_groups",
            "attributes",
            "refresh_interval",
            "timeout",
            "page_size",
            "start_tls",
            "ca_file",
        }
        for name in raw:
            if name not in known:
                raise DirectoryConfigError(
                    f"{path}: unknown field '{name}' (known: {', '.join(sorted(known))})"
                )
        if "password" in raw:
            raise DirectoryConfigError(f"{path}: no 'password' field: name a password_file")
        urls = strings("url", [])
        for url in urls:
            if not url.startswith(("ldap://", "ldaps://", "ldapi://")):
                raise DirectoryConfigError(
                    f"{path}: field 'url': '{url}' is not ldap://, ldaps:// or ldapi://"
                )
        password = None
        password_file = want("password_file", str)
        if password_file:
            file = (
                (path.parent / password_file)
                if not Path(password_file).is_absolute()
                else Path(password_file)
            )
            try:
                password = file.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise DirectoryConfigError(
                    f"{path}: field 'password_file': {file}: {exc.strerror or exc}"
                ) from None
        bind_dn = want("bind_dn", str)
        if bind_dn and password is None:
            raise DirectoryConfigError(f"{path}: field 'bind_dn' needs 'password_file'")
        attributes: dict[str, tuple[str, bool]] = {}
        for key, spec in want("attributes", dict, {}).items():
            if isinstance(spec, str) and spec:
                attributes[key] = (spec, False)
            elif isinstance(spec, list) and len(spec) == 1 and isinstance(spec[0], str) and spec[0]:
                attributes[key] = (spec[0], True)
            else:
                raise DirectoryConfigError(
                    f'{path}: attributes.{key} must be "ldapAttribute" (first value) '
                    'or ["ldapAttribute"] (every value, a list)'
                )
            if key == "groups":
                raise DirectoryConfigError(
                    f"{path}: attributes.groups: groups come from group entries or memberOf"
                )
        config = cls(
            path=path,
            urls=urls,
            bind_dn=bind_dn,
            password=password,
            users_base=want("users_base", str, required=True),
            users_filter=want("users_filter", str, cls.users_filter),
            address_attributes=strings("address_attribute", ["mail"]),
            address_domain=want("address_domain", str),
            groups_base=want("groups_base", str),
            groups_filter=want("groups_filter", str, cls.groups_filter),
            group_name_attribute=want("group_name_attribute", str, "cn"),
            member_attributes=strings("member_attribute", ["member", "uniqueMember"]),
            member_of_attribute=want("member_of_attribute", str),
            nested_groups=want("nested_groups", bool, True),
            attributes=attributes,
            refresh_interval=float(want("refresh_interval", (int, float), 300.0)),
            timeout=float(want("timeout", (int, float), 10.0)),
            page_size=int(want("page_size", int, 1000)),
            start_tls=want("start_tls", bool, False),
            ca_file=want("ca_file", str),
        )
        if not config.urls:
            raise DirectoryConfigError(f"{path}: field 'url' is missing")
        if config.refresh_interval <= 0 or config.timeout <= 0 or config.page_size <= 0:
            raise DirectoryConfigError(f"{path}: refresh_interval, timeout and page_size must be positive")
        if not config.groups_base and not config.member_of_attribute:
            log.info("%s: neither groups_base nor member_of_attribute: users get no groups from LDAP", path)
        return config


def _dn_key(dn: str) -> str:
    """One spelling per DN for matching `member` values to entries: case and a space after a
    separator do not matter (attribute types, and the values of the naming attributes that users
    and groups have in the usual schemas, compare case-insensitively)."""
    key = dn.lower()
    return key.replace(", ", ",").replace(" ,", ",") if " " in key else key


def _values(attributes: dict[str, Any], name: str) -> list[str]:
    value = attributes.get(name)
    if value is None:
        for key, candidate in attributes.items():  # attribute names are case-insensitive
            if key.lower() == name.lower():
                value = candidate
                break
    if value is None:
        return []
    values = value if isinstance(value, list | tuple) else [value]
    return [_text(v) for v in values if v is not None]


def _text(value: Any) -> str:
    """One attribute value as text, whatever type the directory (or ldap3's decoding of a schema it
    was not given) made of it: bytes as UTF-8 (bad bytes replaced), anything else as its str()."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


class LdapDirectory:
    """Reads a snapshot from the server(s) the config names (ldap3)."""

    def __init__(self, config: LdapConfig):
        self.config = config

    def _connection(self) -> Any:
        import ssl

        from ldap3 import FIRST, NONE, Connection, Server, ServerPool, Tls  # type: ignore[import-untyped]

        config = self.config
        tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=config.ca_file) if config.ca_file else None
        servers = [Server(url, connect_timeout=config.timeout, get_info=NONE, tls=tls) for url in config.urls]
        pool = ServerPool(servers, FIRST, active=1, exhaust=True) if len(servers) > 1 else servers[0]
        connection = Connection(
            pool,
            user=config.bind_dn,
            password=config.password,
            read_only=True,
            receive_timeout=max(1, math.ceil(config.timeout)),
            raise_exceptions=True,
            auto_bind=False,
            return_empty_attributes=False,
            # ldap3 follows referrals by default, binding with our DN and password to
            # whatever server a referral names: never (a referral is skipped, and said so)
            auto_referrals=False,
            # no schema is read (get_info=NONE): checking names against it only
            # costs time (a third of a 50,000-user read)
            check_names=False,
        )
        connection.open()
        if config.start_tls:
            connection.start_tls()
        connection.bind()
        return connection

    def _search(self, connection: Any, base: str, search_filter: str, attributes: list[str]) -> Any:
        from ldap3 import SUBTREE  # type: ignore[import-untyped]

        yield from connection.extend.standard.paged_search(
            base,
            search_filter,
            SUBTREE,
            attributes=attributes,
            paged_size=self.config.page_size,
            generator=True,
        )
        # ldap3 ends a search cut short by the server's size or time limit quietly: part of a
        # directory must never pass for the whole of it (a user missing from a group is a wall with a gap)
        result = connection.result or {}
        if result.get("result") in (3, 4):  # timeLimitExceeded, sizeLimitExceeded
            raise RuntimeError(
                f"search of '{base}' cut short by the server ({result.get('description')}): "
                "lift the size and time limits for the bind DN (slapd: limits dn.exact=... "
                "size=unlimited time=unlimited; Active Directory pages at MaxPageSize, which "
                "paged searches follow)"
            )

    def load(self) -> tuple[Snapshot, dict[str, int]]:
        """The directory as a snapshot, and what it holds (users, groups)."""
        config = self.config
        connection = self._connection()
        try:
            user_attributes = {*config.address_attributes, *(a for a, _ in config.attributes.values())}
            if config.member_of_attribute:
                user_attributes.add(config.member_of_attribute)
            users: dict[
                str, tuple[list[str], dict[str, Any], list[str]]
            ] = {}  # DN key -> (addresses, attrs, memberOf)
            for entry in self._search(
                connection, config.users_base, config.users_filter, sorted(user_attributes)
            ):
                if entry.get("type") != "searchResEntry":
                    continue
                found = entry["attributes"]
                addresses = []
                for name in config.address_attributes:
                    for raw in _values(found, name):
                        if "@" not in raw and config.address_domain:
                            raw = f"{raw}@{config.address_domain}"
                        raw = raw.removeprefix("xmpp:")
                        try:
                            addresses.append(parse_address(raw).address)
                        except AddressError:
                            continue  # a value that is no address (an unused mail field): not a user here
                if not addresses:
                    continue
                attrs: dict[str, Any] = {}
                for key, (name, every) in config.attributes.items():
                    values = _values(found, name)
                    if every:
                        attrs[key] = values
                    elif values:
                        attrs[key] = values[0]
                member_of = _values(found, config.member_of_attribute) if config.member_of_attribute else []
                users[_dn_key(entry["dn"])] = (list(dict.fromkeys(addresses)), attrs, member_of)

            group_names: dict[str, str] = {}  # group DN key -> name
            members: dict[str, list[str]] = {}  # group DN key -> member DN keys
            if config.groups_base:
                wanted = [config.group_name_attribute, *config.member_attributes]
                for entry in self._search(connection, config.groups_base, config.groups_filter, wanted):
                    if entry.get("type") != "searchResEntry":
                        continue
                    names = _values(entry["attributes"], config.group_name_attribute)
                    if not names:
                        continue
                    key = _dn_key(entry["dn"])
                    group_names[key] = names[0]
                    members[key] = [
                        _dn_key(m)
                        for name in config.member_attributes
                        for m in _values(entry["attributes"], name)
                    ]
        finally:
            connection.unbind()

        groups_of: dict[str, set[str]] = {}  # user DN key -> group names
        for group, member_keys in members.items():
            name = group_names[group]
            for member in self._expand(group, members) if config.nested_groups else member_keys:
                if member in users:
                    groups_of.setdefault(member, set()).add(name)
        snapshot: Snapshot = {}
        for key, (addresses, attrs, member_of) in users.items():
            user_groups = groups_of.get(key, set())
            for group_dn in member_of:
                group_name = group_names.get(_dn_key(group_dn))
                if group_name is None:  # a group outside groups_base: its RDN value (cn=Sales,... -> Sales)
                    group_name = group_dn.split(",", 1)[0].partition("=")[2].strip()
                if group_name:
                    user_groups.add(group_name)
            for address in addresses:
                entry = snapshot.get(address)
                if entry is None:
                    snapshot[address] = {"groups": sorted(user_groups), "attrs": dict(attrs)}
                else:  # two entries with one address: merged, as the JSON directory merges spellings
                    entry["groups"] = sorted(set(entry["groups"]) | user_groups)
                    entry["attrs"].update(attrs)
        return snapshot, {"users": len(users), "groups": len(group_names), "addresses": len(snapshot)}

    @staticmethod
    def _expand(group: str, members: dict[str, list[str]]) -> set[str]:
        """Every member of `group`, through nested groups (cycles are harmless)."""
        seen_groups = {group}
        stack = [group]
        found: set[str] = set()
        while stack:
            for member in members.get(stack.pop(), ()):
                if member in members:
                    if member not in seen_groups:
                        seen_groups.add(member)
                        stack.append(member)
                else:
                    found.add(member)
        return found


class DirectorySource:
    """The last good snapshot, refreshed on an interval and on request, on a thread of its own."""

    def __init__(self, config: LdapConfig, reader: Any = None):
        self.config = config
        self.reader = reader or LdapDirectory(config)
        self.snapshot: Snapshot | None = None
        self.revision = 0  # bumped for every snapshot that differs from the one before
        self.stats: dict[str, Any] = {
            "refreshes": 0,
            "failures": 0,
            "last_error": None,
            "last_success": None,
            "load_seconds": None,
            "users": 0,
            "groups": 0,
            "addresses": 0,
        }
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_change: Any = None
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        """Read the directory now; True when the snapshot changed. A failure keeps the last good one."""
        with self._lock:
            started = time.monotonic()
            try:
                snapshot, counts = self.reader.load()
            except Exception as exc:  # ldap3's exceptions, OSError, anything: the old snapshot stays
                self.stats["failures"] += 1
                self.stats["last_error"] = f"{type(exc).__name__}: {exc}"
                log.error(
                    "directory %s: refresh failed, keeping the snapshot of %s: %s",
                    self.config.path,
                    self.stats["last_success"] or "never",
                    self.stats["last_error"],
                )
                return False
            self.stats["refreshes"] += 1
            self.stats["load_seconds"] = round(time.monotonic() - started, 3)
            self.stats["last_success"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.stats.update(counts)
            changed = snapshot != self.snapshot
            if changed:
                self.snapshot = snapshot
                self.revision += 1
                log.info(
                    "directory %s: %d users, %d groups (%.2f s)",
                    self.config.path,
                    counts["users"],
                    counts["groups"],
                    self.stats["load_seconds"],
                )
            return changed

    def start(self, on_change: Any) -> None:
        """Refresh every refresh_interval seconds (and on wake()); on_change() after a new snapshot."""
        self._on_change = on_change
        self._thread = threading.Thread(target=self._run, name="policyplug-directory", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.refresh_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self.refresh() and self._on_change is not None:
                try:
                    self._on_change()
                except Exception:  # the refresher must outlive any surprise
                    log.exception("directory change callback")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.timeout + 5)

    def apply(self, policy: Any) -> None:
        """Give `policy` the policy's own `directory` entries overlaid with the snapshot (groups united,
        LDAP attributes winning). Called on the thread that decides."""
        base = getattr(policy, "_file_directory", None)
        if base is None:
            base = policy._file_directory = policy.directory
        snapshot = self.snapshot
        if snapshot is None:
            return
        merged: Snapshot = dict(snapshot)
        for address, entry in base.items():
            extra = merged.get(address)
            if extra is None:
                merged[address] = entry
            else:
                merged[address] = {
                    "groups": list(dict.fromkeys([*entry["groups"], *extra["groups"]])),
                    "attrs": {**entry["attrs"], **extra["attrs"]},
                }
        policy.directory = merged
        policy._forget()  # parties and candidate selections were derived from the old directory

    def status(self) -> dict[str, Any]:
        return {"source": "ldap", "config": str(self.config.path), "revision": self.revision, **self.stats}


# -- `policyplug directory export`: the snapshot as a `directory "FILE"` JSON file -------------------


def export(config_path: str | Path, output: str | Path) -> dict[str, int]:
    """Write the directory as JSON in the format of `directory "FILE"` (docs/language.md), replacing
    `output` atomically (a reader sees the old file or the new one, never half of one). Raises
    DirectoryConfigError for a bad config, and anything the read raises, leaving `output` alone."""
    import json
    import os
    import tempfile

    config = LdapConfig.load(config_path)
    snapshot, counts = LdapDirectory(config).load()
    data = {
        address: {"groups": entry["groups"], **{k: v for k, v in entry["attrs"].items() if k != "groups"}}
        for address, entry in sorted(snapshot.items())
    }
    output = Path(output)
    fd, temporary = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(data, file, ensure_ascii=False, indent=1, sort_keys=True)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return counts


def _cmd_export(args: Any) -> int:
    import sys

    try:
        counts = export(args.config, args.output)
    except DirectoryConfigError as exc:
        print(f"policyplug directory export: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the directory could not be read: the old file stays
        print(
            f"policyplug directory export: {args.config}: could not read the directory, {args.output} "
            f"left as it was: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 1
    print(
        f"{args.output}: {counts['addresses']} addresses, {counts['users']} users, {counts['groups']} groups"
    )
    return 0


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("directory", help="directory sources (LDAP, Active Directory)")
    sub = p.add_subparsers(dest="directory_command", required=True)
    e = sub.add_parser(
        "export",
        help='write an LDAP directory as a `directory "FILE"` JSON file '
        "(for deployments without `serve --directory-ldap`, e.g. Kamailio)",
    )
    e.add_argument("config", metavar="CONFIG.toml", help="the LDAP source, as for serve --directory-ldap")
    e.add_argument(
        "output", metavar="OUTPUT.json", help="replaced atomically; left alone when the read fails"
    )
    e.set_defaults(func=_cmd_export)
