"""Text repairs for raw chat exports, one function per repair: HTML to Markdown, ChatGPT-export debris,
Unicode, whitespace, e-mail and phone scrubbing. Each takes a message's text and returns the new text
(and, where there is more than one kind of change, what it changed), so `data clean` can count them.

ShareGPT's raw dumps hold replies as the HTML the ChatGPT page showed. Its code blocks carry a header
(the language and a "Copy code" button) inside the <pre>; converted naively the button's text lands in
the code and the language is lost. Here the language is read from the <code> element's `language-X`
class (or the header), the header is dropped, and markdownify writes a fenced block with that language.
"""

from __future__ import annotations

import re
from collections import Counter

LOOKS_HTML = re.compile(r"<(?:p|div|pre|code|ol|ul|li|h[1-6]|br|hr|table|tr|td|th|blockquote|strong|b|em|i|span|a)"
                        r"(?:\s[^<>]*)?/?>", re.IGNORECASE)
FENCE = re.compile(r"^\s*(```|~~~)")

# ChatGPT-export debris, as it appears in text (after conversion, or in exports already in Markdown).
REGENERATION_COUNTER = re.compile(r"\A\s*(\d{1,2}) / (\d{1,2})")
CHAR_WORD_COUNTER = re.compile(r"Copy\d+ chars? / \d+ words?")
COPY_CODE_HEADER = re.compile(r"```[ \t]*\n?[ \t]*([\w#+.-]*)[ \t]*Copy code[ \t]*\n?")
FENCE_OPEN = re.compile(r"^\s*```[\w#+.-]*\s*$")
FENCE_CLOSE = re.compile(r"^\s*```\s*$")

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
# A phone number: optional +country code, then groups of digits with separators (spaces, dots, dashes,
# parentheses) between them. Ten digits in a row are not matched: ids, amounts and hashes look like that.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{2,4}[ .-]\d{3,4}(?![\w-])")

ODD_SPACES = re.compile("[\u00a0\u2000-\u200a\u202f\u205f]")
INVISIBLE = re.compile("[\u200b\ufeff]")  # zero-width space, stray byte-order marks
TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)


CODE_ELEMENT = re.compile(r"(<code\b[^>]*>)(.*?)(</code>)", re.DOTALL | re.IGNORECASE)
SPAN_TAG = re.compile(r"</?span\b[^>]*>", re.IGNORECASE)
ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def looks_like_html(text: str) -> bool:
    return LOOKS_HTML.search(text) is not None


def _code_language(pre) -> str:
    """A <pre>'s language: the `language-X` class of its <code>, else the header's first <span>."""
    code = pre.find("code")
    for cls in (code.get("class") or []) if code is not None else []:
        if cls.startswith("language-"):
            return cls[len("language-") :]
    header = pre.find("span")
    text = header.get_text(strip=True) if header is not None else ""
    return text if re.fullmatch(r"[\w#+.-]{1,20}", text) else ""


def _simplify_code_blocks(soup) -> None:
    """Each <pre> becomes <pre data-language=X><code>the code only</code></pre>: header and button gone."""
    for pre in soup.find_all("pre"):
        language = _code_language(pre)
        code = pre.find("code")
        text = code.get_text() if code is not None else pre.get_text().replace("Copy code", "", 1)
        pre.clear()
        new_code = soup.new_tag("code")
        new_code.string = text
        pre.append(new_code)
        pre["data-language"] = language


def html_to_markdown(text: str) -> str:
    """HTML (a ChatGPT page's reply) as Markdown: headings `#`, lists `-` / `1.`, fenced code blocks with
    their language. Text outside tags is not escaped: training data should read as a model would write it.

    The markup ChatGPT pages use goes through corral/data/markdown.py's converter, which writes the same
    text as BeautifulSoup + markdownify (`html_to_markdown_full`) about ten times faster; anything it does
    not know takes the full path."""
    from corral.data.markdown import convert

    text = _strip_code_spans(text)
    fast = convert(text)
    return fast if fast is not None else _markdownify(text)


def html_to_markdown_full(text: str) -> str:
    """html_to_markdown without the fast path: BeautifulSoup (html.parser) and markdownify for everything."""
    return _markdownify(_strip_code_spans(text))


def _strip_code_spans(text: str) -> str:
    # Syntax-highlighting spans inside <code> carry no text of their own; dropping them before parsing
    # halves the work on code-heavy replies.
    return CODE_ELEMENT.sub(lambda m: m.group(1) + SPAN_TAG.sub("", m.group(2)) + m.group(3), text)


def _markdownify(text: str) -> str:
    from bs4 import BeautifulSoup
    from markdownify import MarkdownConverter

    soup = BeautifulSoup(text, "html.parser")
    for button in soup.find_all("button"):
        button.decompose()
    _simplify_code_blocks(soup)
    converter = MarkdownConverter(
        heading_style="ATX", bullets="-", escape_asterisks=False, escape_underscores=False, escape_misc=False,
        code_language_callback=lambda pre: pre.get("data-language") or "",
    )  # fmt: skip
    return converter.convert_soup(soup).strip()


def remove_export_debris(text: str) -> tuple[str, Counter]:
    """Remove what the ChatGPT page added around a reply: a leading "N / N" regeneration counter,
    "CopyN chars / N words", "Copy code" code-block headers (the language is kept), empty code blocks."""
    found: Counter = Counter()
    match = REGENERATION_COUNTER.match(text)
    if match and 1 <= int(match.group(1)) <= int(match.group(2)):
        text = text[match.end() :].lstrip()
        found["regeneration counters"] += 1
    text, n = CHAR_WORD_COUNTER.subn("", text)
    found["char / word counters"] += n
    text, n = COPY_CODE_HEADER.subn(lambda m: f"```{m.group(1)}\n", text)
    found["'Copy code' headers"] += n
    text, found["empty code blocks"] = _remove_empty_code_blocks(text)
    found = +found
    return (text.strip() if found else text), found


def _remove_empty_code_blocks(text: str) -> tuple[str, int]:
    """Drop fenced blocks with nothing but blank lines inside, matching fences line by line (a pattern over
    the whole text could pair one block's closing fence with the next one's opening)."""
    if "```" not in text:
        return text, 0
    lines, out, i, removed = text.split("\n"), [], 0, 0
    while i < len(lines):
        if FENCE_OPEN.match(lines[i]):
            j = next((j for j in range(i + 1, len(lines)) if FENCE_CLOSE.match(lines[j])), None)
            if j is not None:
                if any(line.strip() for line in lines[i + 1 : j]):
                    out += lines[i : j + 1]
                else:
                    removed += 1
                i = j + 1
                continue
        out.append(lines[i])
        i += 1
    return "\n".join(out), removed


def fix_unicode(text: str) -> str:
    """Repair mojibake ("donâ€™t" -> "don’t"), broken escapes and control characters with ftfy, NFC-normalised.

    Left alone: HTML entities (the HTML step owns them; in code `&lt;` may be meant), curly quotes, full-width
    forms (normal in Chinese and Japanese text) and ligatures. ASCII text without control characters has
    nothing ftfy would change with these settings, so it is returned as it is, without the cost."""
    if text.isascii() and not ASCII_CONTROL.search(text):
        return text
    import ftfy

    return ftfy.fix_text(text, unescape_html=False, uncurl_quotes=False, fix_character_width=False,
                         fix_latin_ligatures=False, normalization="NFC")  # fmt: skip


def normalise_whitespace(text: str) -> str:
    """\\r\\n and \\r to \\n, odd spaces (no-break, thin, ...) to plain ones, zero-width ones removed, no trailing
    spaces, at most one blank line in a row outside code blocks, no leading or trailing blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = INVISIBLE.sub("", ODD_SPACES.sub(" ", text))
    text = TRAILING_SPACE.sub("", text)
    if "\n\n\n" in text:
        lines, out, in_code, blank = text.split("\n"), [], False, 0
        for line in lines:
            if FENCE.match(line):
                in_code = not in_code
            blank = blank + 1 if not line and not in_code else 0
            if blank < 2:
                out.append(line)
        text = "\n".join(out)
    return text.strip("\n").rstrip()


def scrub_pii(text: str, emails: bool, phones: bool, email_placeholder: str = "[EMAIL]",
              phone_placeholder: str = "[PHONE]") -> tuple[str, Counter]:
    """Replace e-mail addresses and phone numbers with placeholders; returns the counts replaced."""
    found: Counter = Counter()
    if emails:
        text, found["e-mail addresses"] = EMAIL.subn(email_placeholder, text)
    if phones:
        text, found["phone numbers"] = PHONE.subn(phone_placeholder, text)
    return text, +found


def strip_code_blocks(text: str) -> str:
    """The text without its fenced code blocks (for language detection: code is in no human language)."""
    out, in_code = [], False
    for line in text.split("\n"):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if not in_code:
            out.append(line)
    return "\n".join(out)
