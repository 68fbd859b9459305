"""Files -> a checked policy model: includes, lists, directory, defines, and every load-time check.

Every load-time problem docs/language.md names (unknown names, unknown lists, duplicate rule names, a `by`
naming no rule, two terminal effects, unreadable files, CEL syntax errors) is found here,
all of them in one run, before any traffic arrives. Nothing is half-loaded: either the
whole model is valid or PolicyError carries every diagnostic.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lark

from . import nodes
from .addresses import AddressError, normalise_domain, normalise_list_entry, parse_address
from .cel.check import EVENT_VARIABLES, TYPE_NAMES, check_expression
from .cel.fastparse import CEL_RESERVED_WORDS
from .diagnostics import Diagnostic, DiagnosticSink, Location, did_you_mean
from .lexer import TOP_LEVEL_KEYWORDS
from .parser import parse_text
from .regular_file import NotRegularFile, TooLarge, open_regular, read_capped
from .testevents import test_event_problem

MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_INCLUDE_DEPTH = 32


def name_problem(name: str) -> str | None:
    """Why NAME cannot name a list or define (a condition would never see it as one), or None."""
    if name in EVENT_VARIABLES:
        return f"'{name}' is a built-in name"
    if name in CEL_RESERVED_WORDS:
        return f"'{name}' is a reserved word of CEL"
    if name in TYPE_NAMES:
        return f"'{name}' is a CEL type name"
    return None


@dataclass
class CheckedRule:
    node: nodes.Rule
    when: list[lark.Tree] = field(default_factory=list)
    unless: list[lark.Tree] = field(default_factory=list)
    limit_key: lark.Tree | None = None


@dataclass
class PolicyModel:
    """Everything a policy says, checked; input of the compiler."""

    name: str
    path: Path | None
    base_dir: Path
    local_domains: frozenset[str]
    lists: dict[str, tuple[str, ...]]
    directory: dict[str, dict[str, Any]]
    default: nodes.Default
    on_error_deny: bool
    rules: list[CheckedRule]
    tests: list[nodes.Test]
    files: list[Path]
    revision: str
    reads: frozenset[str]
    trees: list[nodes.PolicyFile]
    warnings: list[Diagnostic] = field(default_factory=list)


class ReadProblem(Exception):
    """Why a file the policy names was not read (the message names no content of it)."""


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def read_regular(path: Path, roots: Iterable[str] | None = None) -> bytes:
    """The bytes of a regular file, at most MAX_FILE_BYTES, read once through one descriptor.

    regular_file.open_regular refuses a device (/dev/zero), FIFO (without hanging the load) or
    directory, judged by the open descriptor; the size is capped while reading, not by a stat()
    that a growing file or a device's size 0 would pass. With `roots`, the file really opened must
    lie under one of them (followed symlinks included). Raises ReadProblem."""
    try:
        fd = open_regular(path)
    except NotRegularFile as exc:
        raise ReadProblem(str(exc)) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ReadProblem("a symlink loop (too many levels of symbolic links)") from None
        raise ReadProblem(exc.strerror or str(exc)) from None
    except ValueError:  # a NUL in the name
        raise ReadProblem("the path contains a NUL character") from None
    try:
        if roots is not None:
            real = _opened_path(fd, path)
            if not _under(real, roots):
                raise ReadProblem(
                    f"it is outside the policy's folder ({', '.join(roots)}); "
                    "allow its folder with --allow-path DIR (or load_policy(..., allowed_paths=[DIR]), "
                    "or POLICYPLUG_ALLOW_PATH)"
                )
        return read_capped(fd, MAX_FILE_BYTES)
    except TooLarge as exc:
        raise ReadProblem(str(exc)) from None
    except OSError as exc:
        raise ReadProblem(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)


def _opened_path(fd: int, path: Path) -> str:
    """The real path of an open file: its /proc link (no race with a renamed symlink), else realpath."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


def read_source(
    path: Path,
    sink: DiagnosticSink,
    location: Location | None = None,
    what: str = "policy file",
    roots: Iterable[str] | None = None,
) -> str | None:
    """Read a UTF-8 file; any failure becomes a diagnostic naming the file (and the line, for bad bytes)."""
    here = location or Location(str(path), 1, 1)
    try:
        data = read_regular(path, roots)
    except ReadProblem as exc:
        sink.error(here, f"cannot read {what} {_shown(path)}: {exc}")
        return None
    return decode_source(data, str(path), sink, what)


def _real(path: str | Path) -> str:
    """os.path.realpath, for any name (one with a NUL stays as it is: opening it is refused)."""
    return str(path) if "\x00" in str(path) else os.path.realpath(path)


def _shown(path: Path) -> str:
    text = str(path)
    return repr(text) if "\x00" in text else f"'{text}'"


def _not_a_policy(text: str, file: str, own: DiagnosticSink) -> bool:
    """Does the file's first line that is neither blank nor a comment fail to parse, and not even
    start with a statement's keyword? (A policy with a broken first rule still gets its diagnostics.)"""
    first = next(
        (
            (n, line)
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")
        ),
        None,
    )
    if first is None or first[1].split()[0].rstrip(":") in TOP_LEVEL_KEYWORDS:
        return False
    return any(d.location.file == file and d.location.line == first[0] for d in own.diagnostics)


def file_times(paths: Iterable[Path]) -> dict[Path, float]:
    """Modification times of a policy's files (-1 for one that cannot be read): what reloaders
    compare to see that a policy, an include, a list or the directory changed."""
    times: dict[Path, float] = {}
    for path in paths:
        try:
            times[path] = os.stat(path).st_mtime
        except OSError:
            times[path] = -1.0
    return times


def decode_source(data: bytes, file: str, sink: DiagnosticSink, what: str = "policy file") -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        sink.error(Location(file, line, column), f"{what} is not valid UTF-8 (byte 0x{data[exc.start]:02x})")
        return None
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        sink.error(Location(file, line, 1), f"{what} contains a NUL character")
        return None
    return text


class Loader:
    def __init__(self, allowed_paths: Iterable[str | Path] = ()) -> None:
        self.sink = DiagnosticSink()
        self.files: list[Path] = []
        # What the revision is made of: each file's role and bytes, in reading order. Not its path:
        # one text must give one revision wherever it is loaded from (a relative or an absolute path,
        # text=, the Kamailio workers' snapshot copy); the paths that matter are inside the texts.
        self.hash_parts: list[tuple[str, bytes]] = []
        self.trees: list[nodes.PolicyFile] = []
        self.parsed: dict[str, lark.Tree] = {}  # CEL text -> parse tree, for repeated conditions
        # Folders the policy's files must lie in: the main file's own (set by load) and the operator's.
        self.allowed = [os.path.realpath(p) for p in allowed_paths]
        self.roots: list[str] = []
        # Every file is read at most once per load (by its real path): a second include of a file is
        # a no-op and a list file named twice is read once, so a "diamond" of includes stays linear
        # and a broken file is reported once.
        self.included: set[str] = set()
        self.texts: dict[str, str | None] = {}

    def _read_once(
        self, path: Path, location: Location | None, what: str, confined: bool = True
    ) -> tuple[str, str | None]:
        """(real path, text or None): each file read and reported at most once per load."""
        real = _real(path)
        if real not in self.texts:
            self.texts[real] = read_source(path, self.sink, location, what, self.roots if confined else None)
        return real, self.texts[real]

    # -- reading files and includes ------------------------------------------------------------

    def parse_file(
        self,
        path: Path | None,
        text: str | None,
        display: str,
        location: Location | None,
        stack: tuple[str, ...],
        base_dir: Path | None = None,
    ) -> list[tuple[nodes.Node, Path]]:
        """Parse a file and the files it includes; statements come back in place, each with its directory.

        `stack` holds the real paths of the files including this one (the main file first), so its
        length is this file's include depth."""
        sink = self.sink
        if text is None:
            assert path is not None
            # the main file is the operator's choice, wherever it is; what it names is confined
            real, text = self._read_once(
                path, location, "included file" if stack else "policy file", confined=bool(stack)
            )
            self.included.add(real)
            if text is None:
                return []
        else:
            real = _real(path) if path is not None else ""
            if text.startswith("\ufeff"):
                text = text[
                    1:
                ]  # load_policy(text=...) of a file read as text: its byte-order mark, as read_source drops it
        if path is not None:
            self.files.append(path)
        self.hash_parts.append(("policy", text.encode("utf-8")))
        if stack:
            # An included file that does not even start like a policy (the operator allowed a folder
            # holding other files, or a typo named one) is refused at the include, quoting none of it.
            own = DiagnosticSink()
            tree = parse_text(text, display, own)
            if _not_a_policy(text, display, own):
                assert location is not None
                sink.error(
                    location,
                    f"included file {_shown(path or Path(display))} is not a policy file "
                    "(its first statement is not one); its contents are not shown",
                )
                return []
            sink.sources.update(own.sources)
            sink.diagnostics.extend(own.diagnostics)
            sink.warnings.extend(own.warnings)
        else:
            tree = parse_text(text, display, sink)
        self.trees.append(tree)
        base = path.parent if path is not None else base_dir
        here = (*stack, real)
        out: list[tuple[nodes.Node, Path]] = []
        for statement in tree.statements:
            if isinstance(statement, nodes.Include):
                if "\x00" in statement.path:  # the file system cannot name it
                    sink.error(
                        statement.location,
                        f"cannot read included file {statement.path!r}: the path contains a NUL character",
                    )
                    continue
                target = (
                    (base or Path.cwd()) / statement.path
                    if not Path(statement.path).is_absolute()
                    else Path(statement.path)
                )
                resolved = _real(target)
                if resolved in here:
                    sink.error(statement.location, f"'{statement.path}' includes itself (include cycle)")
                    continue
                if resolved in self.included:
                    continue  # read already by an earlier include: its statements are in place there
                if len(here) > MAX_INCLUDE_DEPTH:
                    sink.error(statement.location, f"includes nest more than {MAX_INCLUDE_DEPTH} deep")
                    continue
                shown = str(target) if base is None else str(Path(display).parent / statement.path)
                included = self.parse_file(target, None, shown, statement.location, here)
                for node, node_base in included:
                    if isinstance(
                        node, (nodes.PolicyName, nodes.LocalDomains, nodes.Default, nodes.OnErrorDeny)
                    ):
                        keyword = {
                            nodes.PolicyName: "policy",
                            nodes.LocalDomains: "local domains",
                            nodes.Default: "default",
                            nodes.OnErrorDeny: "on error deny",
                        }[type(node)]
                        sink.error(
                            node.location,
                            f"'{keyword}' belongs in the main policy file, not in an included file",
                        )
                        continue
                    out.append((node, node_base))
                continue
            out.append((statement, base or Path.cwd()))
        return out

    # -- the whole policy ------------------------------------------------------------------------

    def load(self, path: Path | None, text: str | None, base_dir: Path | None) -> PolicyModel:
        display = str(path) if path is not None else "<text>"
        home = path.parent if path is not None else (base_dir or Path.cwd())
        # the folder the main file is named in, and (when that name is a symlink, such as a
        # `current.policy` pointing at a release) the folder it really lies in
        self.roots = [os.path.realpath(home), *self.allowed]
        if path is not None and "\x00" not in str(path):
            self.roots.append(os.path.dirname(os.path.realpath(path)))
        # Relative list/directory/include paths of text policies resolve against base_dir.
        statements = self.parse_file(path, text, display, None, (), base_dir)
        sink = self.sink
        if not self.trees:
            sink.raise_if_failed()  # the file itself could not be read: nothing more to say
        policy_name: str | None = None
        local_domains: set[str] = set()
        lists: dict[str, tuple[str, ...]] = {}
        list_locations: dict[str, Location] = {}
        directory: dict[str, dict[str, Any]] = {}
        defines: dict[str, lark.Tree] = {}
        define_reads: dict[str, set[str]] = {}
        default: nodes.Default | None = None
        on_error_deny = False
        rules: list[CheckedRule] = []
        rule_locations: dict[str, Location] = {}
        tests: list[nodes.Test] = []
        test_locations: dict[str, Location] = {}
        reads: set[str] = set()
        pending_defines = {s.name: s for s, _ in statements if isinstance(s, nodes.Define)}

        first = next((s for s, _ in statements if not isinstance(s, nodes.Comment)), None)
        if first is not None and not isinstance(first, nodes.PolicyName):
            sink.error(first.location, "a policy file must start with 'policy \"NAME\"'")

        for statement, base in statements:
            if isinstance(statement, nodes.PolicyName):
                if policy_name is not None:
                    sink.error(statement.location, "a second 'policy' statement")
                policy_name = statement.name
            elif isinstance(statement, nodes.LocalDomains):
                for domain in statement.domains:
                    try:
                        local_domains.add(normalise_domain(domain))
                    except AddressError as exc:
                        sink.error(statement.location, f"local domain '{domain}': {exc}")
            elif isinstance(statement, nodes.ListDecl):
                self._declare_list(statement, base, lists, list_locations, defines)
            elif isinstance(statement, nodes.DirectoryDecl):
                self._read_directory(statement, base, directory)
            elif isinstance(statement, nodes.Define):
                name = statement.name
                loc = statement.name_location or statement.location
                if (problem := name_problem(name)) is not None:
                    sink.error(loc, f"{problem} and cannot name a define")
                elif name in defines or name in lists:
                    sink.error(loc, f"'{name}' is already defined")
                pending_defines.pop(name, None)
                tree, used = check_expression(
                    statement.expression,
                    sink,
                    lists=lists,
                    defines=defines,
                    later_defines=pending_defines,
                    define_reads=define_reads,
                    parsed=self.parsed,
                )
                if tree is not None:
                    defines[name] = tree
                    define_reads[name] = used
                else:
                    # keep later uses from cascading into "unknown name" errors
                    defines.setdefault(name, lark.Tree("literal", [lark.Token("BOOL_LIT", "false")]))
                    define_reads[name] = used
            elif isinstance(statement, nodes.Default):
                if default is not None:
                    sink.error(statement.location, "a second 'default' statement")
                default = statement
            elif isinstance(statement, nodes.OnErrorDeny):
                on_error_deny = True
            elif isinstance(statement, nodes.Rule):
                if statement.name in rule_locations:
                    first_at = rule_locations[statement.name]
                    sink.error(
                        statement.location,
                        f"duplicate rule name '{statement.name}' "
                        f"(first defined at {first_at.file}:{first_at.line})",
                    )
                else:
                    rule_locations[statement.name] = statement.location
                if statement.name == "default":
                    sink.error(statement.location, "'default' is reserved and cannot name a rule")
                checked = self._check_rule(statement, lists, defines, pending_defines, define_reads, reads)
                rules.append(checked)
            elif isinstance(statement, nodes.Test):
                if statement.name in test_locations:
                    sink.error(statement.location, f"duplicate test name '{statement.name}'")
                test_locations[statement.name] = statement.location
                tests.append(statement)

        if default is None:
            where = Location(display, 1, 1)
            sink.error(where, "the policy has no 'default' statement (add 'default deny' or 'default allow')")
        if policy_name is None and first is None:
            sink.error(
                Location(display, 1, 1),
                "the policy is empty (it needs at least 'policy \"NAME\"' and 'default')",
            )
        elif policy_name is None:
            policy_name = ""

        for test in tests:
            self._check_test(test, rule_locations)

        sink.raise_if_failed()
        assert default is not None and policy_name is not None
        digest = hashlib.sha256()
        for role, data in self.hash_parts:
            digest.update(role.encode("utf-8") + b"\0" + len(data).to_bytes(8, "big") + data)
        return PolicyModel(
            name=policy_name,
            path=path,
            base_dir=(path.parent if path else (base_dir or Path.cwd())),
            local_domains=frozenset(local_domains),
            lists=lists,
            directory=directory,
            default=default,
            on_error_deny=on_error_deny,
            rules=rules,
            tests=tests,
            files=self.files,
            revision="sha256:" + digest.hexdigest(),
            reads=frozenset(reads) & frozenset(EVENT_VARIABLES),
            trees=self.trees,
            warnings=sorted(
                sink.warnings, key=lambda d: (d.location.file, d.location.line, d.location.column)
            ),
        )

    # -- pieces ------------------------------------------------------------------------------------

    def _declare_list(
        self,
        statement: nodes.ListDecl,
        base: Path,
        lists: dict[str, tuple[str, ...]],
        list_locations: dict[str, Location],
        defines: dict[str, Any],
    ) -> None:
        sink = self.sink
        loc = statement.name_location or statement.location
        if (problem := name_problem(statement.name)) is not None:
            sink.error(loc, f"{problem} and cannot name a list")
            return
        if statement.name in lists or statement.name in defines:
            sink.error(loc, f"'{statement.name}' is already defined")
            return
        entries: list[str] = []
        if statement.path is not None:
            path = base / statement.path
            real = _real(path)
            first_read = real not in self.texts
            _, text = self._read_once(path, statement.location, "list file")
            if text is None:
                lists[statement.name] = ()
                return
            if first_read:
                self.files.append(path)
            self.hash_parts.append(("list", text.encode("utf-8")))
            for raw in text.splitlines():
                entry = raw.split("#", 1)[0].strip()
                if entry:
                    entries.append(entry)
        else:
            entries = list(statement.items or [])
        lists[statement.name] = tuple(dict.fromkeys(normalise_list_entry(e) for e in entries))
        list_locations[statement.name] = loc

    def _read_directory(
        self, statement: nodes.DirectoryDecl, base: Path, directory: dict[str, dict[str, Any]]
    ) -> None:
        sink = self.sink
        path = base / statement.path
        first_read = _real(path) not in self.texts
        _, text = self._read_once(path, statement.location, "directory file")
        if text is None:
            return
        if first_read:
            self.files.append(path)
        self.hash_parts.append(("directory", text.encode("utf-8")))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            sink.error(
                statement.location,
                f"directory file '{statement.path}' is not valid JSON: "
                f"{exc.msg} at line {exc.lineno} column {exc.colno}",
            )
            return
        if not isinstance(data, dict):
            sink.error(
                statement.location,
                f"directory file '{statement.path}' must be a JSON object mapping addresses to attributes",
            )
            return
        for raw_address, attributes in data.items():
            where = f"directory file '{statement.path}', entry '{raw_address}'"
            if not isinstance(attributes, dict):
                sink.error(statement.location, f"{where}: attributes must be a JSON object")
                continue
            groups = attributes.get("groups", [])
            if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
                sink.error(statement.location, f"{where}: 'groups' must be a list of strings")
                continue
            try:
                address = parse_address(raw_address).address
            except AddressError as exc:
                sink.error(statement.location, f"{where}: {exc}")
                continue
            attrs = {k: v for k, v in attributes.items() if k != "groups"}
            existing = directory.get(address)
            if existing is not None:
                # two spellings of one address: merge, groups united
                existing["groups"] = list(dict.fromkeys(existing["groups"] + groups))
                existing["attrs"].update(attrs)
            else:
                directory[address] = {"groups": list(groups), "attrs": attrs}

    def _check_rule(
        self,
        rule: nodes.Rule,
        lists: dict[str, Any],
        defines: dict[str, lark.Tree],
        pending: dict[str, Any],
        define_reads: dict[str, set[str]],
        reads: set[str],
    ) -> CheckedRule:
        sink = self.sink
        checked = CheckedRule(rule)
        if len(rule.effects) > 1:
            second = rule.effects[1]
            sink.error(
                second.location,
                f"rule '{rule.name}' has two terminal effects "
                f"('{rule.effects[0].kind}' and '{second.kind}'); a rule decides once",
            )
        for obligation in rule.obligations:
            if obligation.kind == "route via" and (not rule.effects or rule.effects[0].kind != "allow"):
                sink.error(obligation.location, "'route via' goes with 'allow' (add 'allow' to the rule)")
        for effect in rule.effects:
            if effect.kind == "redirect" and effect.argument is not None:
                self._check_address(effect.argument, effect.location, "redirect to")
        for obligation in rule.obligations:
            if obligation.kind == "copy to" and obligation.argument is not None:
                self._check_address(obligation.argument, obligation.location, "copy to")

        def check(expression: nodes.Expression) -> tuple[lark.Tree | None, set[str]]:
            return check_expression(
                expression,
                sink,
                lists=lists,
                defines=defines,
                later_defines=pending,
                define_reads=define_reads,
                parsed=self.parsed,
            )

        for expressions, trees in ((rule.when, checked.when), (rule.unless, checked.unless)):
            for expression in expressions:
                tree, used = check(expression)
                reads |= used
                if tree is not None:  # None: the sink holds the error, and the load fails with it
                    trees.append(tree)
        if rule.limit is not None:
            tree, used = check(rule.limit.key)
            reads |= used
            checked.limit_key = tree
        if rule.kinds is not None:
            reads.add("kind")
        return checked

    def _check_address(self, text: str, location: Location, what: str) -> None:
        try:
            parse_address(text)
        except AddressError as exc:
            self.sink.error(location, f"'{what}' address '{text}' is not valid: {exc}")

    def _check_test(self, test: nodes.Test, rule_locations: dict[str, Location]) -> None:
        if (
            test.event is not None and test.event.kind in nodes.EVENT_KINDS
        ):  # an unknown kind is reported already
            problem = test_event_problem(test.event, test.repeat)
            if problem is not None:
                self.sink.error(problem[0], f"test '{test.name}': {problem[1]}")
        expect = test.expect
        if expect is None or expect.by is None or expect.by == "default":
            return
        if expect.by not in rule_locations:
            self.sink.error(
                expect.by_location or expect.location,
                f"test '{test.name}' expects a decision by '{expect.by}', but no rule has that name"
                f"{did_you_mean(expect.by, list(rule_locations) + ['default'])}",
            )


def allowed_from_environment() -> list[str]:
    """POLICYPLUG_ALLOW_PATH: more folders a policy's files may lie in (os.pathsep-separated)."""
    return [p for p in os.environ.get("POLICYPLUG_ALLOW_PATH", "").split(os.pathsep) if p]


def load_model(
    path: str | Path | None = None,
    *,
    text: str | None = None,
    base_dir: str | Path | None = None,
    allowed_paths: Iterable[str | Path] = (),
) -> PolicyModel:
    """Read and check a policy; raises PolicyError with every diagnostic.

    Includes, list files and the directory must lie in the policy's folder (the main file's, or
    base_dir for text=), or in one of `allowed_paths` or POLICYPLUG_ALLOW_PATH's folders."""
    loader = Loader([*allowed_paths, *allowed_from_environment()])
    if path is not None and text is None:
        return loader.load(Path(path), None, None)
    if text is None:
        raise TypeError("load_policy needs a path or text=")
    base = Path(base_dir) if base_dir is not None else (Path(path).parent if path is not None else None)
    if path is not None:
        return loader.load(Path(path), text, None)
    return loader.load(None, text, base)
