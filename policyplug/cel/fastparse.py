"""A fast CEL parser for the plain conditions most policies are made of, tree for tree the same
as cel-python's lark parser.

cel-python parses with a lark LALR grammar (celpy/cel.lark): about half a millisecond for a
condition like `direction == "outbound" && recipient.domain == "p1.example"`, most of it in
lark's generic machinery, which made parsing a third of the load time of a large policy. This
recursive-descent parser builds the same lark trees (same rule names, same tokens with the same
types, values and positions, same `meta` values as lark's propagate_positions) for a safe subset
of CEL: names, field selection, calls and method calls, indexing, list literals, parentheses,
plain string literals (no escapes, no prefixes, not triple-quoted), decimal int literals, true and
false, and the operators `! * / % + < <= > >= == != in && ||`.

Anything else (ternaries, maps, negative numbers, floats, escapes, comments, `null`, reserved
words, odd spacing of operators...) makes it give up (`parse` returns None), and cel-python's
parser takes the expression, errors included. tests/test_cel_fastparse.py compares the two on
generated expressions, including every position.
"""

from __future__ import annotations

import re
from typing import Any

from lark import Token, Tree
from lark.tree import Meta

_RULES = {
    name: Token("RULE", name)
    for name in (
        "expr",
        "conditionalor",
        "conditionaland",
        "relation",
        "relation_lt",
        "relation_le",
        "relation_gt",
        "relation_ge",
        "relation_eq",
        "relation_ne",
        "relation_in",
        "addition",
        "addition_add",
        "addition_sub",
        "multiplication",
        "multiplication_mul",
        "multiplication_div",
        "multiplication_mod",
        "unary",
        "unary_not",
        "unary_neg",
        "member",
        "member_dot",
        "member_dot_arg",
        "member_index",
        "primary",
        "ident_arg",
        "ident",
        "paren_expr",
        "list_lit",
        "exprlist",
        "literal",
        # produced by cel-python's parser only (this one gives up on them): named here so that
        # RULE_NAMES knows every rule of the grammar
        "member_object",
        "dot_ident_arg",
        "dot_ident",
        "map_lit",
        "fieldinits",
        "mapinits",
    )
}
# rule-name token -> plain str. Comparing a lark Token with a str runs Token.__eq__ in Python;
# looking a tree's data up here hits by identity for trees built by this module (and still
# answers, more slowly, for trees from lark or built by hand).
RULE_NAMES: dict[Any, str] = {token: name for name, token in _RULES.items()}


# The grammar's wrapper rules: a node of one of these with one child stands for that child. A
# frozenset, not a tuple: node.data is a lark Token, and `in tuple` calls Token.__eq__ per item
# (measured: a quarter of the load time of a 2,000-rule policy).
PASSTHROUGH = frozenset(
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
        "paren_expr",
    )
)


def rule_name(data: Any) -> str:
    """A tree's rule name as a plain str (`data` itself if it names no rule of the grammar)."""
    return RULE_NAMES.get(data, data)


_EXPR, _OR, _AND, _REL, _ADD, _MUL, _UNARY, _MEMBER, _PRIMARY = (
    _RULES[n]
    for n in (
        "expr",
        "conditionalor",
        "conditionaland",
        "relation",
        "addition",
        "multiplication",
        "unary",
        "member",
        "primary",
    )
)
_REL_OPS = {
    "<": "relation_lt",
    "<=": "relation_le",
    ">": "relation_gt",
    ">=": "relation_ge",
    "==": "relation_eq",
    "!=": "relation_ne",
    "in": "relation_in",
}
_MUL_OPS = {"*": "multiplication_mul", "/": "multiplication_div", "%": "multiplication_mod"}
# Words a CEL identifier cannot be (cel-spec: the literals, `in`, and the reserved words): a list or
# define so named would never be read by a condition, which would see the literal or a syntax error
CEL_RESERVED_WORDS = frozenset(
    (
        "true",
        "false",
        "null",
        "in",
        "as",
        "break",
        "const",
        "continue",
        "else",
        "for",
        "function",
        "if",
        "import",
        "let",
        "loop",
        "package",
        "namespace",
        "return",
        "var",
        "void",
        "while",
    )
)
# the reserved words this parser leaves to cel-python's (true and false it reads as literals)
_AWKWARD_WORDS = CEL_RESERVED_WORDS - {"true", "false"}

# One token: (kind, text, start). Kinds: name, str, int, op, end.
_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\n\f\r]+)
  | (?P<name>[_a-zA-Z][_a-zA-Z0-9]*)
  | (?P<str>"[^"\\\n\r]*"(?!")|'[^'\\\n\r]*'(?!'))
  | (?P<int>[0-9]+)
  | (?P<op>==|!=|<=|>=|&&|\|\||[<>!()\[\],.+*%]|/(?!/))
""",
    re.VERBOSE,
)
# after these, the lexer would read something longer or different: give up
_NUMBER_TAIL = frozenset("._xXuUeE" + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class _GiveUp(Exception):  # noqa: N818
    pass


class _Pos:
    """Position of an anonymous token (punctuation): what lark's position propagation reads."""

    __slots__ = ("line", "column", "start_pos", "end_line", "end_column", "end_pos")

    def __init__(self, line: int, column: int, start: int, length: int):
        self.line = self.end_line = line
        self.column = column
        self.end_column = column + length
        self.start_pos = start
        self.end_pos = start + length


_new_meta = Meta.__new__


def _tree(name: Token, children: list[Any], raw: list[Any]) -> Tree:
    """A lark tree with the meta lark's PropagatePositions computes from the raw children
    (trees and every token, the filtered punctuation included)."""
    meta = _new_meta(Meta)
    first = raw[0]
    last = raw[-1]
    d = meta.__dict__
    d["empty"] = False
    if isinstance(first, Tree):
        fd = first._meta.__dict__
        d["line"] = line = fd["container_line"]
        d["column"] = column = fd["container_column"]
        d["start_pos"] = start = fd["container_start_pos"]
    else:
        d["line"] = line = first.line
        d["column"] = column = first.column
        d["start_pos"] = start = first.start_pos
    d["container_line"] = line
    d["container_column"] = column
    d["container_start_pos"] = start
    if isinstance(last, Tree):
        ld = last._meta.__dict__
        d["end_line"] = line = ld["container_end_line"]
        d["end_column"] = column = ld["container_end_column"]
        d["end_pos"] = end = ld["container_end_pos"]
    else:
        d["end_line"] = line = last.end_line
        d["end_column"] = column = last.end_column
        d["end_pos"] = end = last.end_pos
    d["container_end_line"] = line
    d["container_end_column"] = column
    d["container_end_pos"] = end
    return Tree(name, children, meta)


def _wrap(name: Token, child: Tree) -> Tree:
    """A one-child tree (expr > conditionalor > ... > primary chains): its positions are its
    child's, and so is its meta object (shared: nothing writes to a parsed tree's meta, and one
    object instead of nine per chain saves memory and load time)."""
    return Tree(name, [child], child._meta)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = self._lex(text)
        self.i = 0

    @staticmethod
    def _lex(text: str) -> list[tuple[str, str, int, int, int]]:
        """(kind, text, start, line, column) per token, ending with an 'end' token."""
        out: list[tuple[str, str, int, int, int]] = []
        pos = 0
        line, line_start = 1, 0
        n = len(text)
        match = _TOKEN.match
        while pos < n:
            m = match(text, pos)
            if m is None:
                raise _GiveUp
            kind: str = m.lastgroup  # type: ignore[assignment]  # every alternative of _TOKEN is a named group
            end = m.end()
            if kind == "ws":
                newlines = text.count("\n", pos, end)
                if newlines:
                    line += newlines
                    line_start = text.rindex("\n", pos, end) + 1
                pos = end
                continue
            value = m.group()
            if end < n:
                following = text[end]
                if kind == "int" and following in _NUMBER_TAIL:
                    raise _GiveUp
                if kind == "name" and following in "\"'":
                    raise _GiveUp  # r"..", b'..' prefixes
            out.append((kind, value, pos, line, pos - line_start + 1))
            pos = end
        out.append(("end", "", n, line, n - line_start + 1))
        return out

    # -- token helpers

    def peek(self) -> tuple[str, str, int, int, int]:
        return self.tokens[self.i]

    def take_op(self, op: str) -> _Pos:
        kind, value, start, line, column = self.tokens[self.i]
        if kind != "op" or value != op:
            raise _GiveUp
        self.i += 1
        return _Pos(line, column, start, len(op))

    def anon(self) -> _Pos:
        """Consume the current token as punctuation/keyword and return its position."""
        kind, value, start, line, column = self.tokens[self.i]
        self.i += 1
        return _Pos(line, column, start, len(value))

    def named(self, kind: str, value: str, start: int, line: int, column: int) -> Token:
        self.i += 1
        return Token(kind, value, start, line, column, line, column + len(value), start + len(value))

    # -- grammar (celpy/cel.lark), operators left-associative as the LALR grammar builds them

    def expr(self) -> Tree:
        node = _wrap(_EXPR, self.conditionalor())
        kind, value = self.tokens[self.i][:2]
        if kind == "op" or kind == "end" or kind == "name" and value == "in":
            return node
        raise _GiveUp

    def conditionalor(self) -> Tree:
        node = _wrap(_OR, self.conditionaland())
        while self.tokens[self.i][1] == "||" and self.tokens[self.i][0] == "op":
            op = self.anon()
            right = self.conditionaland()
            node = _tree(_OR, [node, right], [node, op, right])
        return node

    def conditionaland(self) -> Tree:
        node = _wrap(_AND, self.relation())
        while self.tokens[self.i][1] == "&&" and self.tokens[self.i][0] == "op":
            op = self.anon()
            right = self.relation()
            node = _tree(_AND, [node, right], [node, op, right])
        return node

    def relation(self) -> Tree:
        node = _wrap(_REL, self.addition())
        while True:
            kind, value = self.tokens[self.i][:2]
            if not ((kind == "op" or (kind == "name" and value == "in")) and value in _REL_OPS):
                return node
            op = self.anon()
            left = _tree(_RULES[_REL_OPS[value]], [node], [node, op])
            right = self.addition()
            node = _tree(_REL, [left, right], [left, right])

    def addition(self) -> Tree:
        node = _wrap(_ADD, self.multiplication())
        while self.tokens[self.i][1] == "+" and self.tokens[self.i][0] == "op":
            op = self.anon()
            left = _tree(_RULES["addition_add"], [node], [node, op])
            right = self.multiplication()
            node = _tree(_ADD, [left, right], [left, right])
        return node

    def multiplication(self) -> Tree:
        node = _wrap(_MUL, self.unary())
        while True:
            kind, value = self.tokens[self.i][:2]
            if kind != "op" or value not in _MUL_OPS:
                return node
            op = self.anon()
            left = _tree(_RULES[_MUL_OPS[value]], [node], [node, op])
            right = self.unary()
            node = _tree(_MUL, [left, right], [left, right])

    def unary(self) -> Tree:
        kind, value = self.tokens[self.i][:2]
        if kind == "op" and value == "!":
            op = self.anon()
            not_node = _tree(_RULES["unary_not"], [], [op])
            operand = self.unary()
            return _tree(_UNARY, [not_node, operand], [not_node, operand])
        return _wrap(_UNARY, self.member())

    def member(self) -> Tree:
        node = _wrap(_MEMBER, self.primary())
        while True:
            kind, value = self.tokens[self.i][:2]
            if kind != "op":
                return node
            if value == ".":
                dot = self.anon()
                kind, value, start, line, column = self.tokens[self.i]
                if kind != "name" or value in _AWKWARD_WORDS or value in ("true", "false"):
                    raise _GiveUp
                name = self.named("IDENT", value, start, line, column)
                if self.tokens[self.i][0] == "op" and self.tokens[self.i][1] == "(":
                    opening = self.anon()
                    args = self.arguments(")")
                    closing = self.take_op(")")
                    children = [node, name] + ([args] if args is not None else [])
                    raw = [node, dot, name, opening] + ([args] if args is not None else []) + [closing]
                    inner = _tree(_RULES["member_dot_arg"], children, raw)
                else:
                    inner = _tree(_RULES["member_dot"], [node, name], [node, dot, name])
            elif value == "[":
                opening = self.anon()
                index = self.expr()
                closing = self.take_op("]")
                inner = _tree(_RULES["member_index"], [node, index], [node, opening, index, closing])
            else:
                return node
            node = _wrap(_MEMBER, inner)

    def arguments(self, closing: str) -> Tree | None:
        """An optional exprlist before `closing`."""
        kind, value = self.tokens[self.i][:2]
        if kind == "op" and value == closing:
            return None
        items = [self.expr()]
        raw: list[Any] = [items[0]]
        while self.tokens[self.i][0] == "op" and self.tokens[self.i][1] == ",":
            raw.append(self.anon())
            item = self.expr()
            items.append(item)
            raw.append(item)
        return _tree(_RULES["exprlist"], items, raw)

    def primary(self) -> Tree:
        kind, value, start, line, column = self.tokens[self.i]
        if kind == "name":
            if value in _AWKWARD_WORDS:
                raise _GiveUp
            if value == "true" or value == "false":
                self.i += 1
                token = Token("BOOL_LIT", value)  # what cel-python's IDENT callback makes: no position
                inner = _tree(_RULES["literal"], [token], [token])
            else:
                name = self.named("IDENT", value, start, line, column)
                if self.tokens[self.i][0] == "op" and self.tokens[self.i][1] == "(":
                    opening = self.anon()
                    args = self.arguments(")")
                    closing = self.take_op(")")
                    children = [name] + ([args] if args is not None else [])
                    raw = [name, opening] + ([args] if args is not None else []) + [closing]
                    inner = _tree(_RULES["ident_arg"], children, raw)
                else:
                    inner = _tree(_RULES["ident"], [name], [name])
        elif kind == "str":
            token = self.named("STRING_LIT", value, start, line, column)
            inner = _tree(_RULES["literal"], [token], [token])
        elif kind == "int":
            token = self.named("INT_LIT", value, start, line, column)
            inner = _tree(_RULES["literal"], [token], [token])
        elif kind == "op" and value == "(":
            opening = self.anon()
            body = self.expr()
            closing = self.take_op(")")
            inner = _tree(_RULES["paren_expr"], [body], [opening, body, closing])
        elif kind == "op" and value == "[":
            opening = self.anon()
            args = self.arguments("]")
            closing = self.take_op("]")
            inner = _tree(
                _RULES["list_lit"],
                [args] if args is not None else [],
                [opening] + ([args] if args is not None else []) + [closing],
            )
        else:
            raise _GiveUp
        return _wrap(_PRIMARY, inner)


def parse(text: str) -> Tree | None:
    """The lark tree cel-python's parser would build for `text`, or None to let it parse."""
    try:
        parser = _Parser(text)
        tree = parser.expr()
    except (_GiveUp, RecursionError):
        return None
    if parser.tokens[parser.i][0] != "end":
        return None
    return tree
