"""Logical lines -> syntax tree (policyplug.nodes), with a pyparsing grammar per statement.

The file structure (which line belongs to which rule or test) is decided by the first word
of each logical line; the statements and clauses themselves are pyparsing grammars. CEL
conditions are kept as text here and parsed by cel-python in the loader, with their
offsets so that CEL errors point into the policy file.
"""

from __future__ import annotations

import pyparsing as pp

from . import nodes
from .diagnostics import DiagnosticSink, Location, did_you_mean
from .lexer import LogicalLine, logical_lines

# No packrat: these per-line grammars barely backtrack, and memoising costs more than it saves
# (measured: 0.46 s instead of 0.68 s to parse a 2,000-rule policy).

TOP_LEVEL_KEYWORDS = ("policy", "local", "list", "directory", "define", "include", "default", "rule", "test")
RULE_CLAUSES = ("on", "when", "unless", "limit", "allow", "deny", "drop", "redirect", "route", "copy",
                "disclaimer", "audit", "tag")
WINDOWS = ("second", "minute", "hour", "day")

# -- shared tokens -----------------------------------------------------------------------------

STRING = pp.QuotedString('"', esc_char="\\", unquote_results=True, convert_whitespace_escapes=True)
STRING.set_name('a "quoted string"')
NAME = pp.Regex(r"[A-Za-z_][A-Za-z0-9_]*").set_name("a name")
INTEGER = pp.Regex(r"[0-9]+").set_name("a whole number").set_parse_action(lambda t: int(t[0]))
REST = pp.Regex(r"(?s).+").set_name("a CEL expression")
END = pp.StringEnd().set_name("end of line")


def K(word: str) -> pp.Keyword:
    return pp.Keyword(word).set_name(f"'{word}'")


def _located(expr: pp.ParserElement, name: str) -> pp.ParserElement:
    """Capture the start offset of expr, so nodes can point at their parts."""
    return pp.Located(expr)(name)


STRING_LIST = pp.Suppress("[") + pp.Optional(pp.DelimitedList(STRING, allow_trailing_delim=True)) + pp.Suppress("]")
STRING_LIST.set_name('a list ["...", ...]')

G_POLICY = K("policy") + STRING("name") + END
G_LOCAL = K("local") + K("domains") + pp.Group(STRING_LIST)("domains") + END
G_LIST = (K("list") + _located(NAME, "name") + pp.Suppress("=")
          + (pp.Group(STRING_LIST)("items") | (K("file") + STRING("path"))) + END)
G_DIRECTORY = K("directory") + STRING("path") + END
G_DEFINE = K("define") + _located(NAME, "name") + pp.Suppress("=") + _located(REST, "expr")
G_INCLUDE = K("include") + STRING("path") + END
G_DEFAULT = K("default") + (
    K("allow")("effect") | (K("deny")("effect") + pp.Optional(STRING("reason"))) | K("drop")("effect")
) + END
G_ON_ERROR = K("on") + K("error") + K("deny") + END
G_BLOCK_HEAD = (K("rule") | K("test"))("keyword") + _located(NAME, "name") + pp.Suppress(":") + END

G_ON = K("on") + pp.DelimitedList(_located(NAME, "kind"))("kinds") + END
G_WHEN = (K("when") | K("unless"))("keyword") + _located(REST, "expr")
G_LIMIT = (K("limit") + INTEGER("count") + K("per") + pp.one_of(WINDOWS, as_keyword=True)("window")
           + K("by") + _located(REST, "expr"))
G_ALLOW = K("allow") + END
G_DENY = K("deny") + pp.Optional(STRING("argument")) + END
G_DROP = K("drop") + END
G_REDIRECT = K("redirect") + K("to") + STRING("argument") + END
G_ROUTE = K("route") + K("via") + STRING("argument") + END
G_COPY = K("copy") + K("to") + STRING("argument") + END
G_DISCLAIMER = K("disclaimer") + STRING("argument") + END
G_AUDIT = K("audit") + END
G_TAG = K("tag") + STRING("argument") + END

CLAUSE_GRAMMARS = {
    "allow": G_ALLOW, "deny": G_DENY, "drop": G_DROP, "redirect": G_REDIRECT,
    "route": G_ROUTE, "copy": G_COPY, "disclaimer": G_DISCLAIMER, "audit": G_AUDIT, "tag": G_TAG,
}

# -- tests ---------------------------------------------------------------------------------------

CEL_MAP = pp.original_text_for(pp.nested_expr("{", "}", ignore_expr=pp.QuotedString('"', esc_char="\\")
                                              | pp.QuotedString("'", esc_char="\\")))
CEL_MAP.set_name("a CEL map {...}")
EVENT_FIELD = (
    (K("body") + STRING("body"))
    | (K("at") + STRING("at"))
    | (K("with") + _located(CEL_MAP, "with_map"))
)
G_TEST_EVENT = (
    _located(NAME, "kind") + K("from") + STRING("sender") + K("to") + STRING("recipient")
    + pp.ZeroOrMore(EVENT_FIELD)
)
EXPECT_FIELD = (
    (K("by") + _located(NAME, "by"))
    | (K("reason") + STRING("reason"))
    | (K("copy") + K("to") + STRING("copy_to*"))
    | (K("route") + K("via") + STRING("route_via"))
    | (K("tag") + STRING("tag*"))
    | (K("disclaimer") + STRING("disclaimer*"))
)
G_EXPECT = K("expect") + (
    K("allow")("decision") | K("deny")("decision") | K("drop")("decision")
    | (K("redirect")("decision") + K("to") + STRING("redirect_to"))
) + pp.ZeroOrMore(EXPECT_FIELD)
G_TEST_BODY = (
    pp.Group(G_TEST_EVENT)("event") + pp.Optional(K("repeat") + INTEGER("repeat"))
    + pp.Group(G_EXPECT)("expect") + END
)


def _parse(grammar: pp.ParserElement, line: LogicalLine, sink: DiagnosticSink, what: str) -> pp.ParseResults | None:
    try:
        return grammar.parse_string(line.text, parse_all=True)
    except pp.ParseException as exc:
        found = line.text[exc.loc:exc.loc + 12].split("\n")[0].split(" ")[0]
        found_text = f", found '{found}'" if found else ", found end of line"
        expected = exc.msg.removeprefix("Expected ")
        if ", found" in expected:
            expected = expected.split(", found")[0]
        sink.error(line.location(exc.loc, max(1, len(found))), f"invalid {what}: expected {expected}{found_text}")
        return None


def _value(located: pp.ParseResults) -> str:
    """The text of a Located match ([start, [tokens], end])."""
    return located[1][0]


def _loc(line: LogicalLine, located: pp.ParseResults) -> Location:
    start, end = located[0], located[2]
    return line.location(start, max(1, end - start))


def _expression(line: LogicalLine, located: pp.ParseResults) -> nodes.Expression:
    start, text = located[0], _value(located)
    # CEL text keeps its position: `location` is the first character of the expression
    text = text.rstrip()
    return nodes.Expression(line.location(start, max(1, len(text.split("\n")[0]))), text)


def parse_text(text: str, file: str, sink: DiagnosticSink) -> nodes.PolicyFile:
    """Parse one file's text; problems go to `sink`, the tree holds what could be read."""
    sink.add_source(file, text)
    lines, lex_errors = logical_lines(file, text)
    for err in lex_errors:
        sink.error(err.location, err.message)
    tree = nodes.PolicyFile(Location(file, 1, 1), file, [], text)
    block: nodes.Rule | nodes.Test | None = None
    test_lines: list[LogicalLine] = []

    def close_block() -> None:
        nonlocal block, test_lines
        if isinstance(block, nodes.Test):
            _parse_test_body(block, test_lines, sink)
        block = None
        test_lines = []

    for line in lines:
        for comment in line.leading_comments:
            if comment:
                tree.statements.append(nodes.Comment(Location(file, line.line, 1), comment))
        if not line.text:
            continue
        word = line.first_word
        is_on_error = word == "on" and line.text.split()[1:2] == ["error"]
        if word in TOP_LEVEL_KEYWORDS or is_on_error:
            close_block()
            statement = _parse_top_level(word, line, sink, is_on_error)
            if statement is not None:
                tree.statements.append(statement)
                if isinstance(statement, (nodes.Rule, nodes.Test)):
                    block = statement
            continue
        if isinstance(block, nodes.Rule):
            _parse_clause(block, line, sink)
        elif isinstance(block, nodes.Test):
            test_lines.append(line)
        else:
            hint = did_you_mean(word, TOP_LEVEL_KEYWORDS) if word else ""
            sink.error(line.location(0, max(1, len(word))),
                       f"expected a statement ({', '.join(TOP_LEVEL_KEYWORDS)}), found '{word or line.text[:1]}'{hint}")
    close_block()
    return tree


def _parse_top_level(word: str, line: LogicalLine, sink: DiagnosticSink, is_on_error: bool) -> nodes.Node | None:
    here = line.location(0, max(1, len(word)))
    if is_on_error:
        return nodes.OnErrorDeny(here) if _parse(G_ON_ERROR, line, sink, "'on error' statement") is not None else None
    if word in ("rule", "test"):
        r = _parse(G_BLOCK_HEAD, line, sink, f"{word} header (expected '{word} NAME:')")
        if r is None:
            return None
        name_loc = _loc(line, r["name"])
        if word == "rule":
            return nodes.Rule(name_loc, _value(r["name"]))
        return nodes.Test(name_loc, _value(r["name"]))
    grammar = {
        "policy": G_POLICY, "local": G_LOCAL, "list": G_LIST, "directory": G_DIRECTORY, "define": G_DEFINE,
        "include": G_INCLUDE, "default": G_DEFAULT,
    }[word]
    r = _parse(grammar, line, sink, f"'{word}' statement")
    if r is None:
        return None
    if word == "policy":
        return nodes.PolicyName(here, r["name"])
    if word == "local":
        return nodes.LocalDomains(here, list(r["domains"]))
    if word == "list":
        name_loc = _loc(line, r["name"])
        if "path" in r:
            return nodes.ListDecl(here, _value(r["name"]), path=r["path"], name_location=name_loc)
        return nodes.ListDecl(here, _value(r["name"]), items=list(r["items"]), name_location=name_loc)
    if word == "directory":
        return nodes.DirectoryDecl(here, r["path"])
    if word == "define":
        return nodes.Define(here, _value(r["name"]), _expression(line, r["expr"]), _loc(line, r["name"]))
    if word == "include":
        return nodes.Include(here, r["path"])
    return nodes.Default(here, r["effect"], r.get("reason"))


def _parse_clause(rule: nodes.Rule, line: LogicalLine, sink: DiagnosticSink) -> None:
    word = line.first_word
    here = line.location(0, max(1, len(word)))
    if word not in RULE_CLAUSES:
        hint = did_you_mean(word, RULE_CLAUSES + TOP_LEVEL_KEYWORDS) if word else ""
        sink.error(here, f"unknown clause '{word or line.text.strip()[:10]}' in rule '{rule.name}'{hint}")
        return
    if word == "on":
        r = _parse(G_ON, line, sink, "'on' clause (expected 'on KIND, KIND, ...')")
        if r is None:
            return
        if rule.kinds is not None:
            sink.error(here, f"rule '{rule.name}' has two 'on' clauses")
        kinds = []
        for located in r["kinds"]:
            kind = _value(located)
            if kind not in nodes.EVENT_KINDS:
                sink.error(_loc(line, located),
                           f"unknown event kind '{kind}'{did_you_mean(kind, nodes.EVENT_KINDS)}")
            kinds.append(kind)
        rule.kinds = kinds
        rule.kinds_location = here
        rule.clause_order.append(nodes.Obligation(here, "on", ", ".join(kinds)))
        return
    if word in ("when", "unless"):
        r = _parse(G_WHEN, line, sink, f"'{word}' clause (expected '{word} CONDITION')")
        if r is None:
            return
        expression = _expression(line, r["expr"])
        (rule.when if word == "when" else rule.unless).append(expression)
        rule.clause_order.append(nodes.Obligation(here, word, expression.text))
        return
    if word == "limit":
        r = _parse(G_LIMIT, line, sink, "'limit' clause (expected 'limit N per second|minute|hour|day by KEY')")
        if r is None:
            return
        if rule.limit is not None:
            sink.error(here, f"rule '{rule.name}' has two 'limit' clauses")
        if r["count"] < 1:
            sink.error(here, "a limit must allow at least 1 event")
        rule.limit = nodes.Limit(here, r["count"], r["window"], _expression(line, r["expr"]))
        rule.clause_order.append(rule.limit)
        return
    r = _parse(CLAUSE_GRAMMARS[word], line, sink, f"'{word}' clause")
    if r is None:
        return
    argument = r.get("argument")
    if word in nodes.TERMINAL_EFFECTS:
        effect = nodes.Effect(here, word, argument)
        rule.effects.append(effect)
        rule.clause_order.append(effect)
    else:
        kind = {"route": "route via", "copy": "copy to"}.get(word, word)
        obligation = nodes.Obligation(here, kind, argument)
        rule.obligations.append(obligation)
        rule.clause_order.append(obligation)


def _parse_test_body(test: nodes.Test, lines: list[LogicalLine], sink: DiagnosticSink) -> None:
    if not lines:
        sink.error(test.location, f"test '{test.name}' has no event and no 'expect'")
        return
    # A test is parsed as one stream of tokens: its fields may be spread over lines freely.
    first = lines[0]
    offsets = []
    pieces = []
    for line in lines:
        offsets.append(sum(len(p) + 1 for p in pieces))
        pieces.append(line.text)
    joined = "\n".join(pieces)

    def locate(offset: int, length: int = 1) -> Location:
        index = max(i for i, o in enumerate(offsets) if o <= offset) if offset >= 0 else 0
        return lines[index].location(offset - offsets[index], length)

    try:
        r = G_TEST_BODY.parse_string(joined, parse_all=True)
    except pp.ParseException as exc:
        found = joined[exc.loc:exc.loc + 12].split()[0] if joined[exc.loc:].strip() else ""
        expected = exc.msg.removeprefix("Expected ").split(", found")[0]
        sink.error(locate(exc.loc, max(1, len(found))),
                   f"invalid test '{test.name}': expected {expected}, found '{found or 'end of test'}'"
                   " (a test is: KIND from \"A\" to \"B\" [body ..] [at ..] [with {..}] [repeat N] expect ...)")
        return
    ev = r["event"]
    kind = _value(ev["kind"])
    kind_loc = locate(ev["kind"][0], len(kind))
    if kind not in nodes.EVENT_KINDS:
        sink.error(kind_loc, f"unknown event kind '{kind}'{did_you_mean(kind, nodes.EVENT_KINDS)}")
    with_map = None
    if "with_map" in ev:
        start, text = ev["with_map"][0], _value(ev["with_map"])
        with_map = nodes.Expression(locate(start, 1), text)
    test.event = nodes.TestEvent(kind_loc, kind, ev["sender"], ev["recipient"], ev.get("body"), ev.get("at"), with_map)
    if "repeat" in r:
        test.repeat = r["repeat"]
        if test.repeat < 1:
            sink.error(first.location(0), "repeat must be at least 1")
        elif test.repeat > 100_000:
            sink.error(first.location(0), "repeat is limited to 100000")
    ex = r["expect"]
    expectation = nodes.Expectation(locate(joined.find("expect"), 6), ex["decision"])
    expectation.redirect_to = ex.get("redirect_to")
    if "by" in ex:
        expectation.by = _value(ex["by"])
        expectation.by_location = locate(ex["by"][0], len(expectation.by))
    expectation.reason = ex.get("reason")
    expectation.route_via = ex.get("route_via")
    expectation.copy_to = list(ex.get("copy_to", []))
    expectation.tags = list(ex.get("tag", []))
    expectation.disclaimers = list(ex.get("disclaimer", []))
    test.expect = expectation
