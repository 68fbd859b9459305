"""CEL conditions -> z3 formulas over a symbolic event (docs/analysis.md).

A condition has three outcomes, not two: `true`, `false`, or an evaluation error (a rule whose
condition raises does not match, or denies under `on error deny`, docs/semantics.md). A boolean
is therefore a pair of z3 formulas (T, F): "is true", "is false"; "is an error" is neither. `&&`
and `||` absorb errors as CEL does (`false && error` is false).

What the encoder cannot model exactly becomes an *opaque atom* at the nearest boolean position:
a fresh (T, F) pair, shared by every occurrence of the same sub-expression (conditions are
deterministic functions of the event), with the reason recorded. A formula with atoms describes
more events than the engine can produce, never fewer, so "no event can ..." claims stay proven;
claims that some event exists are only made once the engine has decided a witness.

Sub-expressions that read nothing of the event but one party's `groups`/`attrs` (and lists and
constants) are evaluated concretely, by the reference interpreter, for every directory entry and
for an address outside the directory: the directory is known, so `sender.attrs.level >= 2` is
exact, errors (a missing attribute) included.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import celpy.celtypes as ct
import lark
import z3
from celpy.evaluation import CELEvalError

from ..cel.check import EVENT_VARIABLES, TYPE_NAMES
from ..cel.fastparse import PASSTHROUGH, rule_name
from ..cel.functions import EXTRA_FUNCTIONS
from ..cel.reference import _env, to_celpy
from ..nodes import EVENT_KINDS
from .terms import FALSE, TRUE, Unsupported, zstr

PROTOCOLS = ("xmpp", "sip")
DIRECTIONS = ("internal", "outbound", "inbound", "transit")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
TIME_MIN = int((datetime.datetime(1, 1, 1, tzinfo=datetime.UTC) - EPOCH) / datetime.timedelta(microseconds=1))
TIME_MAX = int(
    (datetime.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=datetime.UTC) - EPOCH)
    / datetime.timedelta(microseconds=1)
)
PARTIES = ("sender", "recipient")
STRING_FIELDS = ("address", "user", "domain", "resource")


_ESCAPE = re.compile(r"\\u\{([0-9a-fA-F]+)\}")


def pystr(value: z3.ExprRef) -> str:
    """A z3 string value back to Python."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), value.as_string())


@dataclass
class V:
    """An encoded value. Booleans: `t`/`f` (is true / is false; neither: an error). Scalars
    ('int', 'uint', 'string', 'timestamp'): `term` and `err`. Lists: `alts`, mutually exclusive
    guarded alternatives (guard, element terms) of element type `elem`. 'party', 'client',
    'headers', 'payload': the event's records, resolved by field access."""

    type: str
    t: Any = None
    f: Any = None
    term: Any = None
    err: Any = FALSE
    alts: list[tuple[Any, tuple[Any, ...]]] | None = None
    elem: str | None = None
    name: str | None = None  # the party ("sender"/"recipient") of a 'party'
    values: tuple[str, ...] = ()  # an 'enum' (kind, protocol, direction): `term` indexes these


def as_string(v: V) -> V:
    """An enum as the string it stands for."""
    if v.type != "enum":
        return v
    term: Any = zstr(v.values[-1])
    for i, value in enumerate(v.values[:-1]):
        term = z3.If(v.term == i, zstr(value), term)
    return V("string", term=term, err=v.err)


def _constant_string(v: V) -> str | None:
    if v.type != "string":
        return None
    term = z3.simplify(v.term)
    return pystr(term) if z3.is_string_value(term) else None


def vbool(t: Any, f: Any) -> V:
    return V("bool", t=t, f=f)


@dataclass
class Party:
    address: z3.SeqRef
    user: z3.SeqRef
    domain: z3.SeqRef
    resource: z3.SeqRef


class SymEvent:
    """The free variables of one event, shared by every policy encoded over it (diff)."""

    def __init__(self) -> None:
        self.kind = z3.Int("kind")  # an index into EVENT_KINDS
        self.protocol = z3.Int("protocol")  # an index into PROTOCOLS
        self.body = z3.String("body")
        self.subject = z3.String("subject")
        self.type = z3.String("type")
        self.size = z3.Int("size")
        self.time = z3.Int("time_us")
        self.client_ip = z3.String("client.ip")
        self.client_port = z3.Int("client.port")
        self.client_secure = z3.Bool("client.secure")
        self.parties = {
            p: Party(
                z3.String(f"{p}.address"),
                z3.String(f"{p}.user"),
                z3.String(f"{p}.domain"),
                z3.String(f"{p}.resource"),
            )
            for p in PARTIES
        }
        self.headers: dict[str, tuple[Any, Any]] = {}  # key -> (present, value)
        self.payload: dict[str, Any] = {}  # string -> is in payload
        self.atoms: dict[str, tuple[Any, Any]] = {}
        self.zones: dict[str, Any] = {}
        self.constraints: list[Any] = []
        self._conjunction: tuple[int, Any] | None = None
        # Exclusions (facts such as "no normalised domain equals this literal"), also among
        # `constraints`: thousands in a large policy, and each question rarely needs any, so
        # Session asks without them and adds those a model breaks (policyplug.analysis.analyze).
        self.exclusions: list[Any] = []
        self._core: tuple[int, Any] | None = None
        self._excluded: tuple[int, Any] | None = None
        self.nice: list[Any] = []
        c = self.constraints
        c.append(z3.And(self.kind >= 0, self.kind < len(EVENT_KINDS)))
        c.append(z3.And(self.protocol >= 0, self.protocol < len(PROTOCOLS)))
        c.append(self.size >= 0)
        c.append(z3.And(self.time >= TIME_MIN, self.time <= TIME_MAX))
        for party in self.parties.values():
            # What every normalised address satisfies (policyplug.addresses): a lower-case,
            # non-empty domain without a trailing dot; a user without ASCII capitals; the bare
            # address is user@domain, or the domain alone. A superset of the real forms.
            c.append(z3.Length(party.domain) > 0)
            c.append(z3.Not(z3.SuffixOf(zstr("."), party.domain)))
            c.append(
                z3.If(
                    party.user == zstr(""),
                    party.address == party.domain,
                    party.address == z3.Concat(party.user, zstr("@"), party.domain),
                )
            )
        # Plain values a witness takes where the conditions leave it free (tried first, each dropped
        # when it conflicts): events any reader understands, and that surely normalise as modelled.
        for p, party in self.parties.items():
            self.nice += [
                party.domain == zstr(f"{p}.example"),
                party.user == zstr(p[0]),
                party.resource == zstr(""),
            ]
        printable = z3.Star(z3.Range(" ", "~"))
        self.nice_groups = [
            [
                self.parties["sender"].domain == zstr("sender.example"),
                self.parties["sender"].user == zstr("s"),
                self.parties["sender"].resource == zstr(""),
            ],
            [
                self.parties["recipient"].domain == zstr("recipient.example"),
                self.parties["recipient"].user == zstr("r"),
                self.parties["recipient"].resource == zstr(""),
            ],
            [self.protocol == 0],
            [self.body == zstr("")],
            [z3.InRe(self.body, printable)],
            [self.subject == zstr(""), self.type == zstr("")],
            [self.time == 1_798_761_600_000_000],
            [self.client_ip == zstr("192.0.2.1"), self.client_port == 5222],
            [self.size == 0],
        ]
        for party in self.parties.values():
            self.nice_groups += [
                [party.resource == zstr("")],
                [
                    z3.InRe(
                        party.domain,
                        z3.Star(z3.Union(z3.Range("a", "z"), z3.Range("0", "9"), z3.Re(zstr(".")))),
                    ),
                    z3.InRe(party.user, z3.Star(z3.Range("a", "z"))),
                ],
            ]
        self.shapes = [
            z3.InRe(self.body, printable),
            z3.InRe(self.subject, printable),
            self.time == 1_798_761_600_000_000,
        ]
        self.nice += [
            self.protocol == 0,
            self.body == zstr(""),
            self.subject == zstr(""),
            self.type == zstr(""),
            self.client_ip == zstr("192.0.2.1"),
            self.client_port == 5222,
            self.size == 0,
            self.time == 1_798_761_600_000_000,
        ]  # 2027-01-01T00:00:00Z
        for party in self.parties.values():
            self.shapes += [
                z3.InRe(
                    party.domain, z3.Star(z3.Union(z3.Range("a", "z"), z3.Range("0", "9"), z3.Re(zstr("."))))
                ),
                z3.InRe(party.user, z3.Star(z3.Range("a", "z"))),
                party.resource == zstr(""),
            ]

    def conjunction(self) -> Any:
        """All constraints as one formula (cached while none is added): one assertion per query."""
        if self._conjunction is None or self._conjunction[0] != len(self.constraints):
            self._conjunction = (len(self.constraints), z3.And(self.constraints))
        return self._conjunction[1]

    def exclude(self, constraint: Any) -> None:
        self.constraints.append(constraint)
        self.exclusions.append(constraint)

    def core_conjunction(self) -> Any:
        """The constraints but the exclusions, as one formula."""
        if self._core is None or self._core[0] != len(self.constraints):
            excluded = {c.get_id() for c in self.exclusions}
            self._core = (
                len(self.constraints),
                z3.And([c for c in self.constraints if c.get_id() not in excluded]),
            )
        return self._core[1]

    def violated_exclusions(self, model: z3.ModelRef) -> list[Any]:
        """The exclusions the model breaks (one evaluation when it breaks none)."""
        if not self.exclusions:
            return []
        if self._excluded is None or self._excluded[0] != len(self.exclusions):
            self._excluded = (len(self.exclusions), z3.And(self.exclusions))
        if z3.is_true(model.eval(self._excluded[1], model_completion=True)):
            return []
        return [c for c in self.exclusions if not z3.is_true(model.eval(c, model_completion=True))]

    def zone_offset(self, zone: str, offsets: frozenset[int]) -> Any:
        """The UTC offset (seconds) of `zone` at the event's time: one of the zone's offsets, the
        same wherever the event's local time in that zone is read."""
        if zone not in self.zones:
            offset = self.zones[zone] = z3.Int(f"utcoffset({zone})")
            self.constraints.append(z3.Or([offset == o for o in sorted(offsets)]))
        return self.zones[zone]

    def header(self, key: str) -> tuple[Any, Any]:
        if key not in self.headers:
            present, value = z3.Bool(f"headers[{key!r}]?"), z3.String(f"headers[{key!r}]")
            if key != key.lower():  # the event's header names are lower-cased (events.py)
                self.constraints.append(z3.Not(present))
            self.headers[key] = (present, value)
        return self.headers[key]

    def in_payload(self, item: str) -> Any:
        if item not in self.payload:
            self.payload[item] = z3.Bool(f"payload has {item!r}")
        return self.payload[item]

    def atom(self, key: str) -> tuple[Any, Any]:
        if key not in self.atoms:
            n = len(self.atoms)
            t, f = z3.Bool(f"atom{n}.true"), z3.Bool(f"atom{n}.false")
            self.constraints.append(z3.Not(z3.And(t, f)))
            self.atoms[key] = (t, f)
        return self.atoms[key]


def _children(tree: lark.Tree) -> list[Any]:
    return tree.children


def unwrap(tree: Any) -> Any:
    while isinstance(tree, lark.Tree) and rule_name(tree.data) in PASSTHROUGH and len(tree.children) == 1:
        tree = tree.children[0]
    return tree


def _walk(tree: Any) -> Iterator[lark.Tree]:
    if isinstance(tree, lark.Tree):
        yield tree
        for child in tree.children:
            yield from _walk(child)


def free_reads(tree: Any, lists: frozenset[str], bound: frozenset[str] = frozenset()) -> set[str]:
    """What `tree` reads of the event: 'kind', 'body', 'sender.domain', 'sender' (the whole
    party)... Lists, type names and macro variables read nothing."""
    out: set[str] = set()
    node = unwrap(tree)
    if not isinstance(node, lark.Tree):
        return out
    name = rule_name(node.data)
    if name == "ident":
        ident = str(node.children[0])
        if ident not in bound and ident not in lists and ident not in TYPE_NAMES:
            out.add(ident)
        return out
    if name == "member_dot":
        target = unwrap(node.children[0])
        if isinstance(target, lark.Tree) and rule_name(target.data) == "ident":
            ident = str(target.children[0])
            if ident in PARTIES and ident not in bound:
                out.add(f"{ident}.{node.children[1]}")
                return out
        return free_reads(node.children[0], lists, bound)
    if (
        name == "member_dot_arg"
        and str(node.children[1]) in ("exists", "all", "exists_one", "map", "filter")
        and len(node.children) > 2
    ):
        args = node.children[2].children
        var = unwrap(args[0]) if args else None
        inner = (
            bound | {str(var.children[0])}
            if isinstance(var, lark.Tree) and rule_name(var.data) == "ident"
            else bound
        )
        out |= free_reads(node.children[0], lists, bound)
        for a in args[1:]:
            out |= free_reads(a, lists, inner)
        return out
    for child in node.children:
        if isinstance(child, lark.Tree):
            out |= free_reads(child, lists, bound)
    return out


def tree_key(tree: Any) -> str:
    return repr(tree)


@dataclass
class Context:
    """What one policy adds to the event: local domains, lists, directory; and the per-party
    directory entry variables (an address is entry i of the directory, or in none: -1)."""

    ev: SymEvent
    tag: str
    local_domains: frozenset[str]
    lists: dict[str, tuple[str, ...]]
    directory: dict[str, dict[str, Any]]
    entry: dict[str, Any] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    fingerprint: str = ""
    concrete_cache: dict[tuple[str, str], V] = field(default_factory=dict)
    _direction: Any = None

    def __post_init__(self) -> None:
        self.keys = sorted(self.directory)
        self.fingerprint = repr(
            (
                sorted(self.local_domains),
                sorted(self.lists.items()),
                sorted((k, repr(v)) for k, v in self.directory.items()),
            )
        )
        for p in PARTIES:
            entry = z3.Int(f"{self.tag}{p}.entry")
            self.entry[p] = entry
            address = self.ev.parties[p].address
            self.ev.constraints.append(z3.And(entry >= -1, entry < len(self.keys)))
            for i, key in enumerate(self.keys):
                self.ev.constraints.append((entry == i) == (address == zstr(key)))
            if self.keys:
                self.ev.constraints.append((entry == -1) == z3.And([address != zstr(k) for k in self.keys]))
            else:
                self.ev.constraints.append(entry == -1)

    def local(self, party: str) -> Any:
        domain = self.ev.parties[party].domain
        return z3.Or([domain == zstr(d) for d in sorted(self.local_domains)]) if self.local_domains else FALSE

    def direction(self) -> Any:
        """An index into DIRECTIONS (docs/semantics.md's table)."""
        if self._direction is None:
            s, r = self.local("sender"), self.local("recipient")
            self._direction = z3.Int(f"{self.tag}direction")
            self.ev.constraints.append(self._direction == z3.If(s, z3.If(r, 0, 1), z3.If(r, 2, 3)))
        return self._direction

    def entries(self, party: str) -> list[tuple[Any, dict[str, Any]]]:
        """(guard, party dict as conditions see it) for every directory entry and for none."""
        out = []
        for i, key in enumerate(self.keys):
            data = self.directory[key]
            user, _, domain = key.rpartition("@")
            out.append(
                (
                    self.entry[party] == i,
                    {
                        "address": key,
                        "user": user,
                        "domain": domain,
                        "resource": "",
                        "local": domain in self.local_domains,
                        "groups": data["groups"],
                        "attrs": data["attrs"],
                    },
                )
            )
        out.append(
            (
                self.entry[party] == -1,
                {
                    "address": "",
                    "user": "",
                    "domain": "",
                    "resource": "",
                    "local": False,
                    "groups": [],
                    "attrs": {},
                },
            )
        )
        return out


def _const(value: Any) -> V:
    """A cel-python value -> V."""
    if isinstance(value, CELEvalError):
        return V("error")
    if isinstance(value, ct.BoolType) or isinstance(value, bool):
        return vbool(z3.BoolVal(bool(value)), z3.BoolVal(not value))
    if isinstance(value, ct.UintType):
        return V("uint", term=z3.IntVal(int(value)))
    if isinstance(value, int):
        return V("int", term=z3.IntVal(int(value)))
    if isinstance(value, str):
        return V("string", term=zstr(str(value)))
    if isinstance(value, datetime.datetime):
        micros = (value - EPOCH) // datetime.timedelta(microseconds=1)
        return V("timestamp", term=z3.IntVal(micros))
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return V("list", alts=[(TRUE, tuple(zstr(str(v)) for v in value))], elem="string")
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, (bool, ct.UintType)) for v in value
    ):
        return V("list", alts=[(TRUE, tuple(z3.IntVal(int(v)) for v in value))], elem="int")
    raise Unsupported(f"a constant of type {type(value).__name__}")


def _classify(value: Any) -> tuple[str, Any]:
    """A concrete result -> (kind, python value), kind in bool/int/string/list/error."""
    if isinstance(value, CELEvalError):
        return "error", None
    if isinstance(value, bool | ct.BoolType):
        return "bool", bool(value)
    if isinstance(value, ct.UintType | ct.DoubleType):
        raise Unsupported(f"a {type(value).__name__} from the directory")
    if isinstance(value, int):
        return "int", int(value)
    if isinstance(value, str):
        return "string", str(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "list", tuple(str(v) for v in value)
    raise Unsupported(f"a {type(value).__name__} from the directory")


_RELATIONS = {
    "relation_eq": "==",
    "relation_ne": "!=",
    "relation_lt": "<",
    "relation_le": "<=",
    "relation_gt": ">",
    "relation_ge": ">=",
    "relation_in": "in",
}
TIME_PARTS: dict[str, Callable[[Any], Any]] = {
    "getHours": lambda t: (t / 3_600_000_000) % 24,
    "getMinutes": lambda t: (t / 60_000_000) % 60,
    "getSeconds": lambda t: (t / 1_000_000) % 60,
    "getMilliseconds": lambda t: (t / 1000) % 1000,
    "getDayOfWeek": lambda t: ((t / 86_400_000_000) + 4) % 7,  # 1970-01-01 was a Thursday; Sunday is 0
}


class Encoder:
    """Encodes the conditions of one policy (its Context) over the shared SymEvent."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.ev = ctx.ev
        self.lists = frozenset(ctx.lists)
        self.reasons: list[str] = []  # why atoms were made, for the rule being encoded
        self.programs: dict[str, Any] = {}

    # -- entry points -----------------------------------------------------------------------------

    def condition(self, tree: Any) -> V:
        """A rule's `when`/`unless`: (T, F); a non-bool value is an error (the rule does not match)."""
        v = self.boolean(tree, {})
        return v

    def boolean(self, tree: Any, scope: dict[str, V]) -> V:
        """Encode at a boolean position: what cannot be encoded becomes an atom here."""
        try:
            v = self.encode(tree, scope)
        except Unsupported as exc:
            if scope:  # an atom must not depend on a macro variable: leave it to the macro's caller
                raise
            self.reasons.append(str(exc))
            t, f = self.ev.atom(self.ctx.fingerprint + "\x00" + tree_key(tree))
            return vbool(t, f)
        if v.type == "bool":
            return v
        if v.type == "error":
            return vbool(FALSE, FALSE)
        if scope:
            raise Unsupported(f"a {v.type} where a bool is expected")
        return vbool(FALSE, FALSE)  # a condition that gives a non-bool value is an error (semantics.md)

    # -- the walk ---------------------------------------------------------------------------------

    def encode(self, tree: Any, scope: dict[str, V]) -> V:
        node = unwrap(tree)
        if not isinstance(node, lark.Tree):
            raise Unsupported("an unexpected token")
        reads = free_reads(node, self.lists, frozenset(scope))
        if not reads and not self._uses(node, scope):
            return self.constant(node)
        party = self._party_local(reads)
        if party is not None and not self._uses(node, scope):
            return self.concrete(node, party)
        name = rule_name(node.data)
        method = getattr(self, "e_" + name, None)
        if method is None:
            raise Unsupported(f"'{name}'")
        return method(node, scope)

    def _uses(self, node: lark.Tree, scope: dict[str, V]) -> bool:
        if not scope:
            return False
        for sub in _walk(node):
            if rule_name(sub.data) == "ident" and str(sub.children[0]) in scope:
                return True
        return False

    @staticmethod
    def _party_local(reads: set[str]) -> str | None:
        parties = {r.split(".")[0] for r in reads}
        if len(parties) == 1 and all(r.split(".", 1)[-1] in ("groups", "attrs") and "." in r for r in reads):
            party = parties.pop()
            return party if party in PARTIES else None
        return None

    def _program(self, node: lark.Tree) -> Any:
        key = tree_key(node)
        program = self.programs.get(key)
        if program is None:
            program = self.programs[key] = _env().program(node, functions=EXTRA_FUNCTIONS)
        return program

    def _evaluate(self, node: lark.Tree, activation: dict[str, Any]) -> Any:
        context = {name: to_celpy(tuple(entries)) for name, entries in self.ctx.lists.items()}
        for name, value in activation.items():
            context[name] = to_celpy(value)
        try:
            return self._program(node).evaluate(context)
        except CELEvalError as exc:  # CEL's own error, raised rather than returned: absorbable
            return exc
        except Exception as exc:  # noqa: BLE001 - an error && and || do not absorb
            raise Unsupported(
                f"an evaluation error CEL's && and || do not absorb ({type(exc).__name__})"
            ) from None

    def constant(self, node: lark.Tree) -> V:
        if rule_name(node.data) == "ident":  # cel-python evaluates a name inside its `primary` only
            name = str(node.children[0])
            if name in self.ctx.lists:
                return _const(list(self.ctx.lists[name]))
            raise Unsupported(f"the type name '{name}'")
        value = self._evaluate(node, {})
        if isinstance(value, CELEvalError):
            return V("error")
        return _const(value)

    def concrete(self, node: lark.Tree, party: str) -> V:
        """Evaluate per directory entry (the directory is known)."""
        key = (party, tree_key(node))
        cached = self.ctx.concrete_cache.get(key)
        if cached is not None:
            return cached
        groups: dict[tuple[str, Any], list[Any]] = {}
        for guard, data in self.ctx.entries(party):
            kind, value = _classify(self._evaluate(node, {party: data}))
            groups.setdefault((kind, value), []).append(guard)
        kinds = {k for k, _ in groups} - {"error"}
        err = z3.Or(groups.get(("error", None), [])) if ("error", None) in groups else FALSE
        if len(kinds) > 1:
            raise Unsupported("directory values of several types")
        kind = kinds.pop() if kinds else "bool"
        if kind == "bool":
            out = vbool(
                z3.Or(groups.get(("bool", True), [FALSE])), z3.Or(groups.get(("bool", False), [FALSE]))
            )
        elif kind == "list":
            out = V(
                "list",
                alts=[
                    (z3.Or(guards), tuple(zstr(s) for s in value))
                    for (k, value), guards in groups.items()
                    if k == "list"
                ],
                elem="string",
                err=err,
            )
            if err is not FALSE:
                raise Unsupported("a directory list that may be an error")
        else:
            term: Any = z3.IntVal(0) if kind == "int" else zstr("")
            for (k, value), guards in groups.items():
                if k == kind:
                    term = z3.If(z3.Or(guards), z3.IntVal(value) if kind == "int" else zstr(value), term)
            out = V(kind, term=term, err=err)
        self.ctx.concrete_cache[key] = out
        return out

    # -- logic ------------------------------------------------------------------------------------

    def e_expr(self, node: lark.Tree, scope: dict[str, V]) -> V:
        cond = self.boolean(node.children[0], scope)
        a = self.encode(node.children[1], scope)
        b = self.encode(node.children[2], scope)
        if a.type != b.type or a.values != b.values:
            a, b = as_string(a), as_string(b)
        if a.type == b.type == "bool":
            return vbool(
                z3.Or(z3.And(cond.t, a.t), z3.And(cond.f, b.t)),
                z3.Or(z3.And(cond.t, a.f), z3.And(cond.f, b.f)),
            )
        if a.type == b.type and a.type in ("int", "uint", "string", "timestamp"):
            err = z3.Or(z3.Not(z3.Or(cond.t, cond.f)), z3.And(cond.t, a.err), z3.And(cond.f, b.err))
            return V(a.type, term=z3.If(cond.t, a.term, b.term), err=err)
        raise Unsupported("a conditional of mixed or unsupported types")

    def e_conditionalor(self, node: lark.Tree, scope: dict[str, V]) -> V:
        a = self.boolean(node.children[0], scope)
        b = self.boolean(node.children[1], scope)
        return vbool(z3.Or(a.t, b.t), z3.And(a.f, b.f))

    def e_conditionaland(self, node: lark.Tree, scope: dict[str, V]) -> V:
        a = self.boolean(node.children[0], scope)
        b = self.boolean(node.children[1], scope)
        return vbool(z3.And(a.t, b.t), z3.Or(a.f, b.f))

    def e_unary(self, node: lark.Tree, scope: dict[str, V]) -> V:
        op = rule_name(node.children[0].data)
        if op == "unary_not":
            v = self.boolean(node.children[1], scope)
            return vbool(v.f, v.t)
        if op == "unary_neg":
            v = self.encode(node.children[1], scope)
            if v.type != "int":
                raise Unsupported("negation of a non-int")
            return V("int", term=-v.term, err=z3.Or(v.err, v.term == INT64_MIN))
        raise Unsupported(f"'{op}'")

    # -- operators --------------------------------------------------------------------------------

    def e_relation(self, node: lark.Tree, scope: dict[str, V]) -> V:
        op_node, right = node.children
        op = _RELATIONS[rule_name(op_node.data)]
        a = self.encode(op_node.children[0], scope)
        b = self.encode(right, scope)
        if a.type == "error" or b.type == "error":
            return vbool(FALSE, FALSE)
        if op == "in":
            return self.member_of(a, b)
        if op in ("==", "!=") and (a.type == "enum" or b.type == "enum"):
            if a.type == b.type == "enum" and a.values == b.values:
                value = a.term == b.term
            else:
                enum, other = (a, b) if a.type == "enum" else (b, a)
                text = _constant_string(other)
                if text is None:
                    a, b = as_string(a), as_string(b)
                    value = a.term == b.term
                else:
                    value = enum.term == enum.values.index(text) if text in enum.values else FALSE
            value = value if op == "==" else z3.Not(value)
            return vbool(value, z3.Not(value))
        a, b = as_string(a), as_string(b)
        if a.type != b.type:
            raise Unsupported(f"a comparison of {a.type} with {b.type}")
        err = z3.Or(a.err, b.err)
        if a.type == "bool":
            if op not in ("==", "!="):
                raise Unsupported("an ordering of bools")
            same = z3.Or(z3.And(a.t, b.t), z3.And(a.f, b.f))
            ok = z3.And(z3.Or(a.t, a.f), z3.Or(b.t, b.f))
            value = same if op == "==" else z3.Not(same)
            return vbool(z3.And(ok, value), z3.And(ok, z3.Not(value)))
        if a.type not in ("int", "uint", "string", "timestamp"):
            raise Unsupported(f"a comparison of {a.type}s")
        x, y = a.term, b.term
        if a.type == "string" and op in ("<", "<=", ">", ">="):
            value = {
                "<": z3.StrLT(x, y) if hasattr(z3, "StrLT") else x < y,
                "<=": x <= y,
                ">": y < x,
                ">=": y <= x,
            }[op]
        else:
            value = {"==": x == y, "!=": x != y, "<": x < y, "<=": x <= y, ">": x > y, ">=": x >= y}[op]
        return vbool(z3.And(z3.Not(err), value), z3.And(z3.Not(err), z3.Not(value)))

    def member_of(self, a: V, b: V) -> V:
        if (
            a.type == "enum"
            and b.type == "list"
            and b.elem == "string"
            and all(z3.is_string_value(e) for _g, elems in b.alts or [] for e in elems)
        ):
            parts = []
            for guard, elems in b.alts or []:
                found = {pystr(e) for e in elems}
                parts.append(
                    z3.And(
                        guard, z3.Or([a.term == i for i, v in enumerate(a.values) if v in found] or [FALSE])
                    )
                )
            value = z3.And(z3.Not(b.err), z3.Or(parts))
            return vbool(value, z3.And(z3.Not(b.err), z3.Not(z3.Or(parts))))
        a = as_string(a)
        if b.type == "list":
            if a.type != b.elem:
                raise Unsupported(f"'in' of a {a.type} in a list of {b.elem}")
            value = z3.Or(
                [
                    z3.And(guard, z3.Or([a.term == e for e in elems]) if elems else FALSE)
                    for guard, elems in b.alts or []
                ]
            )
            err = z3.Or(a.err, b.err)
            return vbool(z3.And(z3.Not(err), value), z3.And(z3.Not(err), z3.Not(value)))
        if b.type in ("headers", "payload") and a.type == "string":
            item = z3.simplify(a.term)
            if not z3.is_string_value(item):
                raise Unsupported(f"'in' {b.type} with a computed item")
            present = (
                self.ev.header(pystr(item))[0] if b.type == "headers" else self.ev.in_payload(pystr(item))
            )
            return vbool(z3.And(z3.Not(a.err), present), z3.And(z3.Not(a.err), z3.Not(present)))
        raise Unsupported(f"'in' a {b.type}")

    def e_addition(self, node: lark.Tree, scope: dict[str, V]) -> V:
        op_node, right = node.children
        a = as_string(self.encode(op_node.children[0], scope))
        b = as_string(self.encode(right, scope))
        add = rule_name(op_node.data) == "addition_add"
        if a.type == b.type == "string" and add:
            return V("string", term=z3.Concat(a.term, b.term), err=z3.Or(a.err, b.err))
        if a.type == b.type == "int":
            r = a.term + b.term if add else a.term - b.term
            return V("int", term=r, err=z3.Or(a.err, b.err, r < INT64_MIN, r > INT64_MAX))
        raise Unsupported(f"'{'+' if add else '-'}' on {a.type} and {b.type}")

    def e_multiplication(self, node: lark.Tree, scope: dict[str, V]) -> V:
        op_node, right = node.children
        if rule_name(op_node.data) != "multiplication_mul":
            raise Unsupported("division or modulo")
        a = self.encode(op_node.children[0], scope)
        b = self.encode(right, scope)
        if a.type == b.type == "int":
            r = a.term * b.term
            return V("int", term=r, err=z3.Or(a.err, b.err, r < INT64_MIN, r > INT64_MAX))
        raise Unsupported(f"'*' on {a.type} and {b.type}")

    # -- names and members ------------------------------------------------------------------------

    def e_primary(self, node: lark.Tree, scope: dict[str, V]) -> V:
        raise Unsupported("an unexpected primary expression")

    def e_ident(self, node: lark.Tree, scope: dict[str, V]) -> V:
        name = str(node.children[0])
        ev = self.ev
        if name in scope:
            return scope[name]
        if name == "kind":
            return V("enum", term=ev.kind, values=EVENT_KINDS)
        if name == "protocol":
            return V("enum", term=ev.protocol, values=PROTOCOLS)
        simple = {
            "body": ("string", ev.body),
            "subject": ("string", ev.subject),
            "type": ("string", ev.type),
            "size": ("int", ev.size),
            "time": ("timestamp", ev.time),
        }
        if name in simple:
            t, term = simple[name]
            return V(t, term=term)
        if name == "direction":
            return V("enum", term=self.ctx.direction(), values=DIRECTIONS)
        if name in PARTIES:
            return V("party", name=name)
        if name == "client":
            return V("client")
        if name == "headers":
            return V("headers")
        if name == "payload":
            return V("payload")
        if name in EVENT_VARIABLES:
            raise Unsupported(f"'{name}'")
        raise Unsupported(f"the name '{name}'")

    def e_member_dot(self, node: lark.Tree, scope: dict[str, V]) -> V:
        target = self.encode(node.children[0], scope)
        field_name = str(node.children[1])
        return self.select(target, field_name)

    def select(self, target: V, field_name: str) -> V:
        if target.type == "party":
            party = self.ev.parties[target.name]  # type: ignore[index]
            if field_name in STRING_FIELDS:
                return V("string", term=getattr(party, field_name))
            if field_name == "local":
                local = self.ctx.local(target.name)  # type: ignore[arg-type]
                return vbool(local, z3.Not(local))
            if field_name == "groups":
                return self.concrete_groups(target.name)  # type: ignore[arg-type]
            raise Unsupported(f"'{target.name}.{field_name}' read with other event fields")
        if target.type == "client":
            ev = self.ev
            if field_name == "ip":
                return V("string", term=ev.client_ip)
            if field_name == "port":
                return V("int", term=ev.client_port)
            if field_name == "secure":
                return vbool(ev.client_secure, z3.Not(ev.client_secure))
        if target.type == "headers":
            present, value = self.ev.header(field_name)
            return V("string", term=value, err=z3.Not(present))
        raise Unsupported(f"the field '{field_name}' of a {target.type}")

    def concrete_groups(self, party: str) -> V:
        alts: dict[tuple[str, ...], list[Any]] = {}
        for guard, data in self.ctx.entries(party):
            alts.setdefault(tuple(data["groups"]), []).append(guard)
        return V(
            "list",
            alts=[(z3.Or(guards), tuple(zstr(g) for g in groups)) for groups, guards in alts.items()],
            elem="string",
        )

    def e_member_index(self, node: lark.Tree, scope: dict[str, V]) -> V:
        target = self.encode(node.children[0], scope)
        index = unwrap(node.children[1])
        if (
            target.type == "headers"
            and not free_reads(index, self.lists, frozenset(scope))
            and not self._uses(index, scope)
        ):
            key = self.constant(index)
            if key.type != "string":
                raise Unsupported("a header index that is not a string")
            return self.select(target, pystr(z3.simplify(key.term)))
        raise Unsupported("indexing")

    def e_ident_arg(self, node: lark.Tree, scope: dict[str, V]) -> V:
        name = str(node.children[0])
        args = list(node.children[1].children) if len(node.children) > 1 else []
        if name == "size" and len(args) == 1:
            return self.size_of(self.encode(args[0], scope))
        if name == "has" and len(args) == 1:
            inner = unwrap(args[0])
            if isinstance(inner, lark.Tree) and rule_name(inner.data) == "member_dot":
                target = self.encode(inner.children[0], scope)
                if target.type == "headers":
                    present, _ = self.ev.header(str(inner.children[1]))
                    return vbool(present, z3.Not(present))
                if target.type in ("party", "client"):
                    return vbool(TRUE, FALSE)
        if name in ("startsWith", "endsWith", "contains", "matches") and len(args) == 2:
            return self.method(name, as_string(self.encode(args[0], scope)), args[1:], scope)
        raise Unsupported(f"the function {name}()")

    def size_of(self, v: V) -> V:
        v = as_string(v)
        if v.type == "string":
            return V("int", term=z3.Length(v.term), err=v.err)
        if v.type == "list":
            term: Any = z3.IntVal(0)
            for guard, elems in v.alts or []:
                term = z3.If(guard, z3.IntVal(len(elems)), term)
            return V("int", term=term, err=v.err)
        raise Unsupported(f"size() of a {v.type}")

    def e_member_dot_arg(self, node: lark.Tree, scope: dict[str, V]) -> V:
        name = str(node.children[1])
        args = list(node.children[2].children) if len(node.children) > 2 else []
        if name in ("exists", "all"):
            return self.macro(name, node.children[0], args, scope)
        target = as_string(self.encode(node.children[0], scope))
        if name == "size" and not args:
            return self.size_of(target)
        if name in TIME_PARTS and target.type == "timestamp":
            local = target.term
            if args:
                from .zones import zone_offsets

                zone = _constant_string(as_string(self.encode(args[0], scope)))
                offsets = zone_offsets(zone) if zone is not None else None
                if offsets is None:
                    raise Unsupported(f"{name}() in a time zone")
                if offsets != {0} and zone is not None:
                    # the zone's offset at that instant is one of those it ever used (not modelled
                    # which): a superset of the real local times (policyplug.analysis.zones)
                    offset = self.ev.zone_offset(zone, offsets)
                    local = local + offset * 1_000_000
                    self.reasons.append(
                        f"{name}() in {zone}: modelled over the zone's UTC offsets, not its calendar"
                    )
            return V("int", term=TIME_PARTS[name](local), err=target.err)
        if name in ("startsWith", "endsWith", "contains", "matches"):
            return self.method(name, target, args, scope)
        if name == "lowerAscii" and target.type == "string" and not args:
            raise Unsupported("lowerAscii()")
        raise Unsupported(f"the method {name}()")

    def method(self, name: str, target: V, args: list[Any], scope: dict[str, V]) -> V:
        if target.type == "payload":
            raise Unsupported(f"{name}() of payload")
        if len(args) != 1 or target.type != "string":
            raise Unsupported(f"{name}() of a {target.type}")
        arg = as_string(self.encode(args[0], scope))
        if arg.type != "string":
            raise Unsupported(f"{name}() with a {arg.type} argument")
        if name == "matches":
            from .regex import regex_formula  # the regex theory: only what it decides exactly

            pattern = z3.simplify(arg.term)
            if not z3.is_string_value(pattern):
                raise Unsupported("regular expression computed from the event")
            value, failed, exact = regex_formula(pystr(pattern), target.term)
            if not exact:
                # a free "matches", allowed only inside the bound's language (same text, same answer)
                key = f"matches\x00{pystr(pattern)}\x00{target.term.sexpr()}"
                bound = value
                value = self.ev.atom(key)[0]
                self.ev.constraints.append(z3.Implies(value, bound))
                from .regex import regex_core

                self.ev.nice_groups.insert(
                    0, [z3.Implies(value, z3.InRe(target.term, regex_core(pystr(pattern))))]
                )
                self.reasons.append(
                    f"regular expression {pystr(pattern)!r}: word boundaries modelled by an upper bound"
                )
            err = z3.Or(target.err, arg.err, failed)
            return vbool(z3.And(z3.Not(err), value), z3.And(z3.Not(err), z3.Not(value)))
        elif _constant_string(arg) is not None:
            # as regular-expression membership: z3 decides Boolean combinations of memberships
            # (with `matches`) far better than of str.contains / str.prefixof
            text = zstr(_constant_string(arg))  # type: ignore[arg-type]
            anything = z3.Star(z3.AllChar(z3.ReSort(z3.StringSort())))
            parts = {
                "startsWith": [z3.Re(text), anything],
                "endsWith": [anything, z3.Re(text)],
                "contains": [anything, z3.Re(text), anything],
            }[name]
            value = z3.InRe(target.term, z3.Concat(*parts))
        elif name == "startsWith":
            value = z3.PrefixOf(arg.term, target.term)
        elif name == "endsWith":
            value = z3.SuffixOf(arg.term, target.term)
        else:
            value = z3.Contains(target.term, arg.term)
        err = z3.Or(target.err, arg.err)
        return vbool(z3.And(z3.Not(err), value), z3.And(z3.Not(err), z3.Not(value)))

    def macro(self, name: str, target_node: Any, args: list[Any], scope: dict[str, V]) -> V:
        """`exists`/`all` over a list of known alternatives, unrolled, errors as CEL absorbs them."""
        if len(args) != 2:
            raise Unsupported(f"{name}() with {len(args)} arguments")
        var = unwrap(args[0])
        if not (isinstance(var, lark.Tree) and rule_name(var.data) == "ident"):
            raise Unsupported(f"{name}() without a variable")
        var_name = str(var.children[0])
        target = self.encode(target_node, scope)
        if target.type != "list":
            raise Unsupported(f"{name}() over a {target.type}")
        t_parts, f_parts = [], []
        for guard, elems in target.alts or []:
            results = [
                self.boolean(args[1], {**scope, var_name: V(target.elem or "string", term=e)}) for e in elems
            ]
            if name == "exists":
                t = z3.Or([r.t for r in results]) if results else FALSE
                f = z3.And([r.f for r in results]) if results else TRUE
            else:
                t = z3.And([r.t for r in results]) if results else TRUE
                f = z3.Or([r.f for r in results]) if results else FALSE
            t_parts.append(z3.And(guard, t))
            f_parts.append(z3.And(guard, f))
        ok = z3.Not(target.err)
        return vbool(z3.And(ok, z3.Or(t_parts)), z3.And(ok, z3.Or(f_parts)))

    def e_literal(self, node: lark.Tree, scope: dict[str, V]) -> V:
        return self.constant(node)

    def e_list_lit(self, node: lark.Tree, scope: dict[str, V]) -> V:
        items = [as_string(self.encode(c, scope)) for c in node.children[0].children] if node.children else []
        types = {i.type for i in items}
        if len(types) != 1 or next(iter(types)) not in ("string", "int"):
            raise Unsupported("a list literal of mixed or unsupported types")
        if any(not z3.is_false(z3.simplify(i.err)) for i in items):
            raise Unsupported("a list literal whose items may be errors")
        return V("list", alts=[(TRUE, tuple(i.term for i in items))], elem=items[0].type)

    def e_paren_expr(self, node: lark.Tree, scope: dict[str, V]) -> V:
        return self.encode(node.children[0], scope)
