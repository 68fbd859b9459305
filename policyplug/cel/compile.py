"""CEL syntax tree (cel-python's lark parse tree) -> Python source, compiled once.

compile_expression: one expression -> a function of the activation (a dict of plain Python
values) returning the CEL value. compile_rules: every rule of a policy -> one module with a
function per rule that runs all its conditions on the Event and its parties (no activation dict).
Where the static type of an operand is known (the event schema gives most of them:
`direction` is a string, `sender.groups` a list of strings, `time` a timestamp) the compiler
emits plain Python (`act["direction"] == "outbound"`, `x in frozenset(...)`); everywhere else it
calls helpers in policyplug.cel.functions that apply cel-python's own operators, so both evaluators
agree on every value and on every error-versus-value outcome (see docs/compiler.md).

Sub-expressions without variables are evaluated once at compile time by cel-python itself
(constant folding), which also settles literal syntax, `timestamp("...")`, constant regexes...
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import celpy.celtypes as ct
import lark
import re2
from celpy.celparser import tree_dump
from celpy.evaluation import CELEvalError, Evaluator

from ..schema import VARIABLES
from . import functions
from .check import SIMPLE_STRING, TYPE_NAMES
from .errors import CelEvaluationError
from .fastparse import PASSTHROUGH, RULE_NAMES, rule_name
from .reference import _env, interpret

Type = Any  # 'bool', 'int', ..., 'dyn', ('list', T), ('map', K, V), ('rec', ((field, T), ...))

STRINGS = ("string", "rawstring")
DOUBLES = ("double", "rawdouble")
# the static type of each variable a condition can see
EVENT_SCHEMA: dict[str, Type] = VARIABLES
MACROS = ("exists", "all", "exists_one", "map", "filter")
UNSUPPORTED_MACROS = ("reduce", "min")  # cel-python extensions
FOLDABLE = frozenset(
    (
        "expr",
        "conditionalor",
        "conditionaland",
        "relation",
        "addition",
        "multiplication",
        "unary",
        "member",
        "primary",
        "member_dot",
        "member_dot_arg",
        "member_index",
        "literal",
    )
)
RESULT_TYPES = {
    "int": "int",
    "uint": "uint",
    "double": "double",
    "string": "string",
    "bool": "bool",
    "bytes": "bytes",
    "timestamp": "timestamp",
    "duration": "duration",
    "size": "int",
    "matches": "bool",
    "contains": "bool",
    "startsWith": "bool",
    "endsWith": "bool",
    "lowerAscii": "string",
    "upperAscii": "string",
}
TIME_METHODS = {
    "getHours": "{}.hour",
    "getMinutes": "{}.minute",
    "getSeconds": "{}.second",
    "getMilliseconds": "({}.microsecond // 1000)",
    "getFullYear": "{}.year",
    "getMonth": "({}.month - 1)",
    "getDate": "{}.day",
    "getDayOfMonth": "({}.day - 1)",
    "getDayOfWeek": "({}.isoweekday() % 7)",
    "getDayOfYear": "_day_of_year({})",
}
REL_OPS = {
    "relation_lt": ("_<_", "<"),
    "relation_le": ("_<=_", "<="),
    "relation_gt": ("_>_", ">"),
    "relation_ge": ("_>=_", ">="),
    "relation_eq": ("_==_", "=="),
    "relation_ne": ("_!=_", "!="),
    "relation_in": ("_in_", "in"),
}
# Nodes whose own errors cel-python creates with `tree=node` (see runtime.Err.bad_repr).
NOT_CONSTANT = frozenset(("ident", "dot_ident", "dot_ident_arg", "member_object"))
TREE_ERROR_NODES = frozenset(
    ("relation", "addition", "multiplication", "unary", "member_dot", "member_index", "map_lit")
)
ORDERED_SAME = (("int",), ("uint",), STRINGS, DOUBLES, ("timestamp",), ("bool",))
EQ_SAME = ORDERED_SAME + (("null",),)


_name = RULE_NAMES.get  # _name(data, data): a tree's rule name as a plain str (see fastparse.RULE_NAMES)


class Unsupported(Exception):  # noqa: N818
    """A construct the compiler leaves to the reference interpreter."""


@dataclass
class CompiledExpression:
    evaluate: Callable[[Mapping[str, Any]], Any]  # raises CelEvaluationError on CEL errors
    fallback: bool  # True when this expression is run by the reference interpreter
    fallback_reason: str | None
    python_source: str | None  # generated source, for debugging/--explain-compile


@dataclass
class PyExpr:
    """The Python expression text generated for one CEL sub-expression, with what the generator
    knows about it: its static type, how it can fail, whether it is a constant."""

    code: str
    type: Type = "dyn"
    err: bool = True  # evaluating it may raise functions.Err (an absorbable CEL error)
    fatal: bool = False  # ... may raise Raised / PyErr / Defer (never absorbed)
    atomic: bool = False  # a name or literal: evaluating it twice costs nothing and cannot fail
    value: Any = None  # the value, for constants
    const: bool = False
    holds_err: bool = False  # code may evaluate to a functions.Err instance (a captured error)


def _same(a: Type, b: Type, groups: tuple[tuple[str, ...], ...]) -> bool:
    return any(a in g and b in g for g in groups)


def _type_of_value(value: Any) -> Type:
    t = type(value)
    simple = {
        bool: "bool",
        functions.Uint: "uint",
        int: "int",
        functions.RawFloat: "rawdouble",
        float: "double",
        functions.RawStr: "rawstring",
        str: "string",
        bytes: "bytes",
        type(None): "null",
        ct.TimestampType: "timestamp",
        ct.DurationType: "duration",
    }
    if t in simple:
        return simple[t]
    if t is list:
        return ("list", _common(_type_of_value(v) for v in value))
    if t is dict:
        return (
            "map",
            _common(_type_of_value(k) for k in value),
            _common(_type_of_value(v) for v in value.values()),
        )
    return "dyn"


def _common(types: Any) -> Type:
    found = set(types)
    return found.pop() if len(found) == 1 else "dyn"


def _field_type(rec: Type, name: str) -> Type | None:
    for field, ftype in rec[1]:
        if field == name:
            return ftype
    return None


_SIMPLE_INT = re.compile(r"0|[1-9][0-9]{0,17}")  # below 2**63: no range check needed


def _simple_literal(token: Any) -> Any:
    """The value of a plain literal token, as folding it with cel-python gives it (None: fold it so)."""
    kind = token.type
    text = str(token)
    if kind == "STRING_LIT" and SIMPLE_STRING.fullmatch(text):  # no escapes, prefixes or triple quotes
        return text[1:-1]
    if kind == "INT_LIT" and _SIMPLE_INT.fullmatch(text):
        return int(text)
    if kind == "BOOL_LIT" and text in ("true", "false"):
        return text == "true"
    return None


def has_empty_literal(tree: Any) -> bool:
    """Does the expression contain `[]` or `{}` (the only trees cel-python's tree_dump() can fail on)?"""
    stack = [tree]
    while stack:
        node = stack.pop()
        children = node.children
        if not children and _name(node.data, node.data) in ("list_lit", "map_lit"):
            return True
        for child in children:
            if isinstance(child, lark.Tree):
                stack.append(child)
    return False


def _unwrap(node: lark.Tree) -> lark.Tree:
    while (
        rule_name(node.data) in PASSTHROUGH
        and len(node.children) == 1
        and isinstance(node.children[0], lark.Tree)
    ):
        node = node.children[0]
    return node


# How generated code reads the event's variables. Single expressions (compile_expression) take the
# activation dict; the matchers of a whole policy (compile_rules) take the Event itself plus the
# parts a policy derives from it: sender and recipient (dicts) and direction. The values are the
# same objects either way (Policy.activation builds the dict from exactly these).
ACT_ACCESS = {name: f"_act[{name!r}]" for name in EVENT_SCHEMA}
EVENT_ACCESS = {name: f"_ev.{name}" for name in EVENT_SCHEMA} | {
    "sender": "_s",
    "recipient": "_r",
    "direction": "_d",
}
MATCHER_ARGS = "_ev, _s, _r, _d"


FOLD_HEIGHT = 64  # the tallest constant subtree folded at once (see CodeGenerator.fold)
# rules' matchers compiled by one compile() call (see compile_rules): each call holds the interpreter,
# 0.65 ms of CPU for 16 of the soak's rules (up to 1.4), 0.16 ms for 4, for the same load time
RULES_PER_COMPILE = 4


class CodeGenerator:
    """Generates the Python source of CEL parse trees: one `c_NODE` method per kind of parse node,
    each returning the PyExpr of its node after emitting any statements it needs."""

    def __init__(self, constants: Mapping[str, Any], access: Mapping[str, str] = ACT_ACCESS):
        self.access = access
        self.constants = {name: list(entries) for name, entries in constants.items()}
        self.lines: list[tuple[int, str]] = []
        self.level = 0
        self.counter = itertools.count(1)
        self.globals: dict[str, Any] = {}
        self.const_ids: dict[int, bool] = {}
        self.const_depth: dict[int, int] = {}  # height of each constant subtree (see fold)
        self.dump_memo: dict[int, bool] = {}
        self.force_atomic = 0
        self._folder_activation: Any = None
        self.maybe_bad = True  # may tree_dump() fail somewhere in the expression? (see dump_fails)

    # ------------------------------------------------------------ emission helpers

    def tmp(self, prefix: str = "_t") -> str:
        return f"{prefix}{next(self.counter)}"

    def emit(self, text: str, extra: int = 0) -> None:
        self.lines.append((self.level + extra, text))

    @contextmanager
    def sub(self) -> Iterator[list[tuple[int, str]]]:
        saved_lines, saved_level = self.lines, self.level
        self.lines, self.level = [], 0
        try:
            yield self.lines
        finally:
            self.lines, self.level = saved_lines, saved_level

    def splice(self, buf: list[tuple[int, str]], extra: int = 0) -> None:
        for level, text in buf:
            self.lines.append((self.level + extra + level, text))

    def bind_global(self, value: Any, prefix: str = "_k") -> str:
        """A new name for `value` in the generated module's namespace."""
        name = self.tmp(prefix)
        self.globals[name] = value
        return name

    def literal(self, value: Any) -> PyExpr:
        t = type(value)
        if (
            t in (bool, int, str)
            or value is None
            or (t is float and value == value and abs(value) != float("inf"))
        ):
            code = repr(value)
        else:
            code = self.bind_global(value)
        return PyExpr(code, _type_of_value(value), err=False, atomic=True, value=value, const=True)

    def materialize(self, ex: PyExpr) -> PyExpr:
        if ex.atomic:
            return ex
        name = self.tmp()
        self.emit(f"{name} = {ex.code}")
        return replace(ex, code=name, atomic=True)

    def fail(
        self, kind: str, message: str, cls: type[BaseException] | None = None, bad: bool = False
    ) -> PyExpr:
        if kind == "err":
            return PyExpr(f"_fail_err({message!r}, {bad})", "dyn", err=True)
        if kind == "raised":
            return PyExpr(f"_fail_raised({message!r}, {bad})", "dyn", err=False, fatal=True)
        return PyExpr(f"_fail_py({message!r}, {self.bind_global(cls)})", "dyn", err=False, fatal=True)

    def dump_fails(self, node: lark.Tree) -> bool:
        """Does cel-python's tree_dump() fail on this node (so repr() of its errors fails)?

        Its dumper keeps a stack of strings, one per visited sub-expression; only an empty list or
        map literal (`[]`, `{}`) breaks that count, so a tree without one never fails (`maybe_bad`
        is False for the expression being compiled)."""
        if not self.maybe_bad:
            return False
        key = id(node)
        if key not in self.dump_memo:
            try:
                tree_dump(node)
                self.dump_memo[key] = False
            except Exception:  # noqa: BLE001
                self.dump_memo[key] = True
        return self.dump_memo[key]

    # ------------------------------------------------------------ constant folding

    def is_const(self, node: lark.Tree) -> bool:
        """No variable below this node (memoized; the heights of constant subtrees too)."""
        memo = self.const_ids
        result = memo.get(id(node))
        if result is None:
            result = _name(node.data, node.data) not in NOT_CONSTANT
            height = 0
            if result:
                for child in node.children:
                    if isinstance(child, lark.Tree):
                        if not self.is_const(child):
                            result = False
                            break
                        height = max(height, self.const_depth[id(child)])
            memo[id(node)] = result
            self.const_depth[id(node)] = height + 1
        return result

    def fold(self, node: lark.Tree) -> PyExpr | None:
        """Evaluate a variable-free sub-expression with cel-python now.

        Only subtrees up to FOLD_HEIGHT high: cel-python's evaluator recurses about 14 frames a level,
        so a taller one (`1+1+...` 600 terms) ran into RecursionError, and was then tried again at
        each level below, each attempt walking as deep as the stack allowed: quadratic, 5 s for 600
        terms. Above the bound the operators are compiled as usual and their lower parts folded."""
        if rule_name(node.data) == "literal" and len(node.children) == 1:
            value = _simple_literal(node.children[0])
            if value is not None:
                return self.literal(value)
        if self.const_depth.get(id(node), 0) > FOLD_HEIGHT:
            return None
        if self._folder_activation is None:
            self._folder_activation = (
                _env().program(node, functions=functions.EXTRA_FUNCTIONS).new_activation()
            )
        try:
            value = Evaluator(ast=node, activation=self._folder_activation).visit(node)
        except CELEvalError as exc:
            return self.fail(
                "raised", str(exc.args[0]) if exc.args else "error", bad=functions.cel_repr_fails(exc)
            )
        except RecursionError:
            return None
        except Exception as exc:
            return self.fail("py", f"{type(exc).__name__}: {exc}", type(exc))
        if isinstance(value, CELEvalError):
            return self.fail(
                "err", str(value.args[0]) if value.args else "error", bad=functions.cel_repr_fails(value)
            )
        try:
            plain = functions.from_cel(value)
        except functions.Defer:
            return None
        return self.literal(plain)

    # ------------------------------------------------------------ operands with cel-python's evaluation order

    def operands(self, nodes: list[lark.Tree], scope: dict[str, tuple[str, Type]]) -> list[PyExpr]:
        """Compile operands that cel-python evaluates all of, left to right, before combining them.

        An absorbable error in one operand must not stop a later operand from raising a fatal
        error (cel-python evaluates both), so such operands are captured first."""
        parts = []
        for node in nodes:
            with self.sub() as buf:
                ex = self.compile(node, scope)
            parts.append((buf, ex))
        capture = [ex.err and any(p[1].fatal for p in parts[i + 1 :]) for i, (_, ex) in enumerate(parts)]
        out: list[PyExpr] = []
        if any(capture):
            for (buf, ex), cap in zip(parts, capture, strict=True):
                if cap:
                    name = self.tmp()
                    self.emit("try:")
                    self.splice(buf, 1)
                    self.emit(f"{name} = {ex.code}", 1)
                    self.emit("except _Err as _e:")
                    self.emit(f"{name} = _e", 1)
                    out.append(replace(ex, code=name, atomic=True))
                else:
                    self.splice(buf)
                    out.append(self.materialize(ex))
            for ex, cap in zip(out, capture, strict=True):
                if cap:
                    self.emit(f"if type({ex.code}) is _Err: raise {ex.code}")
            return out
        for buf, ex in parts:
            if buf:
                out = [self.materialize(o) for o in out]
                self.splice(buf)
            out.append(ex)
        if self.force_atomic:
            out = [self.materialize(o) for o in out]
        return out

    def captured(self, node: lark.Tree, scope: dict[str, tuple[str, Type]]) -> PyExpr:
        """Compile so that the result is a value or an functions.Err instance, never a raised Err."""
        inner = _unwrap(node)
        with self.sub() as buf:
            # &&, || and ?: capture natively (keeps long chains from nesting try blocks)
            inner_name = rule_name(inner.data)
            if inner_name in ("conditionalor", "conditionaland") and len(inner.children) == 2:
                ex = self.logic(inner, scope, capture=True)
            elif inner_name == "expr" and len(inner.children) == 3:
                ex = self.ternary(inner, scope, capture=True)
            else:
                ex = self.compile(node, scope)
        if not ex.err:
            self.splice(buf)
            return ex
        name = self.tmp()
        self.emit("try:")
        self.splice(buf, 1)
        self.emit(f"{name} = {ex.code}", 1)
        self.emit("except _Err as _e:")
        self.emit(f"{name} = _e", 1)
        return replace(ex, code=name, atomic=True, err=False, holds_err=True)

    def finish(self, ex: PyExpr, capture: bool) -> PyExpr:
        if ex.holds_err and not capture:
            self.emit(f"if type({ex.code}) is _Err: raise {ex.code}")
            return replace(ex, holds_err=False, err=True)
        return ex

    # ------------------------------------------------------------ dispatch

    def compile(self, node: lark.Tree, scope: dict[str, tuple[str, Type]]) -> PyExpr:
        data = _name(node.data, node.data)
        if data in PASSTHROUGH and len(node.children) == 1:
            return self.compile(node.children[0], scope)
        if data in FOLDABLE and self.is_const(node):
            folded = self.fold(node)
            if folded is not None:
                return folded
        method = getattr(self, "c_" + data, None)
        if method is None:
            raise Unsupported(f"'{data}' is not compiled")
        if data in TREE_ERROR_NODES and self.dump_fails(node):
            # Operands first (their errors pass unmarked), then mark the errors of this node itself.
            self.force_atomic += 1
            try:
                ex = method(node, scope)
            finally:
                self.force_atomic -= 1
            if not ex.err:
                return ex
            name = self.tmp()
            self.emit("try:")
            self.emit(f"{name} = {ex.code}", 1)
            self.emit("except _Err as _e:")
            self.emit("_mark_bad_repr(_e)", 1)
            self.emit("raise", 1)
            return replace(ex, code=name, atomic=True)
        return method(node, scope)

    # ------------------------------------------------------------ logic

    def c_expr(self, node: lark.Tree, scope: dict) -> PyExpr:
        return self.ternary(node, scope, capture=False)

    def c_conditionalor(self, node: lark.Tree, scope: dict) -> PyExpr:
        return self.logic(node, scope, capture=False)

    c_conditionaland = c_conditionalor

    def logic(self, node: lark.Tree, scope: dict, capture: bool) -> PyExpr:
        is_or = rule_name(node.data) == "conditionalor"
        decisive = "True" if is_or else "False"
        a = self.captured(node.children[0], scope)
        with self.sub() as bbuf:
            b = self.captured(node.children[1], scope)
        both_bool = a.type == "bool" and b.type == "bool"
        pyop = "or" if is_or else "and"
        if both_bool and not a.holds_err and not b.holds_err and not b.fatal and not bbuf:
            ex = PyExpr(f"({a.code} {pyop} {b.code})", "bool", err=False, fatal=a.fatal)
            return ex
        a = self.materialize(replace(a, atomic=False) if a.const else a)  # no `True is False` in the source
        result = self.tmp()
        combine = (
            f"({a.code} {pyop} {b.code})"
            if both_bool and not a.holds_err and not b.holds_err
            else f"{'_lor' if is_or else '_land'}({a.code}, {b.code}, {self.dump_fails(node)})"
        )
        if b.fatal:  # cel-python evaluates both sides: no short circuit past a fatal error
            self.splice(bbuf)
            self.emit(f"{result} = {combine}")
        else:
            self.emit(f"if {a.code} is {decisive}:")
            self.emit(f"{result} = {decisive}", 1)
            self.emit("else:")
            self.splice(bbuf, 1)
            self.emit(f"{result} = {combine}", 1)
        holds = a.holds_err or b.holds_err or not both_bool
        # _land/_lor format both operands into a "no matching overload" error, and repr() of an error
        # that cel-python cannot tree_dump raises IndexError there (runtime.Err.bad_repr): so this
        # node can escape too, and a `||` or `&&` above it must not short-circuit past it. Only in
        # expressions with an empty list or map literal (maybe_bad): no cost anywhere else.
        escapes = self.maybe_bad and combine.startswith(("_lor(", "_land("))
        ex = PyExpr(
            result,
            "bool" if both_bool else "dyn",
            err=False,
            fatal=a.fatal or b.fatal or escapes,
            atomic=True,
            holds_err=holds,
        )
        return self.finish(ex, capture)

    def ternary(self, node: lark.Tree, scope: dict, capture: bool) -> PyExpr:
        cond = self.captured(node.children[0], scope)
        with self.sub() as abuf:
            a = self.compile(node.children[1], scope)
        with self.sub() as bbuf:
            b = self.compile(node.children[2], scope)
        if (
            cond.type == "bool"
            and not cond.holds_err
            and not a.fatal
            and not b.fatal
            and not abuf
            and not bbuf
        ):
            return PyExpr(
                f"({a.code} if {cond.code} else {b.code})",
                a.type if a.type == b.type else "dyn",
                err=a.err or b.err,
                fatal=cond.fatal,
            )
        cond = self.materialize(cond)
        result = self.tmp()
        for branch, buf, ex in (("if", abuf, a), ("else", bbuf, b)):
            self.emit(f"if {cond.code}:" if branch == "if" else "else:")  # truthiness, as cel-python
            guarded = ex.err or ex.fatal
            if guarded:
                self.emit("try:", 1)
            self.splice(buf, 2 if guarded else 1)
            self.emit(f"{result} = {ex.code}", 2 if guarded else 1)
            if ex.err:
                self.emit("except _Err as _e:", 1)
                self.emit(f"{result} = _e", 2)
            if ex.fatal:
                self.emit("except _PyErr as _e:", 1)
                self.emit(f"{result} = _pyerr_to_err(_e)", 2)
        if not (cond.type == "bool" and not cond.holds_err):
            self.emit(f"if type({cond.code}) is not bool: {result} = _ternary_err({self.dump_fails(node)})")
        out = PyExpr(
            result,
            a.type if a.type == b.type else "dyn",
            err=False,
            fatal=cond.fatal or a.fatal or b.fatal,
            atomic=True,
            holds_err=True,
        )
        return self.finish(out, capture)

    # ------------------------------------------------------------ operators

    def c_relation(self, node: lark.Tree, scope: dict) -> PyExpr:
        op_node, right = node.children
        name, pyop = REL_OPS[rule_name(op_node.data)]
        left, right_ex = self.operands([op_node.children[0], right], scope)
        fatal = left.fatal or right_ex.fatal
        err = left.err or right_ex.err
        left_type, right_type = left.type, right_ex.type
        if name == "_in_":
            if left_type in STRINGS:
                if (
                    right_ex.const
                    and isinstance(right_ex.value, list)
                    and all(type(v) is str for v in right_ex.value)
                ):
                    members = self.bind_global(frozenset(right_ex.value), "_set")
                    return PyExpr(f"({left.code} in {members})", "bool", err=err, fatal=fatal)
                if right_type == ("list", "string") or (
                    isinstance(right_type, tuple) and right_type[0] == "map" and right_type[1] == "string"
                ):
                    return PyExpr(f"({left.code} in {right_ex.code})", "bool", err=err, fatal=fatal)
            return PyExpr(f"_g_in({left.code}, {right_ex.code})", "bool", err=True, fatal=True)
        groups = EQ_SAME if name in ("_==_", "_!=_") else ORDERED_SAME
        if _same(left_type, right_type, groups):
            return PyExpr(f"({left.code} {pyop} {right_ex.code})", "bool", err=err, fatal=fatal)
        return PyExpr(f"_g_rel({name!r}, {left.code}, {right_ex.code})", "bool", err=True, fatal=True)

    def c_addition(self, node: lark.Tree, scope: dict) -> PyExpr:
        op_node, right = node.children
        add = rule_name(op_node.data) == "addition_add"
        a, b = self.operands([op_node.children[0], right], scope)
        fatal = a.fatal or b.fatal
        if a.type == b.type == "int":
            return PyExpr(f"{'_iadd' if add else '_isub'}({a.code}, {b.code})", "int", fatal=fatal)
        if a.type == b.type == "uint":
            return PyExpr(f"{'_uadd' if add else '_usub'}({a.code}, {b.code})", "uint", fatal=fatal)
        if add and a.type in STRINGS and b.type in STRINGS:
            return PyExpr(f"_sconcat({a.code}, {b.code})", "rawstring", err=a.err or b.err, fatal=fatal)
        return PyExpr(f"_g_add({'_+_' if add else '_-_'!r}, {a.code}, {b.code})", "dyn", fatal=True)

    def c_multiplication(self, node: lark.Tree, scope: dict) -> PyExpr:
        op_node, right = node.children
        op = {"multiplication_mul": "mul", "multiplication_div": "div", "multiplication_mod": "mod"}[
            rule_name(op_node.data)
        ]
        a, b = self.operands([op_node.children[0], right], scope)
        fatal = a.fatal or b.fatal
        if a.type == b.type == "int":
            return PyExpr(f"_i{op}({a.code}, {b.code})", "int", fatal=fatal)
        if a.type == b.type == "uint":
            return PyExpr(f"_u{op}({a.code}, {b.code})", "uint", fatal=fatal)
        cel_op = {"mul": "_*_", "div": "_/_", "mod": "_%_"}[op]
        return PyExpr(f"_g_mul({cel_op!r}, {a.code}, {b.code})", "dyn", fatal=True)

    def c_unary(self, node: lark.Tree, scope: dict) -> PyExpr:
        op_node, operand = node.children
        (a,) = self.operands([operand], scope)
        if rule_name(op_node.data) == "unary_not":
            if a.type == "bool":
                return PyExpr(f"(not {a.code})", "bool", err=a.err, fatal=a.fatal)
            return PyExpr(f"_lnot({a.code})", "bool", fatal=a.fatal)
        if a.type == "int":
            return PyExpr(f"_ineg({a.code})", "int", fatal=a.fatal)
        return PyExpr(f"_g_unary('-_', {a.code})", "dyn", fatal=True)

    # ------------------------------------------------------------ names, literals, aggregates

    def c_literal(self, node: lark.Tree, scope: dict) -> PyExpr:
        raise Unsupported("literal could not be evaluated")  # folding handles every literal

    def c_ident(self, node: lark.Tree, scope: dict) -> PyExpr:
        name = str(node.children[0])
        if name in scope:
            pyname, vtype = scope[name]
            return PyExpr(pyname, vtype, err=False, atomic=True)
        if name in EVENT_SCHEMA:
            code = self.access[name]
            return PyExpr(code, EVENT_SCHEMA[name], err=False, atomic=code.isidentifier())
        if name in self.constants:
            value = self.constants[name]
            return replace(self.literal(value), type=("list", "string"))
        if name in TYPE_NAMES:
            raise Unsupported(f"the type name '{name}'")  # as type() itself: cel-python's interpreter decides
        if name in functions.FUNCTIONS:
            raise Unsupported(f"'{name}' names a function, not a value")
        return self.fail("err", f"undeclared reference to '{name}'")

    def c_paren_expr(self, node: lark.Tree, scope: dict) -> PyExpr:
        return self.compile(node.children[0], scope)

    def c_list_lit(self, node: lark.Tree, scope: dict) -> PyExpr:
        items = self.operands(list(node.children[0].children), scope) if node.children else []
        elem = _common(i.type for i in items) if items else "dyn"
        return PyExpr(
            f"[{', '.join(i.code for i in items)}]",
            ("list", elem),
            err=any(i.err for i in items),
            fatal=any(i.fatal for i in items),
        )

    def c_map_lit(self, node: lark.Tree, scope: dict) -> PyExpr:
        if not node.children:
            return self.literal({})
        items = self.tmp()
        self.emit(f"{items} = []")
        for child in node.children[0].children:
            with self.sub() as buf:
                ex = self.compile(child, scope)
            if not ex.err and not ex.fatal:
                self.splice(buf)
                self.emit(f"{items}.append({ex.code})")
                continue
            # cel-python keeps an error value *inside* the map, and turns a TypeError/ValueError
            # raised while building it into an error for the whole map.
            self.emit("try:")
            self.splice(buf, 1)
            self.emit(f"{items}.append({ex.code})", 1)
            if ex.err:
                self.emit("except _Err as _e:")
                self.emit(f"{items}.append(_ErrVal(_e))", 1)
            if ex.fatal:
                self.emit("except _PyErr as _e:")
                self.emit("raise _map_item_error(_e)", 1)
        return PyExpr(f"_make_map({items})", ("map", "dyn", "dyn"), err=True, fatal=True)

    # ------------------------------------------------------------ members

    def c_member_dot(self, node: lark.Tree, scope: dict) -> PyExpr:
        target_node, name_token = node.children
        name = str(name_token)
        (target,) = self.operands([target_node], scope)
        ttype = target.type
        if isinstance(ttype, tuple) and ttype[0] == "rec":
            ftype = _field_type(ttype, name)
            if ftype is not None:  # the event schema guarantees the field
                return PyExpr(f"{target.code}[{name!r}]", ftype, err=target.err, fatal=target.fatal)
        if isinstance(ttype, tuple) and ttype[0] == "map":
            return PyExpr(f"_mget({target.code}, {name!r})", ttype[2], fatal=target.fatal)
        return PyExpr(f"_select({target.code}, {name!r})", "dyn", fatal=target.fatal)

    def c_member_index(self, node: lark.Tree, scope: dict) -> PyExpr:
        target, index = self.operands(list(node.children), scope)
        fatal = target.fatal or index.fatal
        ttype = target.type
        if isinstance(ttype, tuple):
            if ttype[0] == "list" and index.type == "int":
                return PyExpr(f"_lidx({target.code}, {index.code})", ttype[1], fatal=fatal)
            if ttype[0] == "map" and index.type in STRINGS:  # a str never equals a non-str key
                return PyExpr(f"_mget({target.code}, {index.code})", ttype[2], fatal=fatal)
            if ttype[0] == "rec" and index.const and type(index.value) is str:
                ftype = _field_type(ttype, index.value)
                return PyExpr(f"_mget({target.code}, {index.code})", ftype or "dyn", fatal=fatal)
        return PyExpr(f"_g_index({target.code}, {index.code})", "dyn", fatal=True)

    def c_member_object(self, node: lark.Tree, scope: dict) -> PyExpr:
        raise Unsupported("message construction")

    def c_dot_ident(self, node: lark.Tree, scope: dict) -> PyExpr:
        raise Unsupported("leading-dot name")

    c_dot_ident_arg = c_dot_ident

    # ------------------------------------------------------------ functions and methods

    def c_ident_arg(self, node: lark.Tree, scope: dict) -> PyExpr:
        name = str(node.children[0])
        args = list(node.children[1].children) if len(node.children) > 1 else []
        if name == "has":
            if len(args) != 1:
                raise Unsupported("has() with other than one argument")
            return self.has(args[0], scope)
        if name == "dyn":
            if len(args) != 1:
                raise Unsupported("dyn() with other than one argument")
            ex = self.compile(args[0], scope)
            return replace(ex, type="dyn")
        if name == "type":
            raise Unsupported("type()")
        exs = self.operands(args, scope)
        fatal = any(e.fatal for e in exs)
        if name == "size" and len(exs) == 1 and self.sized(exs[0].type):
            return PyExpr(f"len({exs[0].code})", "int", err=exs[0].err, fatal=fatal)
        call = ", ".join([repr(name)] + [e.code for e in exs])
        return PyExpr(f"_g_call({call})", RESULT_TYPES.get(name, "dyn"), fatal=True)

    @staticmethod
    def sized(t: Type) -> bool:
        return t in STRINGS or t == "bytes" or (isinstance(t, tuple) and t[0] in ("list", "map", "rec"))

    def has(self, arg: lark.Tree, scope: dict) -> PyExpr:
        inner = _unwrap(arg)
        if rule_name(inner.data) == "member_dot":
            with self.sub() as buf:
                (target,) = self.operands([inner.children[0]], scope)
            if isinstance(target.type, tuple) and target.type[0] in ("map", "rec") and not target.err:
                self.splice(buf)
                key = repr(str(inner.children[1]))
                code = (
                    f"({key} in {target.code})"
                    if target.type[0] == "rec"
                    else f"_has_key({target.code}, {key})"
                )
                return PyExpr(code, "bool", err=False, fatal=target.fatal)
        with self.sub() as buf:
            ex = self.compile(arg, scope)
        if not ex.err and not ex.fatal and not buf:
            return self.literal(True)
        result = self.tmp()
        if not ex.err:
            self.splice(buf)
            self.emit(ex.code)
            self.emit(f"{result} = True")
        else:
            self.emit("try:")
            self.splice(buf, 1)
            self.emit(ex.code, 1)
            self.emit(f"{result} = True", 1)
            self.emit("except _Err:")
            self.emit(f"{result} = False", 1)
        return PyExpr(result, "bool", err=False, fatal=ex.fatal, atomic=True)

    def c_member_dot_arg(self, node: lark.Tree, scope: dict) -> PyExpr:
        target_node, name_token = node.children[0], str(node.children[1])
        args = list(node.children[2].children) if len(node.children) > 2 else []
        if name_token in MACROS:
            return self.macro(node, name_token, target_node, args, scope)
        if name_token in UNSUPPORTED_MACROS:
            raise Unsupported(f"the {name_token}() macro")
        exs = self.operands([target_node] + args, scope)
        target, rest = exs[0], exs[1:]
        fatal = any(e.fatal for e in exs)
        err = any(e.err for e in exs)
        tt = target.type
        name = name_token
        if (
            name in ("startsWith", "endsWith")
            and tt in STRINGS
            and len(rest) == 1
            and rest[0].type in STRINGS
        ):
            pymethod = "startswith" if name == "startsWith" else "endswith"
            return PyExpr(f"{target.code}.{pymethod}({rest[0].code})", "bool", err=err, fatal=fatal)
        if name == "contains" and tt == "string" and len(rest) == 1 and rest[0].type in STRINGS:
            return PyExpr(f"({rest[0].code} in {target.code})", "bool", err=err, fatal=fatal)
        if name == "matches" and tt in STRINGS and len(rest) == 1 and rest[0].type in STRINGS:
            if rest[0].const:
                regex = functions.compile_regex(
                    rest[0].value
                )  # constant pattern: compiled (or rejected) at load time
                if isinstance(regex, re2.error):
                    return PyExpr(f"_bad_regex_for({target.code})", "bool", fatal=fatal)
                return PyExpr(
                    f"{self.bind_global(functions.regex_tester(regex), '_re')}({target.code})",
                    "bool",
                    err=err,
                    fatal=fatal,
                )
            return PyExpr(f"_matches({target.code}, {rest[0].code})", "bool", fatal=fatal)
        if name in ("lowerAscii", "upperAscii") and tt in STRINGS and not rest:
            return PyExpr(
                f"_{'lower' if name == 'lowerAscii' else 'upper'}_ascii({target.code})",
                "string",
                err=err,
                fatal=fatal,
            )
        if name == "size" and not rest and self.sized(tt):
            return PyExpr(f"len({target.code})", "int", err=err, fatal=fatal)
        if (
            name in TIME_METHODS
            and tt == "timestamp"
            and len(rest) <= 1
            and (not rest or (rest[0].const and type(rest[0].value) is str))
        ):
            try:
                converter = functions.local_time_for(rest[0].value if rest else None)
            except Exception:  # noqa: BLE001 - the generic call reports the same error at run time
                converter = None
            if converter is not None:
                local = self.bind_global(converter, "_loc")
                return PyExpr(
                    TIME_METHODS[name].format(f"{local}({target.code})"), "int", err=err, fatal=fatal
                )
        call = ", ".join([repr(name), target.code] + [e.code for e in rest])
        return PyExpr(f"_g_method({call})", RESULT_TYPES.get(name, "dyn"), fatal=True)

    # ------------------------------------------------------------ macros

    def macro(self, node: lark.Tree, name: str, target_node: lark.Tree, args: list, scope: dict) -> PyExpr:
        if len(args) != 2:
            raise Unsupported(f"{name}() with {len(args)} arguments")
        idents = list(args[0].find_data("ident"))
        if len(idents) != 1:
            raise Unsupported(f"{name}() without a variable name")
        var = str(idents[0].children[0])
        (target,) = self.operands([target_node], scope)
        target = self.materialize(target)
        tt = target.type
        if isinstance(tt, tuple) and tt[0] == "list":
            iterable, elem, iter_fatal = target.code, tt[1], False
        elif isinstance(tt, tuple) and tt[0] in ("map", "rec"):
            iterable, elem, iter_fatal = target.code, (tt[1] if tt[0] == "map" else "string"), False
        elif tt in STRINGS:
            iterable, elem, iter_fatal = f"_chars({target.code})", "rawstring", False
        else:
            iterable, elem, iter_fatal = f"_macro_iter({target.code})", "dyn", True
        loop_var = self.tmp("_v")
        inner_scope = {**scope, var: (loop_var, elem)}
        with self.sub() as buf:
            body = self.compile(args[1], inner_scope)
        fatal = target.fatal or iter_fatal
        result = self.tmp()

        if name in ("exists", "all"):
            decisive, neutral = ("True", "False") if name == "exists" else ("False", "True")
            self.emit(f"{result} = {neutral}")
            self.emit(f"for {loop_var} in {iterable}:")
            if body.type == "bool" and not body.fatal:
                # Absorbing loop with a short circuit: once decisive, later elements cannot change it.
                value = self.tmp()
                if body.err:
                    self.emit("try:", 1)
                    self.splice(buf, 2)
                    self.emit(f"{value} = {body.code}", 2)
                    self.emit("except _Err as _e:", 1)
                    self.emit(f"{result} = _e", 2)
                    self.emit("continue", 2)
                else:
                    self.splice(buf, 1)
                    self.emit(f"{value} = {body.code}", 1)
                self.emit(f"if {value} is {decisive}:", 1)
                self.emit(f"{result} = {decisive}", 2)
                self.emit("break", 2)
                holds = body.err
            else:
                value = self.tmp()
                self.emit("try:", 1)
                self.splice(buf, 2)
                self.emit(f"{value} = {body.code}", 2)
                self.emit("except (_Err, _Raised) as _e:", 1)
                self.emit(f"{value} = _as_err(_e)", 2)
                self.emit(f"{result} = {'_lor' if name == 'exists' else '_land'}({result}, {value})", 1)
                holds = True
            ex = PyExpr(
                result,
                "bool" if body.type == "bool" else "dyn",
                err=target.err,
                fatal=fatal or body.fatal,
                atomic=True,
                holds_err=holds,
            )
            ex = self.finish(ex, capture=False)
            return replace(ex, err=ex.err or target.err)

        value = self.tmp()
        self.emit(f"{result} = {'0' if name == 'exists_one' else '[]'}")
        self.emit(f"for {loop_var} in {iterable}:")
        if body.err:  # cel-python *raises* errors of these macro bodies
            self.emit("try:", 1)
            self.splice(buf, 2)
            self.emit(f"{value} = {body.code}", 2)
            self.emit("except _Err as _e:", 1)
            self.emit("raise _raised(_e)", 2)
        else:
            self.splice(buf, 1)
            self.emit(f"{value} = {body.code}", 1)
        fatal = fatal or body.fatal or body.err
        if name == "exists_one":
            self.emit(f"if {value}: {result} += 1", 1)
            return PyExpr(f"({result} == 1)", "bool", err=target.err, fatal=fatal)
        if name == "map":
            self.emit(f"{result}.append({value})", 1)
            return PyExpr(result, ("list", body.type), err=target.err, fatal=fatal, atomic=True)
        self.emit(f"if {value}: {result}.append({loop_var})", 1)
        return PyExpr(result, ("list", elem), err=target.err, fatal=fatal, atomic=True)


# The namespace generated code runs in: what the CEL functions module exports, each as `_NAME`.
RUNTIME_NAMESPACE: dict[str, Any] = {f"_{name}": getattr(functions, name) for name in functions.exported}
_PLAIN_TYPES = ("bool", "int", "string", "double", "null", "bytes")


def generate(tree: lark.Tree, constants: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Python source of `def _cel(_act)` for `tree`, and the globals it needs. Raises Unsupported."""
    gen = CodeGenerator(constants)
    gen.level = 1
    gen.maybe_bad = has_empty_literal(tree)
    ex = gen.compile(tree, {})
    ex = gen.finish(ex, capture=False)
    result = ex.code if ex.type in _PLAIN_TYPES else f"_plain({ex.code})"
    lines = (
        ["def _cel(_act):"] + ["    " * level + text for level, text in gen.lines] + [f"    return {result}"]
    )
    return "\n".join(lines) + "\n", {**RUNTIME_NAMESPACE, **gen.globals}


class RaiseCheck:
    """Can evaluating a tree raise an error that `&&` and `||` do not absorb (Raised, PyErr, Defer:
    a macro over a non-list, an error in a map() body...), as the compiled matchers see it? What
    the compiler does not cover counts as yes. One per policy: the trees share a generator (and
    its constant-folding activation). The rule index trusts a false guard only beside operands
    that cannot (policyplug.index)."""

    def __init__(self, constants: Mapping[str, Any]):
        self.gen = CodeGenerator(constants, EVENT_ACCESS)

    def __call__(self, tree: lark.Tree, maybe_bad: bool = True) -> bool:
        """`maybe_bad`: the whole condition holds `[]` or `{}` (see CodeGenerator.dump_fails)."""
        gen = self.gen
        gen.lines, gen.level, gen.maybe_bad = [], 1, maybe_bad
        try:
            return gen.compile(tree, {}).fatal
        except (Unsupported, RecursionError, MemoryError):
            return True


def compile_expression(tree: lark.Tree, constants: Mapping[str, Any]) -> CompiledExpression:
    """Compile a CEL parse tree; what the compiler does not cover runs on the reference interpreter."""
    reference = interpret(tree, constants)
    try:
        source, namespace = generate(tree, constants)
        code = compile(source, "<cel>", "exec")
        exec(code, namespace)  # noqa: S102 - source generated above from the parse tree
    except Unsupported as exc:
        return CompiledExpression(reference, True, str(exc), None)
    except (RecursionError, SyntaxError, MemoryError) as exc:  # too deep or too big to compile
        return CompiledExpression(
            reference, True, f"expression too complex to compile ({type(exc).__name__})", None
        )
    function = namespace["_cel"]

    def evaluate(activation: Mapping[str, Any]) -> Any:
        try:
            return function(activation)
        except CelEvaluationError:
            raise
        except Exception:  # functions.Defer, or an activation that does not match the event schema
            functions.count_deferral()
            return reference(activation)

    return CompiledExpression(evaluate, False, None, source)


# ---------------------------------------------------------------- whole policies: one matcher per rule


@dataclass
class CompiledRuleConditions:
    """The conditions of one rule fused into one function `matcher(event, sender, recipient, direction)`.

    The matcher returns True when every `when` is true and every `unless` false, False when one is
    not, and None when a condition gives a non-bool value; it raises on an error. The engine takes
    only True and False from it: anything else makes it evaluate that rule again condition by
    condition (expressions are pure), which reports the error as the reference interpreter would. `matcher` is None
    when a condition is left to the reference interpreter (`fallbacks` says which, and why)."""

    matcher: Callable[..., Any] | None
    fallbacks: list[str | None]  # per condition: None when compiled, else why not
    python_source: str | None


def _matcher_lines(
    gen: CodeGenerator, name: str, conditions: list[tuple[lark.Tree, bool]]
) -> tuple[list[str], list[str | None]]:
    """Source lines of `def name(_ev, _s, _r, _d)` for one rule's conditions, and per-condition fallbacks."""
    body: list[tuple[int, str]] = []
    reasons: list[str | None] = []
    for tree, expected in conditions:
        gen.lines, gen.level = [], 1
        gen.maybe_bad = has_empty_literal(tree)
        try:
            ex = gen.finish(gen.compile(tree, {}), capture=False)
        except Unsupported as exc:
            reasons.append(str(exc))
            continue
        except (RecursionError, MemoryError) as exc:
            reasons.append(f"expression too complex to compile ({type(exc).__name__})")
            continue
        reasons.append(None)
        body.extend(gen.lines)
        want, other = ("True", "False") if expected else ("False", "True")
        value = gen.tmp("_c")  # an Err instance or a non-bool ends up as None: the engine looks closer
        body.append((1, f"{value} = {ex.code}"))
        body.append((1, f"if {value} is not {want}: return False if {value} is {other} else None"))
    if any(reasons):
        return [], reasons
    lines = (
        [f"def {name}({MATCHER_ARGS}):"]
        + ["    " * level + text for level, text in body]
        + ["    return True"]
    )
    return lines, reasons


def compile_rules(
    rules: list[list[tuple[lark.Tree, bool]]], constants: Mapping[str, Any]
) -> list[CompiledRuleConditions]:
    """Compile the conditions of every rule of a policy (in `when`, `unless` order) into one Python
    module, compiled and executed once: one matcher function per rule."""
    gen = CodeGenerator(constants, EVENT_ACCESS)
    sources: list[list[str]] = []
    reasons: list[list[str | None]] = []
    for i, conditions in enumerate(rules):
        lines, why = _matcher_lines(gen, f"_m{i}", conditions)
        sources.append(lines)
        reasons.append(why)
    namespace = {**RUNTIME_NAMESPACE, **gen.globals}
    try:
        # In chunks of rules, not one module: compile() holds the interpreter for its whole run (35 ms
        # for 200 rules here), and the decision service loads a reload in a thread beside its event
        # loop, whose decisions would wait that long.
        for start in range(0, len(sources), RULES_PER_COMPILE):
            chunk = sources[start : start + RULES_PER_COMPILE]
            code = compile("\n".join(line for lines in chunk for line in lines) + "\n", "<policy>", "exec")
            exec(code, namespace)  # noqa: S102 - source generated above from the parse trees
        broken: set[int] = set()
    except (RecursionError, SyntaxError, MemoryError):
        # A rule too big or too deep for Python's compiler: compile them one by one. A rule that
        # still fails gets no matcher (its conditions are then compiled one by one, or fall back).
        broken = set()
        for i, lines in enumerate(sources):
            if not lines:
                continue
            try:
                exec(compile("\n".join(lines) + "\n", "<rule>", "exec"), namespace)  # noqa: S102
            except (RecursionError, SyntaxError, MemoryError):
                broken.add(i)
    out = []
    for i, lines in enumerate(sources):
        matcher = namespace.get(f"_m{i}") if lines and i not in broken else None
        out.append(CompiledRuleConditions(matcher, reasons[i], "\n".join(lines) + "\n" if matcher else None))
    return out
