"""A Python regular expression as a GBNF expression: the language `re.fullmatch` accepts, read by Python's
own regex parser, written in the GBNF subset that llama.cpp and xgrammar both parse.

Inside a JSON string (a schema's `pattern`, which JSON Schema searches for rather than matches whole) a
character JSON must escape is written escaped, and classes never match a quote, a backslash or a control
character. Anchors at the ends are dropped; lookarounds, backreferences and word boundaries have no
grammar and are refused.
"""

from __future__ import annotations

import re
from re import _constants as sre  # type: ignore[attr-defined]
from re import _parser as sre_parser  # type: ignore[attr-defined]

MAX_CHAR = 0x10FFFF
JSON_UNSAFE = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]  # control characters, '"', '\'
CATEGORIES = {
    sre.CATEGORY_DIGIT: [(0x30, 0x39)],
    sre.CATEGORY_SPACE: [(0x09, 0x0D), (0x20, 0x20)],
    sre.CATEGORY_WORD: [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],  # ASCII: narrower than \w, never wider
}
NEGATED = {
    sre.CATEGORY_NOT_DIGIT: sre.CATEGORY_DIGIT,
    sre.CATEGORY_NOT_SPACE: sre.CATEGORY_SPACE,
    sre.CATEGORY_NOT_WORD: sre.CATEGORY_WORD,
}


class RegexGrammarError(ValueError):
    pass


def _subtract(ranges: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for lo, hi in ranges:
        pieces = [(lo, hi)]
        for c_lo, c_hi in cut:
            pieces = [p for a, b in pieces for p in ((a, min(b, c_lo - 1)), (max(a, c_hi + 1), b)) if p[0] <= p[1]]
        out += pieces
    return out


def _complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return _subtract([(0, MAX_CHAR)], ranges)


def _char(code: int, in_class: bool = False) -> str:
    """A character inside a GBNF string or class, escaped where either parser would misread it."""
    ch = chr(code)
    escaped = {'"': '\\"', "\\": "\\\\"} if not in_class else {"\\": "\\\\", "]": "\\]", "[": "\\["}
    if ch in escaped:
        return escaped[ch]
    if ch.isprintable() and not (in_class and ch in "-^"):
        return ch
    # fixed-width escapes: xgrammar reads \\x greedily (\\x28a is one character), llama.cpp reads two digits
    return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"


def literal(text: str) -> str:
    """A GBNF string that matches exactly `text`."""
    return '"' + "".join(_char(ord(c)) for c in text) + '"'


class _Writer:
    def __init__(self, json_string: bool, dotall: bool):
        self.json, self.dotall = json_string, dotall

    def chars(self, ranges: list[tuple[int, int]]) -> str:
        if self.json:
            ranges = _subtract(ranges, JSON_UNSAFE)
        if not ranges:
            raise RegexGrammarError("a character class that matches nothing here")
        if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
            return self.text(chr(ranges[0][0]))
        return (
            "[" + "".join(_char(a, True) if a == b else f"{_char(a, True)}-{_char(b, True)}" for a, b in ranges) + "]"
        )

    def text(self, text: str) -> str:
        if self.json:  # as JSON writes it inside a string
            text = "".join(c if c not in '"\\' and ord(c) >= 0x20 else _json_escape(c) for c in text)
        return literal(text)

    def sequence(self, items: list[tuple[object, object]], top: bool = False) -> str:
        parts: list[str] = []
        pending = ""
        for index, (op, arg) in enumerate(items):
            if op is sre.LITERAL:
                pending += chr(arg)
                continue
            if pending:
                parts.append(self.text(pending))
                pending = ""
            if op is sre.AT:
                at_edge = top and (
                    (index == 0 and arg is sre.AT_BEGINNING) or (index == len(items) - 1 and arg is sre.AT_END)
                )
                if not at_edge:
                    raise RegexGrammarError("anchors and word boundaries only at the ends")
                continue
            parts.append(self.node(op, arg))
        if pending:
            parts.append(self.text(pending))
        return " ".join(parts) if parts else '""'

    def node(self, op: object, arg: object) -> str:
        if op is sre.NOT_LITERAL:
            return self.chars(_complement([(arg, arg)]))
        if op is sre.ANY:
            return self.chars([(0, MAX_CHAR)] if self.dotall else _complement([(0x0A, 0x0A)]))
        if op is sre.IN:
            return self.chars(self.char_class(arg))
        if op is sre.BRANCH:
            return "(" + " | ".join(self.sequence(list(branch)) for branch in arg[1]) + ")"
        if op is sre.SUBPATTERN:
            return "(" + self.sequence(list(arg[3])) + ")"
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            low, high, body = arg
            inner = "(" + self.sequence(list(body)) + ")"
            if high is sre.MAXREPEAT:
                return inner + {0: "*", 1: "+"}.get(low, f"{{{low},}}")
            return inner + ("?" if (low, high) == (0, 1) else f"{{{low}}}" if low == high else f"{{{low},{high}}}")
        raise RegexGrammarError(f"{str(op).lower()} has no grammar (lookarounds, backreferences, conditionals)")

    def char_class(self, items: list[tuple[object, object]]) -> list[tuple[int, int]]:
        negate = bool(items) and items[0][0] is sre.NEGATE
        ranges: list[tuple[int, int]] = []
        for op, arg in items[1:] if negate else items:
            if op is sre.LITERAL:
                ranges.append((arg, arg))
            elif op is sre.RANGE:
                ranges.append(arg)
            elif op is sre.CATEGORY and arg in CATEGORIES:
                ranges += CATEGORIES[arg]
            elif op is sre.CATEGORY and arg in NEGATED:
                ranges += _complement(CATEGORIES[NEGATED[arg]])
            else:
                raise RegexGrammarError(f"{arg} in a character class has no grammar")
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(ranges):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        return _complement(merged) if negate else merged


def _json_escape(c: str) -> str:
    return {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c, f"\\u{ord(c):04x}")


def regex_gbnf(pattern: str, dotall: bool = True, json_string: bool = False) -> str:
    """The GBNF expression of what `re.fullmatch(pattern, text)` accepts (ASCII \\w, \\d, \\s), or in a JSON
    string what `re.search` finds the pattern in (any text around it where an anchor does not forbid it)."""
    try:
        parsed = sre_parser.parse(pattern, re.DOTALL if dotall else 0)
    except re.error as exc:
        raise RegexGrammarError(f"not a valid regular expression ({exc})") from None
    if parsed.state.flags & (re.IGNORECASE | re.MULTILINE):
        raise RegexGrammarError("inline flags (?i) and (?m) have no grammar")
    writer = _Writer(json_string, dotall)
    items = list(parsed)
    body = writer.sequence(items, top=True)
    if not json_string:
        return body
    anywhere = writer.node(sre.ANY, None) + "*"
    starts = bool(items) and items[0] == (sre.AT, sre.AT_BEGINNING)
    ends = bool(items) and items[-1] == (sre.AT, sre.AT_END)
    return " ".join([*([] if starts else [anywhere]), body, *([] if ends else [anywhere])])
