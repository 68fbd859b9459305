"""CEL text -> checked cel-python parse tree.

Parses a condition with cel-python, points syntax errors into the policy file, rejects unknown
names, functions, methods and fields at load time (with a did-you-mean), and inlines `define`d
names so that both the compiler and the reference interpreter see one self-contained tree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import lark
import re2
from celpy.celparser import CELParseError, CELParser

from ..diagnostics import DiagnosticSink, Location, did_you_mean
from ..nodes import Expression
from ..schema import FIELDS_OF, VARIABLES
from . import fastparse
from .fastparse import RULE_NAMES, rule_name
from .functions import compile_regex
from .reference import _env

# What a condition can see (docs/language.md, "What a condition can see"), from the event schema.
EVENT_VARIABLES = tuple(VARIABLES)
FUNCTIONS = (
    "has",
    "size",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "bool",
    "timestamp",
    "duration",
    "type",
    "dyn",
    "matches",
    "contains",
    "startsWith",
    "endsWith",
)
METHODS = (
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "lowerAscii",
    "upperAscii",
    "size",
    "exists",
    "all",
    "exists_one",
    "map",
    "filter",
    "getHours",
    "getMinutes",
    "getSeconds",
    "getMilliseconds",
    "getDayOfWeek",
    "getDayOfMonth",
    "getDayOfYear",
    "getMonth",
    "getFullYear",
    "getDate",
)
MACROS = ("exists", "all", "exists_one", "map", "filter")
# CEL's type denotations (`type(x) == string`); `type` itself names the event's type field here
TYPE_NAMES = ("int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type")
MAX_CEL_LENGTH = 64 * 1024
# a string literal with no escapes, prefixes or triple quotes: its value is its inside
SIMPLE_STRING = re.compile(r'"[^"\\\n\r]*"|\'[^\'\\\n\r]*\'')
_name = RULE_NAMES.get
_Tree = lark.Tree
_CHECKED = frozenset(("primary", "ident_arg", "member_dot", "member_dot_arg"))  # nodes NameChecker looks at

_parser: CELParser | None = None


def _cel_parser() -> CELParser:
    global _parser
    if _parser is None:
        _parser = CELParser()
    return _parser


def _file_location(expr: Expression, line: int | None, column: int | None, length: int = 1) -> Location:
    """Map a (1-based) line/column inside the CEL text to the policy file."""
    if not line or not column:
        return expr.location
    if line == 1:
        return Location(expr.location.file, expr.location.line, expr.location.column + column - 1, length)
    # Continued lines keep their full physical text, so columns are file columns.
    return Location(expr.location.file, expr.location.line + line - 1, column, length)


def parse_expression(expr: Expression, sink: DiagnosticSink) -> lark.Tree | None:
    if len(expr.text) > MAX_CEL_LENGTH:
        sink.error(expr.location, f"condition is longer than {MAX_CEL_LENGTH} characters")
        return None
    tree = fastparse.parse(expr.text)  # the same tree as cel-python's parser, for plain conditions
    if tree is not None:
        return tree
    try:
        return _cel_parser().parse(expr.text)
    except CELParseError as exc:
        token = ""
        detail = exc.args[1] if len(exc.args) > 1 else None
        if isinstance(detail, lark.exceptions.UnexpectedToken):
            token = str(detail.token)
            message = (
                f"CEL syntax error: unexpected '{token}'"
                if detail.token.type != "$END"
                else "CEL syntax error: the expression ends too early"
            )
        elif isinstance(detail, lark.exceptions.UnexpectedCharacters):
            token = (
                expr.text[detail.pos_in_stream : detail.pos_in_stream + 1]
                if detail.pos_in_stream is not None
                else ""
            )
            message = f"CEL syntax error: unexpected character '{token}'"
        else:
            message = "CEL syntax error: the expression is incomplete"
        line, column = exc.line, exc.column
        if line is None or line < 1:  # at the end of the text
            lines = expr.text.split("\n")
            line, column = len(lines), len(lines[-1]) + 1 if len(lines) > 1 else len(lines[-1]) + 1
        sink.error(_file_location(expr, line, column, max(1, len(token))), message)
    except RecursionError:
        sink.error(expr.location, "CEL expression nests too deep")
    except Exception as exc:  # lark raises a handful of other errors on odd input
        sink.error(expr.location, f"CEL syntax error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return None


def _token_of(tree: lark.Tree) -> lark.Token | None:
    for child in tree.children:
        if isinstance(child, lark.Token):
            return child
    return None


def _string_literal(tree: lark.Tree) -> lark.Token | None:
    """The token when `tree` is an expression that is just a string literal."""
    node = tree
    while isinstance(node, lark.Tree) and len(node.children) == 1 and rule_name(node.data) != "literal":
        node = node.children[0]
    if isinstance(node, lark.Tree) and rule_name(node.data) == "literal" and len(node.children) == 1:
        token = node.children[0]
        if isinstance(token, lark.Token) and token.type in ("STRING_LIT", "MLSTRING_LIT"):
            return token
    return None


def _string_value(token: lark.Token, literal: lark.Tree) -> str | None:
    """A string literal's value, escapes and prefixes decoded as cel-python decodes them (`literal`
    is its expression, evaluated as it stands: it is not parsed again)."""
    text = str(token)
    if SIMPLE_STRING.fullmatch(text):
        return text[1:-1]
    try:
        value = _env().program(literal).evaluate({})
    except Exception:  # noqa: BLE001 - not decodable here: the run-time error will say it
        return None
    return str(value) if isinstance(value, str) else None


def _ident_name(tree: lark.Tree) -> str | None:
    """The name when `tree` is an expression that is just an identifier (a macro's variable)."""
    node = tree
    while isinstance(node, lark.Tree) and len(node.children) == 1 and rule_name(node.data) != "ident":
        node = node.children[0]
    if isinstance(node, lark.Tree) and rule_name(node.data) == "ident":
        return str(node.children[0])
    return None


class NameChecker:
    """Checks names in one expression and inlines defines (returns a new tree)."""

    def __init__(
        self,
        expr: Expression,
        sink: DiagnosticSink,
        *,
        lists: Mapping[str, object],
        defines: Mapping[str, lark.Tree],
        later_defines: Mapping[str, object] | None = None,
        define_reads: Mapping[str, set[str]] | None = None,
    ):
        self.expr = expr
        self.define_reads = define_reads or {}
        self.sink = sink
        self.lists = lists
        self.defines = defines
        self.later_defines = later_defines or {}
        self.names_used: set[str] = set()

    def known_names(self) -> list[str]:
        return list(EVENT_VARIABLES) + list(self.lists) + list(self.defines)

    def check(self, tree: lark.Tree) -> lark.Tree:
        return self._visit(tree, frozenset())

    def _error(self, token: Any, message: str) -> None:
        """`token`: a lark.Token (lark types a tree's children as Token | Tree)."""
        self.sink.error(_file_location(self.expr, token.line, token.column, len(str(token))), message)

    def _check_pattern(self, argument: lark.Tree) -> None:
        """A constant `matches` pattern RE2 rejects: docs/language.md makes it a run-time error (the rule
        does not match), so the load goes on, but says where it is (RE2 would only say what)."""
        token = _string_literal(argument)
        pattern = _string_value(token, argument) if token is not None else None
        if token is None or pattern is None:
            return
        regex = compile_regex(pattern)
        if isinstance(regex, re2.error):
            reason = (
                regex.args[0].decode("utf-8", "replace")
                if regex.args and isinstance(regex.args[0], bytes)
                else str(regex)
            )
            self.sink.warning(
                _file_location(self.expr, token.line, token.column, len(str(token))),
                f"RE2 rejects this pattern ({reason}): the condition raises 'match error' "
                "at every evaluation, so its rule never matches",
            )

    def _visit(self, tree: lark.Tree, bound: frozenset[str]) -> lark.Tree:
        data = _name(tree.data, tree.data)
        if data not in _CHECKED:
            return self._children(tree, bound)
        if (
            data == "primary"
            and len(tree.children) == 1
            and isinstance(tree.children[0], lark.Tree)
            and rule_name(tree.children[0].data) == "ident"
        ):
            token = tree.children[0].children[0]
            name = str(token)
            if name in bound:
                return tree
            if name in self.defines:
                self.names_used |= self.define_reads.get(name, set())
                return lark.Tree(
                    "primary", [lark.Tree("paren_expr", [self.defines[name]], tree.meta)], tree.meta
                )
            if name in EVENT_VARIABLES or name in self.lists:
                self.names_used.add(name)
                return tree
            if name in TYPE_NAMES:
                return tree
            if name in self.later_defines:
                self._error(token, f"'{name}' is used before its 'define'")
            else:
                self._error(token, f"unknown name '{name}'{did_you_mean(name, self.known_names())}")
            return tree
        if data == "ident_arg":
            token = _token_of(tree)
            if token is not None and str(token) not in FUNCTIONS:
                self._error(token, f"unknown function '{token}'{did_you_mean(str(token), FUNCTIONS)}")
            elif token is not None and str(token) == "matches":
                args = tree.children[-1].children if isinstance(tree.children[-1], lark.Tree) else []
                if len(args) == 2:
                    self._check_pattern(args[1])
        if data == "member_dot":
            target, token = tree.children[0], tree.children[1]
            base = _ident_name(target)
            if base in FIELDS_OF and base not in bound and str(token) not in FIELDS_OF[base]:
                self._error(
                    token,
                    f"'{base}' has no field '{token}'{did_you_mean(str(token), FIELDS_OF[base])}"
                    f" (fields: {', '.join(FIELDS_OF[base])})",
                )
        if data == "member_dot_arg":
            token = tree.children[1]
            method = str(token)
            if method not in METHODS:
                self._error(token, f"unknown method '{method}'{did_you_mean(method, METHODS)}")
            elif (
                method == "matches"
                and len(tree.children) > 2
                and isinstance(tree.children[2], lark.Tree)
                and len(tree.children[2].children) == 1
            ):
                self._check_pattern(tree.children[2].children[0])
            elif method in MACROS and len(tree.children) > 2 and isinstance(tree.children[2], lark.Tree):
                args = tree.children[2].children
                variable = _ident_name(args[0]) if args else None
                if variable is None:
                    self._error(token, f"'{method}' needs a variable name as its first argument")
                    return tree
                new_children = [
                    self._visit(tree.children[0], bound),
                    token,
                    lark.Tree(
                        tree.children[2].data,
                        [args[0]] + [self._visit(a, bound | {variable}) for a in args[1:]],
                        tree.children[2].meta,
                    ),
                ]
                return lark.Tree(tree.data, new_children, tree.meta)
        return self._children(tree, bound)

    def _children(self, tree: lark.Tree, bound: frozenset[str]) -> lark.Tree:
        children = tree.children
        new_children = None
        for i, child in enumerate(children):
            if child.__class__ is _Tree or isinstance(child, lark.Tree):
                new = self._visit(child, bound)
                if new is not child:
                    if new_children is None:
                        new_children = list(children)
                    new_children[i] = new
        if new_children is None:
            return tree  # nothing inlined below: keep the parser's node (no copy on the load path)
        return lark.Tree(tree.data, new_children, tree.meta)


def check_expression(
    expr: Expression,
    sink: DiagnosticSink,
    *,
    lists: Mapping[str, object],
    defines: Mapping[str, lark.Tree],
    later_defines: Mapping[str, object] | None = None,
    define_reads: Mapping[str, set[str]] | None = None,
    parsed: dict[str, lark.Tree] | None = None,
) -> tuple[lark.Tree | None, set[str]]:
    """Parse, check and inline one expression; (None, names) when it has errors.

    `parsed` caches parse trees by expression text (one load's conditions repeat themselves;
    nothing changes a parse tree, so one tree serves them all)."""
    tree = parsed.get(expr.text) if parsed is not None else None
    if tree is None:
        tree = parse_expression(expr, sink)
        if tree is None:
            return None, set()
        if parsed is not None:
            parsed[expr.text] = tree
    before = len(sink.diagnostics)
    checker = NameChecker(
        expr, sink, lists=lists, defines=defines, later_defines=later_defines, define_reads=define_reads
    )
    try:
        checked = checker.check(tree)
    except RecursionError:
        sink.error(expr.location, "CEL expression nests too deep")
        return None, set()
    if len(sink.diagnostics) > before:
        return None, checker.names_used
    return checked, checker.names_used
