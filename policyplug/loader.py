"""Files -> a checked policy model: includes, lists, directory, defines, and every load-time check.

Every problem the spec lists (unknown names, unknown lists, duplicate rule names, a `by`
naming no rule, two terminal effects, unreadable files, CEL syntax errors) is found here,
all of them in one run, before any traffic arrives. Nothing is half-loaded: either the
whole model is valid or PolicyError carries every diagnostic.
"""

from __future__ import annotations

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
from .cel.check import CEL_RESERVED_WORDS, EVENT_VARIABLES, TYPE_NAMES, check_expression
from .diagnostics import Diagnostic, DiagnosticSink, Location, did_you_mean
from .parser import parse_text
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


def read_source(path: Path, sink: DiagnosticSink, location: Location | None = None,
                what: str = "policy file") -> str | None:
    """Read a UTF-8 file; any failure becomes a diagnostic naming the file (and the line, for bad bytes)."""
    here = location or Location(str(path), 1, 1)
    if "\x00" in str(path):  # the file system cannot name it (os.stat raises ValueError, not OSError)
        sink.error(here, f"cannot read {what} {str(path)!r}: the path contains a NUL character")
        return None
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            sink.error(here, f"{what} '{path}' is {size} bytes, more than the {MAX_FILE_BYTES} allowed")
            return None
        data = path.read_bytes()
    except OSError as exc:
        sink.error(here, f"cannot read {what} '{path}': {exc.strerror or exc}")
        return None
    return decode_source(data, str(path), sink, what)


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
    def __init__(self) -> None:
        self.sink = DiagnosticSink()
        self.files: list[Path] = []
        # What the revision is made of: each file's role and bytes, in reading order. Not its path:
        # one text must give one revision wherever it is loaded from (a relative or an absolute path,
        # text=, the Kamailio workers' snapshot copy); the paths that matter are inside the texts.
        self.hash_parts: list[tuple[str, bytes]] = []
        self.trees: list[nodes.PolicyFile] = []
        self.parsed: dict[str, lark.Tree] = {}  # CEL text -> parse tree, for repeated conditions

    # -- reading files and includes ------------------------------------------------------------

    def parse_file(self, path: Path | None, text: str | None, display: str, location: Location | None,
                   stack: tuple[Path, ...], base_dir: Path | None = None) -> list[tuple[nodes.Node, Path]]:
        """Parse a file and the files it includes; statements come back in place, each with its directory."""
        if text is None:
            assert path is not None
            text = read_source(path, self.sink, location, "included file" if stack else "policy file")
            if text is None:
                return []
        elif text.startswith("\ufeff"):
            text = text[1:]  # load_policy(text=...) of a file read as text: its byte-order mark, as read_source drops it
        if path is not None:
            self.files.append(path)
        self.hash_parts.append(("policy", text.encode("utf-8")))
        tree = parse_text(text, display, self.sink)
        self.trees.append(tree)
        base = path.parent if path is not None else base_dir
        out: list[tuple[nodes.Node, Path]] = []
        for statement in tree.statements:
            if isinstance(statement, nodes.Include):
                if "\x00" in statement.path:  # resolve() would raise ValueError, not OSError
                    self.sink.error(statement.location,
                                    f"cannot read included file {statement.path!r}: the path contains a NUL character")
                    continue
                target = (base or Path.cwd()) / statement.path if not Path(statement.path).is_absolute() \
                    else Path(statement.path)
                resolved = target.resolve()
                if resolved in stack or (path is not None and resolved == path.resolve()):
                    self.sink.error(statement.location, f"'{statement.path}' includes itself (include cycle)")
                    continue
                if len(stack) >= MAX_INCLUDE_DEPTH:
                    self.sink.error(statement.location, f"includes nest more than {MAX_INCLUDE_DEPTH} deep")
                    continue
                shown = str(target) if base is None else str(Path(display).parent / statement.path)
                included = self.parse_file(target, None, shown, statement.location,
                                           stack + ((path.resolve(),) if path else ()) + (resolved,))
                for node, node_base in included:
                    if isinstance(node, (nodes.PolicyName, nodes.LocalDomains, nodes.Default, nodes.OnErrorDeny)):
                        keyword = {nodes.PolicyName: "policy", nodes.LocalDomains: "local domains",
                                   nodes.Default: "default", nodes.OnErrorDeny: "on error deny"}[type(node)]
                        self.sink.error(node.location, f"'{keyword}' belongs in the main policy file, "
                                                       "not in an included file")
                        continue
                    out.append((node, node_base))
                continue
            out.append((statement, base or Path.cwd()))
        return out

    # -- the whole policy ------------------------------------------------------------------------

    def load(self, path: Path | None, text: str | None, base_dir: Path | None) -> PolicyModel:
        display = str(path) if path is not None else "<text>"
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
                tree, used = check_expression(statement.expression, sink, lists=lists, defines=defines,
                                              later_defines=pending_defines, define_reads=define_reads,
                                              parsed=self.parsed)
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
                    sink.error(statement.location, f"duplicate rule name '{statement.name}' "
                                                   f"(first defined at {first_at.file}:{first_at.line})")
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
            sink.error(Location(display, 1, 1), "the policy is empty (it needs at least 'policy \"NAME\"' and 'default')")
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
            name=policy_name, path=path, base_dir=(path.parent if path else (base_dir or Path.cwd())),
            local_domains=frozenset(local_domains), lists=lists, directory=directory, default=default,
            on_error_deny=on_error_deny, rules=rules, tests=tests, files=self.files,
            revision="sha256:" + digest.hexdigest(), reads=frozenset(reads) & frozenset(EVENT_VARIABLES), trees=self.trees,
            warnings=sorted(sink.warnings, key=lambda d: (d.location.file, d.location.line, d.location.column)),
        )

    # -- pieces ------------------------------------------------------------------------------------

    def _declare_list(self, statement: nodes.ListDecl, base: Path, lists: dict[str, tuple[str, ...]],
                      list_locations: dict[str, Location], defines: dict[str, Any]) -> None:
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
            text = read_source(path, sink, statement.location, "list file")
            if text is None:
                lists[statement.name] = ()
                return
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

    def _read_directory(self, statement: nodes.DirectoryDecl, base: Path, directory: dict[str, dict[str, Any]]) -> None:
        sink = self.sink
        path = base / statement.path
        text = read_source(path, sink, statement.location, "directory file")
        if text is None:
            return
        self.files.append(path)
        self.hash_parts.append(("directory", text.encode("utf-8")))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            sink.error(statement.location, f"directory file '{statement.path}' is not valid JSON: "
                                           f"{exc.msg} at line {exc.lineno} column {exc.colno}")
            return
        if not isinstance(data, dict):
            sink.error(statement.location, f"directory file '{statement.path}' must be a JSON object "
                                           "mapping addresses to attributes")
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

    def _check_rule(self, rule: nodes.Rule, lists: dict[str, Any], defines: dict[str, lark.Tree],
                    pending: dict[str, Any], define_reads: dict[str, set[str]], reads: set[str]) -> CheckedRule:
        sink = self.sink
        checked = CheckedRule(rule)
        if len(rule.effects) > 1:
            second = rule.effects[1]
            sink.error(second.location, f"rule '{rule.name}' has two terminal effects "
                                        f"('{rule.effects[0].kind}' and '{second.kind}'); a rule decides once")
        for obligation in rule.obligations:
            if obligation.kind == "route via" and (not rule.effects or rule.effects[0].kind != "allow"):
                sink.error(obligation.location, "'route via' goes with 'allow' (add 'allow' to the rule)")
        for effect in rule.effects:
            if effect.kind == "redirect" and effect.argument is not None:
                self._check_address(effect.argument, effect.location, "redirect to")
        for obligation in rule.obligations:
            if obligation.kind == "copy to" and obligation.argument is not None:
                self._check_address(obligation.argument, obligation.location, "copy to")
        for expressions, trees in ((rule.when, checked.when), (rule.unless, checked.unless)):
            for expression in expressions:
                tree, used = check_expression(expression, sink, lists=lists, defines=defines,
                                              later_defines=pending, define_reads=define_reads, parsed=self.parsed)
                reads |= used
                trees.append(tree)
        if rule.limit is not None:
            tree, used = check_expression(rule.limit.key, sink, lists=lists, defines=defines,
                                          later_defines=pending, define_reads=define_reads, parsed=self.parsed)
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
        if test.event is not None and test.event.kind in nodes.EVENT_KINDS:  # an unknown kind is reported already
            problem = test_event_problem(test.event, test.repeat)
            if problem is not None:
                self.sink.error(problem[0], f"test '{test.name}': {problem[1]}")
        expect = test.expect
        if expect is None or expect.by is None or expect.by == "default":
            return
        if expect.by not in rule_locations:
            self.sink.error(expect.by_location or expect.location,
                            f"test '{test.name}' expects a decision by '{expect.by}', but no rule has that name"
                            f"{did_you_mean(expect.by, list(rule_locations) + ['default'])}")


def load_model(path: str | Path | None = None, *, text: str | None = None,
               base_dir: str | Path | None = None) -> PolicyModel:
    """Read and check a policy; raises PolicyError with every diagnostic."""
    loader = Loader()
    if path is not None and text is None:
        return loader.load(Path(path), None, None)
    if text is None:
        raise TypeError("load_policy needs a path or text=")
    base = Path(base_dir) if base_dir is not None else (Path(path).parent if path is not None else None)
    if path is not None:
        return loader.load(Path(path), text, None)
    return loader.load(None, text, base)
