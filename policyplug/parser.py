"""Logical lines -> syntax tree (policyplug.nodes), with a pyparsing grammar per statement.

The file structure (which line belongs to which rule or test) is decided by the first word
of each logical line; the statements and clauses themselves are pyparsing grammars. CEL
conditions are kept as text here and parsed by cel-python in the loader, with their
offsets so that CEL errors point into the policy file.
"""

from __future__ import annotations

import re

import pyparsing as pp

from . import nodes
from .diagnostics import DiagnosticSink, Location, did_you_mean
from .lexer import RULE_CLAUSES, TOP_LEVEL_KEYWORDS, LogicalLine, logical_lines

# No packrat: these per-line grammars barely backtrack, and memoising costs more than it saves
# (measured: 0.46 s instead of 0.68 s to parse a 2,000-rule policy).

WINDOWS = ("second", "minute", "hour", "day")
MAX_LIMIT = 1_000_000_000  # `limit N`: at most this N (it must fit every limiter's counters)

# -- shared tokens -----------------------------------------------------------------------------

STRING = pp.QuotedString('"', esc_char="\\", unquote_results=True, convert_whitespace_escapes=True)
_KNOWN_ESCAPES = '"\\nt'  # the contract's three, and tab


def _check_escapes(text: str, loc: int, tokens: pp.ParseResults) -> None:
    """Refuse an escape the language does not define: pyparsing would drop its backslash (`"a\\qb"`
    read as "aqb", `"C:\\files"` as "C:files"), so the text would mean something other than it shows."""
    i = loc + 1
    while i < len(text) and text[i] != '"':
        if text[i] == "\\":
            if i + 1 < len(text) and text[i + 1] not in _KNOWN_ESCAPES:
                raise pp.ParseFatalException(
                    text,
                    i,
                    f"unknown escape '\\{text[i + 1]}' in a string "
                    '(escapes: \\" \\\\ \\n \\t; a backslash itself is \\\\)',
                )
            i += 1
        i += 1


STRING.add_parse_action(_check_escapes)
STRING.set_name('a "quoted string"')
NAME = pp.Regex(r"[A-Za-z_][A-Za-z0-9_]*").set_name("a name")
INTEGER = pp.Regex(r"[0-9]+").set_name("a whole number").set_parse_action(lambda t: int(t[0]))
REST = pp.Regex(r"(?s).+").set_name("a CEL expression")
END = pp.StringEnd().set_name("end of line")


def K(word: str) -> pp.ParserElement:
    return pp.Keyword(word).set_name(f"'{word}'")


def _located(expr: pp.ParserElement, name: str) -> pp.ParserElement:
    """Capture the start offset of expr, so nodes can point at their parts."""
    return pp.Located(expr)(name)


STRING_LIST = (
    pp.Suppress("[") + pp.Optional(pp.DelimitedList(STRING, allow_trailing_delim=True)) + pp.Suppress("]")
)
STRING_LIST.set_name('a list ["...", ...]')

G_POLICY = K("policy") + STRING("name") + END
G_LOCAL = K("local") + K("domains") + pp.Group(STRING_LIST)("domains") + END
G_LIST = (
    K("list")
    + _located(NAME, "name")
    + pp.Suppress("=")
    + (pp.Group(STRING_LIST)("items") | (K("file") + STRING("path")))
    + END
)
G_DIRECTORY = K("directory") + STRING("path") + END
G_DEFINE = K("define") + _located(NAME, "name") + pp.Suppress("=") + _located(REST, "expr")
G_INCLUDE = K("include") + STRING("path") + END
G_DEFAULT = (
    K("default")
    + (K("allow")("effect") | (K("deny")("effect") + pp.Optional(STRING("reason"))) | K("drop")("effect"))
    + END
)
G_ON_ERROR = K("on") + K("error") + K("deny") + END
G_BLOCK_HEAD = (K("rule") | K("test"))("keyword") + _located(NAME, "name") + pp.Suppress(":") + END

G_ON = K("on") + pp.DelimitedList(_located(NAME, "kind"))("kinds") + END
G_WHEN = (K("when") | K("unless"))("keyword") + _located(REST, "expr")
G_LIMIT = (
    K("limit")
    + _located(INTEGER, "count_located")
    + K("per")
    + pp.one_of(WINDOWS, as_keyword=True)("window")
    + K("by")
    + _located(REST, "expr")
)
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
    "allow": G_ALLOW,
    "deny": G_DENY,
    "drop": G_DROP,
    "redirect": G_REDIRECT,
    "route": G_ROUTE,
    "copy": G_COPY,
    "disclaimer": G_DISCLAIMER,
    "audit": G_AUDIT,
    "tag": G_TAG,
}

# -- tests ---------------------------------------------------------------------------------------

CEL_MAP = pp.original_text_for(
    pp.nested_expr(
        "{", "}", ignore_expr=pp.QuotedString('"', esc_char="\\") | pp.QuotedString("'", esc_char="\\")
    )
)
CEL_MAP.set_name("a CEL map {...}")
EVENT_FIELD = (
    (K("body") + _located(STRING, "body"))
    | (K("at") + _located(STRING, "at"))
    | (K("with") + _located(CEL_MAP, "with_map"))
)
G_TEST_EVENT = (
    _located(NAME, "kind")
    + K("from")
    + _located(STRING, "sender")
    + K("to")
    + _located(STRING, "recipient")
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
G_EXPECT = (
    K("expect")
    + (
        K("allow")("decision")
        | K("deny")("decision")
        | K("drop")("decision")
        | (K("redirect")("decision") + K("to") + STRING("redirect_to"))
    )
    + pp.ZeroOrMore(EXPECT_FIELD)
)
G_TEST_BODY = (
    pp.Group(G_TEST_EVENT)("event")
    + pp.Optional(K("repeat") + INTEGER("repeat"))
    + pp.Group(G_EXPECT)("expect")
    + END
)

# pyparsing expands tabs to 8 columns before it parses unless told not to: offsets (and so every
# column a diagnostic names) would be off on a line with a tab, and a tab inside a "string" or a CEL
# condition would become spaces. Every grammar that parse_string is called on keeps them.
for _grammar in (
    G_POLICY,
    G_LOCAL,
    G_LIST,
    G_DIRECTORY,
    G_DEFINE,
    G_INCLUDE,
    G_DEFAULT,
    G_ON_ERROR,
    G_BLOCK_HEAD,
    G_ON,
    G_WHEN,
    G_LIMIT,
    *CLAUSE_GRAMMARS.values(),
    G_TEST_BODY,
):
    _grammar.parse_with_tabs()


# -- fast paths ----------------------------------------------------------------------------------
# Most lines of a large policy are `rule NAME:`, `on KIND, ...`, `when CONDITION` and an effect.
# These small scanners read exactly what the grammars above accept for such lines (same
# whitespace, keyword boundaries and positions) and give up (None) on anything else, which then
# goes through the pyparsing grammar: it has the last word and writes every error message.
# tests/test_parser_fast.py checks that both give the same nodes.

_WHITE = frozenset(" \n\t\r")  # pyparsing's default whitespace
_KEYWORD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_$")
_NAME_AT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLAIN_STRING_AT = re.compile(r'"([^"\\\n\r]*)"')  # a "string" without escapes


def _skip(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WHITE:
        i += 1
    return i


def _keyword(text: str, i: int, word: str) -> int:
    """Position after `word` at i (after whitespace), or -1; a keyword must end at a non-name char.

    A line with a tab is left to pyparsing (its grammars keep tabs, see parse_with_tabs above)."""
    if "\t" in text:
        return -1
    i = _skip(text, i)
    end = i + len(word)
    if not text.startswith(word, i) or (end < len(text) and text[end] in _KEYWORD_CHARS):
        return -1
    return end


def _at_end(text: str, i: int) -> bool:
    return _skip(text, i) == len(text)


def _fast_string(text: str, i: int) -> tuple[str, int] | None:
    match = _PLAIN_STRING_AT.match(text, _skip(text, i))
    return (match.group(1), match.end()) if match else None


def _fast_rest(line: LogicalLine, word: str) -> nodes.Expression | None:
    """`when|unless|define ... REST`: the expression after the keyword."""
    text = line.text
    i = _keyword(text, 0, word)
    if i < 0:
        return None
    start = _skip(text, i)
    if start >= len(text):
        return None
    return _expression_at(line, start, text[start:])


def _fast_names(line: LogicalLine, word: str) -> list[tuple[str, int, int]] | None:
    """`on NAME, NAME, ...`: (name, start, end) each."""
    text = line.text
    i = _keyword(text, 0, word)
    if i < 0:
        return None
    names = []
    while True:
        match = _NAME_AT.match(text, _skip(text, i))
        if match is None:
            return None
        names.append((match.group(), match.start(), match.end()))
        i = _skip(text, match.end())
        if i == len(text):
            return names
        if text[i] != ",":
            return None
        i += 1


def _fast_effect(line: LogicalLine, word: str) -> tuple[str | None] | None:
    """An effect or obligation clause: (argument,), or None when the fast path does not apply."""
    text = line.text
    i = _keyword(text, 0, word)
    if i < 0:
        return None
    second = {"copy": "to", "redirect": "to", "route": "via"}.get(word)
    if second is not None:
        i = _keyword(text, i, second)
        if i < 0:
            return None
    if word in ("allow", "drop", "audit") or (word == "deny" and _at_end(text, i)):
        return (None,) if _at_end(text, i) else None
    found = _fast_string(text, i)
    if found is None or not _at_end(text, found[1]):
        return None
    return (found[0],)


def _fast_block_head(line: LogicalLine, word: str) -> tuple[str, int, int] | None:
    """`rule NAME:` or `test NAME:`: (name, start, end)."""
    text = line.text
    i = _keyword(text, 0, word)
    if i < 0:
        return None
    match = _NAME_AT.match(text, _skip(text, i))
    if match is None:
        return None
    i = _skip(text, match.end())
    if i == len(text) or text[i] != ":" or not _at_end(text, i + 1):
        return None
    return match.group(), match.start(), match.end()


def _parse(
    grammar: pp.ParserElement, line: LogicalLine, sink: DiagnosticSink, what: str
) -> pp.ParseResults | None:
    try:
        return grammar.parse_string(line.text, parse_all=True)
    except pp.ParseFatalException as exc:  # a located problem inside a token (_check_escapes)
        sink.error(line.location(exc.loc, 2), exc.msg)
        return None
    except pp.ParseException as exc:
        found = line.text[exc.loc : exc.loc + 12].split("\n")[0].split(" ")[0]
        found_text = f", found '{found}'" if found else ", found end of line"
        expected = exc.msg.removeprefix("Expected ")
        if ", found" in expected:
            expected = expected.split(", found")[0]
        sink.error(
            line.location(exc.loc, max(1, len(found))), f"invalid {what}: expected {expected}{found_text}"
        )
        return None


def _value(located: pp.ParseResults) -> str:
    """The text of a Located match ([start, [tokens], end])."""
    text: str = located[1][0]
    return text


def _loc(line: LogicalLine, located: pp.ParseResults) -> Location:
    start, end = located[0], located[2]
    return line.location(start, max(1, end - start))


def _expression(line: LogicalLine, located: pp.ParseResults) -> nodes.Expression:
    return _expression_at(line, located[0], _value(located))


def _expression_at(line: LogicalLine, start: int, text: str) -> nodes.Expression:
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
            sink.error(
                line.location(0, max(1, len(word))),
                f"expected a statement ({', '.join(TOP_LEVEL_KEYWORDS)}), found '{word or line.text[:1]}'{hint}",
            )
    close_block()
    return tree


def _parse_top_level(
    word: str, line: LogicalLine, sink: DiagnosticSink, is_on_error: bool
) -> nodes.Node | None:
    here = line.location(0, max(1, len(word)))
    if is_on_error:
        return (
            nodes.OnErrorDeny(here)
            if _parse(G_ON_ERROR, line, sink, "'on error' statement") is not None
            else None
        )
    if word in ("rule", "test"):
        head = _fast_block_head(line, word)
        if head is not None:
            name, start, end = head
            name_loc = line.location(start, max(1, end - start))
        else:
            r = _parse(G_BLOCK_HEAD, line, sink, f"{word} header (expected '{word} NAME:')")
            if r is None:
                return None
            name, name_loc = _value(r["name"]), _loc(line, r["name"])
        if word == "rule":
            return nodes.Rule(name_loc, name)
        return nodes.Test(name_loc, name)
    grammar = {
        "policy": G_POLICY,
        "local": G_LOCAL,
        "list": G_LIST,
        "directory": G_DIRECTORY,
        "define": G_DEFINE,
        "include": G_INCLUDE,
        "default": G_DEFAULT,
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
    return nodes.Default(here, r["effect"], r["reason"] if "reason" in r else None)


def _parse_clause(rule: nodes.Rule, line: LogicalLine, sink: DiagnosticSink) -> None:
    word = line.first_word
    here = line.location(0, max(1, len(word)))
    if word not in RULE_CLAUSES:
        hint = did_you_mean(word, RULE_CLAUSES + TOP_LEVEL_KEYWORDS) if word else ""
        sink.error(here, f"unknown clause '{word or line.text.strip()[:10]}' in rule '{rule.name}'{hint}")
        return
    if word == "on":
        names = _fast_names(line, word)
        if names is None:
            r = _parse(G_ON, line, sink, "'on' clause (expected 'on KIND, KIND, ...')")
            if r is None:
                return
            names = [(_value(located), located[0], located[2]) for located in r["kinds"]]
        if rule.kinds is not None:
            sink.error(here, f"rule '{rule.name}' has two 'on' clauses")
        kinds = []
        for kind, start, end in names:
            if kind not in nodes.EVENT_KINDS:
                sink.error(
                    line.location(start, max(1, end - start)),
                    f"unknown event kind '{kind}'{did_you_mean(kind, nodes.EVENT_KINDS)}",
                )
            kinds.append(kind)
        rule.kinds = kinds
        rule.kinds_location = here
        rule.clause_order.append(nodes.Obligation(here, "on", ", ".join(kinds)))
        return
    if word in ("when", "unless"):
        expression = _fast_rest(line, word)
        if expression is None:
            r = _parse(G_WHEN, line, sink, f"'{word}' clause (expected '{word} CONDITION')")
            if r is None:
                return
            expression = _expression(line, r["expr"])
        (rule.when if word == "when" else rule.unless).append(expression)
        rule.clause_order.append(nodes.Obligation(here, word, expression.text))
        return
    if word == "limit":
        r = _parse(
            G_LIMIT, line, sink, "'limit' clause (expected 'limit N per second|minute|hour|day by KEY')"
        )
        if r is None:
            return
        if rule.limit is not None:
            sink.error(here, f"rule '{rule.name}' has two 'limit' clauses")
        count, count_at = r["count_located"][1][0], r["count_located"][0]
        if count < 1:
            sink.error(here, "a limit must allow at least 1 event")
        elif count > MAX_LIMIT:
            # a count no window could ever hold is a typo; unchecked, deciding raised OverflowError
            sink.error(
                line.location(count_at, max(1, r["count_located"][2] - count_at)),
                f"a limit may allow at most {MAX_LIMIT:,} events",
            )
        rule.limit = nodes.Limit(here, count, r["window"], _expression(line, r["expr"]))
        rule.clause_order.append(rule.limit)
        return
    fast = _fast_effect(line, word)
    if fast is not None:
        argument = fast[0]
    else:
        r = _parse(CLAUSE_GRAMMARS[word], line, sink, f"'{word}' clause")
        if r is None:
            return
        argument = r["argument"] if "argument" in r else None
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
    offsets: list[int] = []
    pieces: list[str] = []
    for line in lines:
        offsets.append(sum(len(p) + 1 for p in pieces))
        pieces.append(line.text)
    joined = "\n".join(pieces)

    def locate(offset: int, length: int = 1) -> Location:
        index = max(i for i, o in enumerate(offsets) if o <= offset) if offset >= 0 else 0
        return lines[index].location(offset - offsets[index], length)

    try:
        r = G_TEST_BODY.parse_string(joined, parse_all=True)
    except pp.ParseFatalException as exc:  # a located problem inside a token (_check_escapes)
        sink.error(locate(exc.loc, 2), exc.msg)
        return
    except pp.ParseException as exc:
        found = joined[exc.loc : exc.loc + 12].split()[0] if joined[exc.loc :].strip() else ""
        expected = exc.msg.removeprefix("Expected ").split(", found")[0]
        sink.error(
            locate(exc.loc, max(1, len(found))),
            f"invalid test '{test.name}': expected {expected}, found '{found or 'end of test'}'"
            ' (a test is: KIND from "A" to "B" [body ..] [at ..] [with {..}] [repeat N] expect ...)',
        )
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

    def field(name: str) -> tuple[str | None, Location | None]:
        """A located string of the event line: its text, and where it is (quotes included)."""
        if name not in ev:
            return None, None
        start, end = ev[name][0], ev[name][2]
        return _value(ev[name]), locate(start, max(1, end - start))

    (sender, sender_loc), (recipient, recipient_loc) = field("sender"), field("recipient")
    (body, body_loc), (at, at_loc) = field("body"), field("at")
    assert sender is not None and recipient is not None
    test.event = nodes.TestEvent(
        kind_loc,
        kind,
        sender,
        recipient,
        body,
        at,
        with_map,
        sender_location=sender_loc,
        recipient_location=recipient_loc,
        body_location=body_loc,
        at_location=at_loc,
    )
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
