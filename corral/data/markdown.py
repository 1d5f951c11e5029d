"""HTML to Markdown fast, for the HTML a ChatGPT page writes: the same text as BeautifulSoup + markdownify.

`text.html_to_markdown` parses a reply with BeautifulSoup (html.parser), removes the page's buttons, rewrites
each <pre> as its code alone and lets markdownify write Markdown. That costs about 1.5 ms a message, nearly
all of it in building and walking bs4's tree, and ShareGPT dumps are tens of thousands of such messages.

`convert` does the same for the markup those pages use (div, p, span, lists, headings, pre / code, strong,
em, a, blockquote, br, hr; anything at all inside a <button>, which is dropped): one regular expression
splits the text into tags and text, a tree of small nodes is built, and a port of markdownify's own walk
(its whitespace rules, newline collapsing and converters, for the options text.py passes) writes the
Markdown, about ten times faster. Whatever it does not know it refuses, returning None, and the caller
falls back to the full path: a tag outside that list, a tag html.parser would read otherwise (unquoted
or odd attributes, comments, `<` in text, end tags that do not match), a character reference other than
the common named ones and printable numeric ones, tables, images. So the fast path is an optimisation
only: tests/unit/test_data_clean.py checks it against the full path on generated markup and the ChatGPT
sample, and where it answers it must answer the same.
"""

from __future__ import annotations

import re

# Tags this converter writes (markdownify's converters for them are ported below) and those it only passes
# through (span: no converter, its text as it is).
BLOCK_INSIDE = frozenset({"p", "div", "ol", "ul", "li", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6"})
KNOWN = BLOCK_INSIDE | {"span", "pre", "code", "strong", "b", "em", "i", "a", "br", "hr", "button"}
VOID = frozenset({"br", "hr"})
# bs4's empty elements (closed as they open) and html.parser's raw-text elements (no markup inside)
EMPTY_ELEMENTS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "keygen", "link", "menuitem",
                            "meta", "param", "source", "track", "wbr", "basefont", "bgsound", "command", "frame",
                            "image", "isindex", "nextid", "spacer"})  # fmt: skip
RAW_TEXT = frozenset({"script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes", "plaintext"})
HEADINGS = {f"h{n}": n for n in range(1, 7)}
INLINE_MARK = {"strong": "**", "b": "**", "em": "*", "i": "*"}

# Text, or a tag as html.parser reads it when its attributes are plain (name, name="v", name='v'), or a "<"
# that is neither (then the converter refuses the markup).
TOKEN = re.compile(r"([^<]+)|<(/?)([A-Za-z][A-Za-z0-9]*)((?:\s+[A-Za-z_:][-A-Za-z0-9_:.]*(?:\s*=\s*(?:\"[^\"]*\"|"
                   r"'[^']*'))?)*)\s*(/?)>|(<[^<>]{0,40})")  # fmt: skip
ATTRIBUTE = re.compile(r"([A-Za-z_:][-A-Za-z0-9_:.]*)(?:\s*=\s*(?:\"([^\"]*)\"|'([^']*)'))?")
ENTITY = re.compile(r"&(?:(lt|gt|amp|quot|apos|nbsp)|#([0-9]{1,7})|#[xX]([0-9a-fA-F]{1,6}));")
NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'", "nbsp": "\xa0"}

# markdownify's patterns
NEWLINE_WHITESPACE = re.compile(r"[\t \r\n]*[\r\n][\t \r\n]*")
WHITESPACE = re.compile(r"[\t ]+")
ALL_WHITESPACE = re.compile(r"[\t \r\n]+")
LINE_WITH_CONTENT = re.compile(r"^(.*)", flags=re.MULTILINE)
BACKTICK_RUNS = re.compile(r"`+")
PRE_LSTRIP = re.compile(r"^[ \n]*\n")
PRE_RSTRIP = re.compile(r"[ \n]*$")
LANGUAGE_NAME = re.compile(r"[\w#+.-]{1,20}")


class Unsupported(Exception):
    """Markup this converter does not handle exactly as html.parser + markdownify would."""


class Node:
    __slots__ = ("name", "attrs", "children", "parent")

    def __init__(self, name: str, attrs: dict, parent: Node | None):
        self.name, self.attrs, self.children, self.parent = name, attrs, [], parent


def _unescape(text: str) -> str:
    if "&" not in text:
        return text

    def one(match: re.Match) -> str:
        named, decimal, hexadecimal = match.groups()
        if named:
            return NAMED[named]
        code = int(decimal) if decimal else int(hexadecimal, 16)
        if 32 <= code <= 126 or 160 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD:
            return chr(code)
        raise Unsupported(f"character reference {match.group()}")

    out = ENTITY.sub(one, text)
    if "&" in ENTITY.sub("", text):
        raise Unsupported("a character reference other than the common ones")
    return out


def _attributes(text: str) -> dict:
    attrs = {}
    for match in ATTRIBUTE.finditer(text):
        value = match.group(2) if match.group(2) is not None else match.group(3)
        attrs[match.group(1).lower()] = _unescape(value) if value else ("" if value is not None else None)
    return attrs


def parse(text: str) -> Node:
    """The document tree bs4 would build (html.parser), buttons and everything inside them left out.
    Raises Unsupported for anything else."""
    root = Node("[document]", {}, None)
    node, in_pre = root, 0
    skipped: list[str] = []  # the open tags inside a <button>, the button first
    for data, closing, name, attrs, self_closing, bad in TOKEN.findall(text):
        if data:
            if skipped:
                continue
            if "&" in data:
                data = _unescape(data)
            if not in_pre and not data.strip("\x20\x0a\x09\x0c\x0d"):  # only ASCII spaces: bs4 folds them
                data = "\n" if "\n" in data else " "
            node.children.append(data)
            continue
        if bad:
            raise Unsupported(f"markup {bad!r}")
        name = name.lower()
        if closing and (self_closing or attrs or name in EMPTY_ELEMENTS):
            raise Unsupported(f"end tag </{name}{attrs}{self_closing}>")
        if skipped:  # inside a button: only the nesting matters, and it must be plain
            if name in RAW_TEXT:
                raise Unsupported(f"<{name}> inside <button>")
            if closing:
                if name != skipped[-1]:
                    raise Unsupported(f"end tag </{name}> where <{skipped[-1]}> is open")
                skipped.pop()
            elif not self_closing and name not in EMPTY_ELEMENTS:
                skipped.append(name)
            continue
        if name not in KNOWN:
            raise Unsupported(f"tag <{name}>")
        if closing:
            if name != node.name:
                raise Unsupported(f"end tag </{name}> where <{node.name}> is open")
            in_pre -= name == "pre"
            node = node.parent
            continue
        if name == "button":
            if not self_closing:
                skipped.append(name)
            continue
        if name == "pre" and in_pre:
            raise Unsupported("<pre> inside <pre>")
        child = Node(name, _attributes(attrs) if attrs else {}, node)
        node.children.append(child)
        if name in VOID or self_closing:
            continue
        node = child
        in_pre += name == "pre"
    if node is not root or skipped:
        raise Unsupported("unclosed tags")
    return root


def _text_of(node: Node) -> str:
    return "".join(c if isinstance(c, str) else _text_of(c) for c in node.children)


def _first(node: Node, name: str) -> Node | None:
    for child in node.children:
        if not isinstance(child, str):
            if child.name == name:
                return child
            found = _first(child, name)
            if found is not None:
                return found
    return None


def _strings(node: Node):
    for child in node.children:
        if isinstance(child, str):
            yield child
        else:
            yield from _strings(child)


def _pre_markdown(pre: Node) -> str:
    """text.py's _simplify_code_blocks and markdownify's convert_pre together: the code (the <code>'s text,
    else the <pre>'s without its first "Copy code") fenced with its language."""
    code = _first(pre, "code")
    language = ""
    classes = (code.attrs.get("class") or "").split() if code is not None else []
    language = next((c[len("language-") :] for c in classes if c.startswith("language-")), None)
    if language is None:
        header = _first(pre, "span")
        found = "".join(s.strip() for s in _strings(header) if s.strip()) if header is not None else ""
        language = found if LANGUAGE_NAME.fullmatch(found) else ""
    text = _text_of(code) if code is not None else _text_of(pre).replace("Copy code", "", 1)
    if not text:
        return ""
    text = PRE_RSTRIP.sub("", PRE_LSTRIP.sub("", text))
    return f"\n\n```{language}\n{text}\n```\n\n"


def _outside(el) -> bool:
    """markdownify's should_remove_whitespace_outside."""
    return el.__class__ is Node and (el.name in BLOCK_INSIDE or el.name == "pre")


def _chomp(text: str) -> tuple[str, str, str]:
    prefix = " " if text and text[0] == " " else ""
    suffix = " " if text and text[-1] == " " else ""
    return prefix, suffix, text.strip()


def _next_content_sibling(node: Node):
    siblings = node.parent.children
    for el in siblings[siblings.index(node) + 1 :]:
        if not isinstance(el, str) or el.strip() != "":
            return el
    return None


_TAGS_CACHE: dict = {}


def _child_tags(parent_tags: frozenset, name: str) -> frozenset:
    """The parent tags markdownify hands a tag's children: the ancestors, the tag, and its pseudo-tags."""
    key = (parent_tags, name)
    tags = _TAGS_CACHE.get(key)
    if tags is None:
        tags = parent_tags | {name}
        if name in HEADINGS:
            tags |= {"_inline"}
        if name == "code":
            tags |= {"_noformat"}
        tags = _TAGS_CACHE.setdefault(key, tags)
    return tags


def _process(node: Node, parent_tags: frozenset) -> str:
    """markdownify's process_tag for `node` (a <pre> never reaches the text rules: its code is written
    as it is)."""
    name = node.name
    if name == "pre":
        return _pre_markdown(node)
    inside = name in BLOCK_INSIDE
    tags = _child_tags(parent_tags, name)
    children = node.children
    last = len(children) - 1
    strings = []
    for i, child in enumerate(children):
        if child.__class__ is str:
            prev = children[i - 1] if i > 0 else None
            nxt = children[i + 1] if i < last else None
            if child.strip() == "":
                if inside and (not prev or not nxt):
                    continue
                if _outside(prev) or _outside(nxt):
                    continue
            text = child
            if "\n" in text or "\r" in text:
                text = NEWLINE_WHITESPACE.sub("\n", text)
            if "\t" in text or "  " in text:
                text = WHITESPACE.sub(" ", text)
            if not text:
                continue
            if _outside(prev) or (inside and not prev):
                text = text.lstrip(" \t\r\n")
            if _outside(nxt) or (inside and not nxt):
                text = text.rstrip()
        else:
            text = _process(child, tags)
        if text:
            strings.append(text)
    # Newlines at child boundaries collapse to the larger count, at most 2 (markdownify; never inside <pre>).
    collapsed = [""]
    for string in strings:
        content = string.strip("\n")
        if len(content) == len(string):
            collapsed += ["", string, ""]
            continue
        rest = string.lstrip("\n")
        leading = len(string) - len(rest)
        content = rest.rstrip("\n")
        trailing = len(rest) - len(content)
        if leading and collapsed[-1]:
            leading = min(2, max(len(collapsed.pop()), leading))
        collapsed += ["\n" * leading, content, "\n" * trailing]
    return _convert(node, "".join(collapsed), parent_tags)


def _convert(node: Node, text: str, parent_tags: frozenset) -> str:
    """markdownify's convert_<tag> for the options text.py uses (ATX headings, '-' bullets, no escaping)."""
    name = node.name
    inline = "_inline" in parent_tags
    if name == "[document]":
        return text.strip("\n")
    if name in ("p", "div"):
        if inline:
            return " " + (text.strip(" \t\r\n") if name == "p" else text.strip()) + " "
        text = text.strip(" \t\r\n") if name == "p" else text.strip()
        return f"\n\n{text}\n\n" if text else ""
    if name in HEADINGS:
        if inline:
            return text
        return f"\n\n{'#' * HEADINGS[name]} {ALL_WHITESPACE.sub(' ', text.strip())}\n\n"
    if name in ("ul", "ol"):
        sibling = _next_content_sibling(node)
        before_paragraph = sibling is not None and (isinstance(sibling, str) or sibling.name not in ("ul", "ol"))
        if "li" in parent_tags:
            return "\n" + text.rstrip()
        return "\n\n" + text + ("\n" if before_paragraph else "")
    if name == "li":
        text = text.strip()
        if not text:
            return "\n"
        parent = node.parent
        if parent.name == "ol":
            start = parent.attrs.get("start")
            first = int(start) if start and str(start).isnumeric() else 1
            before = sum(1 for c in parent.children[: parent.children.index(node)]
                         if not isinstance(c, str) and c.name == "li")  # fmt: skip
            bullet = f"{first + before}. "
        else:
            bullet = "- "
        indent = " " * len(bullet)
        text = LINE_WITH_CONTENT.sub(lambda m: indent + m.group(1) if m.group(1) else "", text)
        return f"{bullet}{text[len(bullet):]}\n"
    if name == "code":
        if "_noformat" in parent_tags:
            return text
        prefix, suffix, text = _chomp(text)
        if not text:
            return ""
        ticks = max((len(run) for run in BACKTICK_RUNS.findall(text)), default=0)
        if ticks:
            text = f" {text} "
        return f"{prefix}{'`' * (ticks + 1)}{text}{'`' * (ticks + 1)}{suffix}"
    if name in INLINE_MARK:
        if "_noformat" in parent_tags:
            return text
        prefix, suffix, text = _chomp(text)
        mark = INLINE_MARK[name]
        return f"{prefix}{mark}{text}{mark}{suffix}" if text else ""
    if name == "a":
        if "_noformat" in parent_tags:
            return text
        prefix, suffix, text = _chomp(text)
        if not text:
            return ""
        href, title = node.attrs.get("href"), node.attrs.get("title")
        if text.replace(r"\_", "_") == href and not title:
            return f"<{href}>"
        title_part = ' "%s"' % title.replace('"', r"\"") if title else ""
        return f"{prefix}[{text}]({href}{title_part}){suffix}" if href else text
    if name == "blockquote":
        text = text.strip(" \t\r\n")
        if inline:
            return " " + text + " "
        if not text:
            return "\n"
        return "\n" + LINE_WITH_CONTENT.sub(lambda m: "> " + m.group(1) if m.group(1) else ">", text) + "\n\n"
    if name == "br":
        if inline:
            return text + " " if text else " "
        return "  \n" + text
    if name == "hr":
        return "\n\n---\n\n"
    return text  # span


def convert(html: str) -> str | None:
    """`html` as Markdown, exactly as text.html_to_markdown writes it, or None when this converter does not
    know the markup (the caller then takes the full path)."""
    try:
        return _process(parse(html), frozenset()).strip()
    except Unsupported:
        return None
