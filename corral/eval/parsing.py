"""Reading a verdict out of a judge's reply, strictly.

A small judge often echoes the answer it grades (JSON with "a rating of 4.7" inside, a numbered list,
a code block) before giving its own verdict. Taking the last number that looks like a score turns
that echo into a score, so the rules here are:

1. The form the prompt asks for (`[[8]]`, `[[A]]`, `[[8, 6]]`) counts wherever it stands in the
   judge's own text; every such marker must agree, two different ones make the reply unparseable.
2. Any other form counts only as a labelled verdict on the last line ("Rating: 8", "Verdict: A").
3. Quoted or echoed content is never read: fenced and inline code, `>` quotes, double-quoted
   strings (unless the string is just a marker, `"[[A]]"`), and `{...}` JSON.
4. A score of another type or range than the one asked for (`[[8.5]]` when integers are asked,
   `[[11]]` on a 1-10 scale) is unparseable, never rounded or clamped.

Each parser returns None for an unparseable reply; the caller records it as `parsed: false`, with
`unparsed_reason`. `verdict_span` says where in the reply the parsed verdict stands, for reading the
judge's token probabilities there (scoring=expected).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FENCED = re.compile(r"(```|~~~).*?(\1|\Z)", re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_QUOTE_LINE = re.compile(r"^\s*>.*$", re.MULTILINE)
_DOUBLE_QUOTED = re.compile(r"[\"“]([^\"“”\n]*)[\"”]")
_INNER_BRACES = re.compile(r"\{[^{}]*\}")
_MARKER = re.compile(r"\[\[([^\[\]\n]*)\]\]")
_BOLD = r"[*_]*"


@dataclass(frozen=True)
class Scale:
    """The scores a prompt asks for: integers (or decimals) from `low` to `high`."""

    low: int = 1
    high: int = 10
    integer: bool = True

    def read(self, text: str) -> float | None:
        """`text` as a score on this scale (`8`, `8/10` with this scale's top), or None."""
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:(?:/|out of)\s*(\d+))?\s*", text)
        if not m or (m[2] is not None and int(m[2]) != self.high):
            return None
        if self.integer and "." in m[1]:
            return None
        value = float(m[1])
        return value if self.low <= value <= self.high else None


DEFAULT_SCALE = Scale()


def own_text(reply: str) -> str:
    """The judge's reply without quoted or echoed content (code, quotes, quoted strings, JSON)."""
    text = _FENCED.sub(" ", reply)
    text = _INLINE_CODE.sub(" ", text)
    text = _QUOTE_LINE.sub(" ", text)
    text = _DOUBLE_QUOTED.sub(lambda m: m[1] if _MARKER.fullmatch(m[1].strip()) else " ", text)
    while _INNER_BRACES.search(text):  # innermost first, so nested JSON goes too
        text = _INNER_BRACES.sub(" ", text)
    return text


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _one(values: list) -> object | None:
    """The value all markers agree on; None when there is none, or several different ones."""
    return values[0] if values and all(v == values[0] for v in values) else None


def _labelled(line: str, labels: str, value: str) -> re.Match | None:
    """`line` ends with a sentence `LABEL: VALUE` (optionally bold, `is` for the colon, a final period)."""
    pattern = rf"(?:.*[.!?)]\s+)?{_BOLD}(?:(?:my|the|final|overall)\s+)*(?:{labels}){_BOLD}\s*(?::|=|is|-)\s*{_BOLD}\s*{value}\s*{_BOLD}\.?"
    return re.fullmatch(pattern, line, flags=re.IGNORECASE)


def parse_score(reply: str, scale: Scale = DEFAULT_SCALE) -> float | None:
    """One score: `[[8]]` anywhere in the judge's own text, else `Rating: 8` (or `8/10`) as the last line."""
    text = own_text(reply)
    markers = [m.strip() for m in _MARKER.findall(text) if re.search(r"\d", m)]
    if markers:
        values = [scale.read(m) for m in markers]
        return None if None in values else _one(values)
    m = _labelled(_last_line(text), "rating|score|grade", r"\[?\s*([\d./ ]+?(?:\s*out of\s*\d+)?)\s*\]?")
    return scale.read(m[1]) if m else None


_VERDICTS = {"a": "A", "b": "B", "c": "tie", "tie": "tie"}


def parse_verdict(reply: str) -> str | None:
    """`A`, `B` or `tie`: `[[A]]` / `[[B]]` / `[[C]]` anywhere in the judge's own text, else
    `Verdict: A` (`Winner: assistant B`, `Final verdict: tie`) as the last line. Different markers, or
    a marker outside A / B / C, make the reply unparseable."""
    text = own_text(reply)
    markers = [m.strip().lower() for m in _MARKER.findall(text)]
    markers = [m for m in markers if len(m) <= 3]  # `[[A]]`, `[[tie]]`; not an echoed `[[rating]]`
    if markers:
        return None if any(m not in _VERDICTS for m in markers) else _one([_VERDICTS[m] for m in markers])
    m = _labelled(_last_line(text), r"verdict|winner|better (?:reply|answer|assistant)",
                  r"(?:assistant\s*)?\[?\s*(A|B|C|tie)\s*\]?")  # fmt: skip
    return _VERDICTS[m[1].lower()] if m else None


def parse_two_scores(reply: str, scale: Scale = DEFAULT_SCALE) -> tuple[float, float] | None:
    """Two scores, assistant 1 first: `[[8, 6]]` anywhere in the judge's own text (or exactly two
    `[[8]]` markers), else `Assistant 1: 8 ... Assistant 2: 6` as the last line."""
    text = own_text(reply)
    markers = [m.strip() for m in _MARKER.findall(text) if re.search(r"\d", m)]
    pairs = [re.split(r"\s*[,;]\s*|\s+", m, maxsplit=1) for m in markers]
    if pairs and all(len(p) == 2 for p in pairs):
        found = [(scale.read(a), scale.read(b)) for a, b in pairs]
    elif len(pairs) == 2 and all(len(p) == 1 for p in pairs):
        found = [(scale.read(pairs[0][0]), scale.read(pairs[1][0]))]
    elif pairs:
        return None
    else:
        score = r"\**\s*(\d+(?:\.\d+)?(?:\s*/\s*\d+)?)\**"
        m = re.fullmatch(rf"assistant\s*(?:1|a)\s*[:\-]\s*{score}.*?assistant\s*(?:2|b)\s*[:\-]\s*{score}(?:[,;.].*)?",
                         _last_line(text), flags=re.IGNORECASE)  # fmt: skip
        found = [(scale.read(m[1]), scale.read(m[2]))] if m else []
    if not found or any(None in pair for pair in found):
        return None
    return _one(found)


# ---------------------------------------------------------------------------------------------
# Where the verdict stands, and why a reply did not parse


def own_mask(reply: str) -> str:
    """`reply` with the quoted or echoed content `own_text` drops blanked to spaces instead (newlines
    kept), so offsets into it are offsets into the reply."""

    def blank(m: re.Match) -> str:
        return re.sub(r"[^\n]", " ", m[0])

    text = _FENCED.sub(blank, reply)
    text = _INLINE_CODE.sub(blank, text)
    text = _QUOTE_LINE.sub(blank, text)
    text = _DOUBLE_QUOTED.sub(lambda m: f" {m[1]} " if _MARKER.fullmatch(m[1].strip()) else blank(m), text)
    while _INNER_BRACES.search(text):
        text = _INNER_BRACES.sub(blank, text)
    return text


def _last_line_at(text: str) -> tuple[str, int]:
    """The last non-blank line of `text`, stripped, and the offset of its first character."""
    offset = len(text)
    for line in reversed(text.splitlines(keepends=True)):
        offset -= len(line)
        if line.strip():
            return line.strip(), offset + len(line) - len(line.lstrip())
    return "", 0


def verdict_span(reply: str, output_format: str) -> tuple[int, int] | None:
    """(start, end) of the verdict's value in `reply` (the digits of `[[8]]` or of `Rating: 8/10`, the
    letter of `[[A]]`), found by the parsers' own rules: the last marker in the judge's own text, else
    the labelled last line. None when there is none or the format has two values (`[[rating_a,rating_b]]`).
    The caller checks that the text there reads as the parsed verdict."""
    text = own_mask(reply)
    if output_format == "[[rating]]":
        markers = [m for m in _MARKER.finditer(text) if re.search(r"\d", m[1])]
        if markers:
            number = re.search(r"\d+(?:\.\d+)?", markers[-1][1])
            return markers[-1].start(1) + number.start(), markers[-1].start(1) + number.end()
        line, at = _last_line_at(text)
        m = _labelled(line, "rating|score|grade", r"\[?\s*([\d./ ]+?(?:\s*out of\s*\d+)?)\s*\]?")
        if not m:
            return None
        number = re.search(r"\d+(?:\.\d+)?", m[1])
        return at + m.start(1) + number.start(), at + m.start(1) + number.end()
    if output_format == "[[A]]":
        markers = [m for m in _MARKER.finditer(text) if len(m[1].strip()) <= 3]
        if markers:
            inner = markers[-1][1]
            start = markers[-1].start(1) + len(inner) - len(inner.lstrip())
            return start, start + len(inner.strip())
        line, at = _last_line_at(text)
        m = _labelled(line, r"verdict|winner|better (?:reply|answer|assistant)",
                      r"(?:assistant\s*)?\[?\s*(A|B|C|tie)\s*\]?")  # fmt: skip
        return (at + m.start(1), at + m.end(1)) if m else None
    return None


def unparsed_reason(reply: str, output_format: str) -> str:
    """Why the parser for `output_format` found no verdict in `reply` (recorded with the judgment)."""
    text = own_text(reply)
    if not text.strip():
        return "empty reply" if not reply.strip() else "only quoted or echoed content, no verdict of the judge's own"
    markers = [m.strip() for m in _MARKER.findall(text)]
    if output_format == "[[A]]":
        markers = [m for m in markers if len(m) <= 3]
    else:
        markers = [m for m in markers if re.search(r"\d", m)]
    if markers:
        shown = ", ".join(f"[[{m}]]" for m in dict.fromkeys(markers))
        return f"verdict markers {shown}: different ones, or outside what the prompt asks for ({output_format})"
    return f"no {output_format} marker and no labelled verdict on the last line"
