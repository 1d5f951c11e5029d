// Markdown for model replies, rendered straight into DOM nodes.
//
// Model output is untrusted, so nothing here ever parses HTML: every piece of text becomes a text
// node (createElement + append), which is why raw HTML in a reply (`<img onerror=...>`) shows as
// the text it is and never runs. Links are kept only for http(s) and mailto URLs; images become
// links (the page's CSP would refuse a remote image anyway, and a reply must not make the browser
// fetch anything by itself).
//
// What is understood is the Markdown chat models write: fenced code blocks (with a copy button),
// ATX headings, paragraphs (a single newline is a line break, as chat replies mean it), bullet and
// numbered lists (nested by indentation), block quotes, GitHub tables, horizontal rules, and inline
// code, bold, italic, strikethrough, links and bare URLs. A reply is rendered whole each time it
// grows; an unclosed fence while streaming is a code block up to the end, so code never flickers
// between text and code.
"use strict";

(() => {
  const FENCE = /^( {0,3})(`{3,}|~{3,})[ \t]*([^`\s]*)[^`]*$/;
  const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
  const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  const QUOTE = /^ {0,3}> ?/;
  const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])(?:([ \t]+)(.*))?$/;
  const TABLE_DELIMITER = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;
  const PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";
  const SAFE_SCHEMES = new Set(["http:", "https:", "mailto:"]);

  function node(tag, className, text) {
    const element = document.createElement(tag);
    if (className) element.className = className;
    if (text !== undefined) element.textContent = text;
    return element;
  }

  function indentOf(line) {
    return line.length - line.replace(/^[ \t]+/, "").length;
  }

  function startsBlock(line, next) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line)
      || isTableStart(line, next);
  }

  // ---------------------------------------------------------------- blocks
  function blocks(lines, parent) {
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) { i += 1; continue; }
      let m;
      if ((m = FENCE.exec(line))) {
        i = fencedCode(lines, i, m, parent);
      } else if ((m = HEADING.exec(line))) {
        const heading = node("h" + m[1].length);
        inline(m[2] || "", heading);
        parent.append(heading);
        i += 1;
      } else if (RULE.test(line)) {
        parent.append(node("hr"));
        i += 1;
      } else if (QUOTE.test(line)) {
        const quoted = [];
        while (i < lines.length && QUOTE.test(lines[i])) quoted.push(lines[i++].replace(QUOTE, ""));
        const quote = node("blockquote");
        blocks(quoted, quote);
        parent.append(quote);
      } else if (isTableStart(line, lines[i + 1])) {
        i = table(lines, i, parent);
      } else if (ITEM.test(line)) {
        i = list(lines, i, parent);
      } else {
        const paragraph = [line];
        i += 1;
        while (i < lines.length && lines[i].trim() && !startsBlock(lines[i], lines[i + 1])) paragraph.push(lines[i++]);
        const p = node("p");
        paragraph.forEach((text, k) => {
          if (k) p.append(node("br"));
          inline(text.trim(), p);
        });
        parent.append(p);
      }
    }
  }

  function fencedCode(lines, start, match, parent) {
    const [, indent, fence, language] = match;
    const body = [];
    let i = start + 1;
    const closing = new RegExp(`^ {0,3}${fence[0] === "`" ? "`" : "~"}{${fence.length},}[ \\t]*$`);
    while (i < lines.length && !closing.test(lines[i])) {
      const line = lines[i++];
      body.push(line.slice(Math.min(indent.length, indentOf(line))));
    }
    parent.append(codeBlock(body.join("\n"), language));
    return i + 1;  // past the closing fence (or the end, while the reply is still streaming)
  }

  function codeBlock(text, language) {
    const block = node("div", "code-block");
    const head = node("div", "code-head");
    head.append(node("span", "code-lang", language || "code"));
    const copy = node("button", "copy", "Copy");
    copy.type = "button";
    copy.title = "Copy the code";
    copy.addEventListener("click", () => copyText(text, copy));
    head.append(copy);
    const pre = node("pre");
    const code = node("code", language ? "language-" + language.replace(/[^\w+#.-]/g, "") : "", text);
    pre.append(code);
    block.append(head, pre);
    return block;
  }

  async function copyText(text, button) {
    let copied = false;
    try {
      await navigator.clipboard.writeText(text);
      copied = true;
    } catch {
      // No clipboard API (an insecure origin): copy through a selected, off-screen textarea.
      const area = node("textarea", "offscreen");
      area.value = text;
      document.body.append(area);
      area.select();
      try { copied = document.execCommand("copy"); } catch { copied = false; }
      area.remove();
    }
    button.textContent = copied ? "Copied" : "Copy failed";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  }

  function cells(line) {
    let text = line.trim();
    if (text.startsWith("|")) text = text.slice(1);
    if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
    const out = [];
    let cell = "";
    let code = false;
    for (let i = 0; i < text.length; i += 1) {
      const c = text[i];
      if (c === "\\" && text[i + 1] === "|") { cell += "|"; i += 1; continue; }
      if (c === "`") code = !code;
      if (c === "|" && !code) { out.push(cell.trim()); cell = ""; continue; }
      cell += c;
    }
    out.push(cell.trim());
    return out;
  }

  function isTableStart(line, next) {
    return next !== undefined && line.includes("|") && TABLE_DELIMITER.test(next) && next.includes("-")
      && cells(line).length === cells(next).length;
  }

  function table(lines, start, parent) {
    const header = cells(lines[start]);
    const aligns = cells(lines[start + 1]).map((d) =>
      d.startsWith(":") && d.endsWith(":") ? "center" : d.endsWith(":") ? "right" : d.startsWith(":") ? "left" : "");
    const wrap = node("div", "table-wrap");
    const tableEl = node("table");
    const row = (values, tag) => {
      const tr = node("tr");
      header.forEach((_, k) => {
        const cell = node(tag, aligns[k] ? "align-" + aligns[k] : "");
        inline(values[k] || "", cell);
        tr.append(cell);
      });
      return tr;
    };
    const thead = node("thead");
    thead.append(row(header, "th"));
    const tbody = node("tbody");
    let i = start + 2;
    while (i < lines.length && lines[i].trim() && lines[i].includes("|")) tbody.append(row(cells(lines[i++]), "td"));
    tableEl.append(thead, tbody);
    wrap.append(tableEl);
    parent.append(wrap);
    return i;
  }

  function list(lines, start, parent) {
    const first = ITEM.exec(lines[start]);
    const ordered = /\d/.test(first[2]);
    const kind = (m) => (/\d/.test(m[2]) ? "1" + m[2].slice(-1) : m[2]);
    const element = node(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) element.start = parseInt(first[2], 10);
    const items = [];
    let loose = false;
    let i = start;
    while (i < lines.length) {
      const m = ITEM.exec(lines[i]);
      if (!m || kind(m) !== kind(first) || RULE.test(lines[i])) break;
      const markerIndent = m[1].length;
      const gap = m[3] ? m[3].length : 1;
      const contentIndent = markerIndent + m[2].length + (gap > 4 ? 1 : gap);
      const body = [m[4] || ""];
      i += 1;
      while (i < lines.length) {
        const line = lines[i];
        const indent = indentOf(line);
        if (!line.trim()) {
          // A blank line continues the item only if what follows is indented under it.
          let j = i;
          while (j < lines.length && !lines[j].trim()) j += 1;
          if (j < lines.length && indentOf(lines[j]) >= contentIndent) {
            body.push(...lines.slice(i, j).map(() => ""));
            i = j;
            loose = true;
            continue;
          }
          if (j < lines.length && ITEM.test(lines[j]) && indentOf(lines[j]) === markerIndent) loose = true;
          i = j;
          break;
        }
        if (indent > markerIndent) { body.push(line.slice(Math.min(indent, contentIndent))); i += 1; continue; }
        if (startsBlock(line, lines[i + 1])) break;
        body.push(line);  // a lazy continuation of the item's paragraph
        i += 1;
      }
      items.push(body);
      if (i < lines.length && !lines[i].trim()) break;
    }
    for (const body of items) {
      const li = node("li");
      blocks(body, li);
      if (!loose) {  // a tight list: its items' paragraphs are shown without paragraph spacing
        for (const p of Array.from(li.children)) if (p.tagName === "P") p.replaceWith(...p.childNodes);
      }
      element.append(li);
    }
    parent.append(element);
    return i;
  }

  // ---------------------------------------------------------------- inline
  function safeUrl(raw) {
    try {
      const url = new URL(raw);
      return SAFE_SCHEMES.has(url.protocol) ? url.href : null;
    } catch {
      return null;
    }
  }

  function link(url, parent, fill) {
    const href = safeUrl(url);
    if (href === null) return false;
    const a = node("a");
    a.href = href;
    a.rel = "noopener noreferrer nofollow";
    a.target = "_blank";
    fill(a);
    parent.append(a);
    return true;
  }

  /** `[label](url)` at `start`: its label, URL and end, or null. */
  function linkAt(text, start) {
    let depth = 0;
    let i = start;
    for (; i < text.length; i += 1) {
      if (text[i] === "\\") { i += 1; continue; }
      if (text[i] === "[") depth += 1;
      if (text[i] === "]" && --depth === 0) break;
    }
    if (i >= text.length || text[i + 1] !== "(") return null;
    const m = /^\(\s*<?([^\s()<>]*(?:\([^\s()]*\)[^\s()<>]*)*)>?(?:\s+"[^"]*")?\s*\)/.exec(text.slice(i + 1));
    if (!m) return null;
    return { label: text.slice(start + 1, i), url: m[1], end: i + 1 + m[0].length };
  }

  function isWordChar(c) {
    return c !== undefined && /[\p{L}\p{N}]/u.test(c);
  }

  /** The closing delimiter of an emphasis opened at `from`, or -1. */
  function closingDelimiter(text, delimiter, from) {
    for (let j = from; j < text.length; j += 1) {
      if (text[j] === "\\") { j += 1; continue; }
      if (text[j] === "`") {  // emphasis never closes inside a code span
        const run = /^`+/.exec(text.slice(j))[0];
        const end = text.indexOf(run, j + run.length);
        if (end >= 0) { j = end + run.length - 1; continue; }
      }
      if (!text.startsWith(delimiter, j) || /\s/.test(text[j - 1])) continue;
      const c = delimiter[0];
      if (text[j + delimiter.length] === c || (delimiter.length === 1 && text[j - 1] === c)) continue;
      if (c === "_" && isWordChar(text[j + delimiter.length])) continue;
      return j;
    }
    return -1;
  }

  const EMPHASIS = { "***": ["strong", "em"], "**": ["strong"], "__": ["strong"], "*": ["em"], "_": ["em"],
    "~~": ["del"] };

  /** Inline Markdown of `text` appended to `parent`; inside a link (`inLink`), no further links. */
  function inline(text, parent, inLink = false) {
    let plain = "";
    const flush = () => { if (plain) { parent.append(plain); plain = ""; } };
    let i = 0;
    while (i < text.length) {
      const c = text[i];
      if (c === "\\" && PUNCTUATION.includes(text[i + 1] ?? "")) {
        plain += text[i + 1];
        i += 2;
        continue;
      }
      if (c === "`") {
        const run = /^`+/.exec(text.slice(i))[0];
        const end = text.indexOf(run, i + run.length);
        if (end >= 0 && text[end + run.length] !== "`") {
          let code = text.slice(i + run.length, end);
          if (/^ .*[^ ].* $/.test(code)) code = code.slice(1, -1);
          flush();
          parent.append(node("code", "", code));
          i = end + run.length;
        } else {
          plain += run;
          i += run.length;
        }
        continue;
      }
      if (!inLink && (c === "[" || (c === "!" && text[i + 1] === "["))) {
        const image = c === "!";
        const found = linkAt(text, image ? i + 1 : i);
        if (found) {
          flush();
          const shown = link(found.url, parent, (a) => {
            if (image) a.append(`[image: ${found.label || found.url}]`); else inline(found.label, a, true);
          });
          if (!shown) inline(found.label, parent);  // an unsafe URL: keep the words, drop the link
          i = found.end;
          continue;
        }
      }
      if (!inLink && (text.startsWith("https://", i) || text.startsWith("http://", i)) && !isWordChar(text[i - 1])) {
        const url = /^https?:\/\/[^\s<>"`]+/.exec(text.slice(i))[0].replace(/[.,;:!?)\]'*_~]+$/, "");
        flush();
        if (!link(url, parent, (a) => a.append(url))) plain += url;
        i += url.length;
        continue;
      }
      if (c === "*" || c === "_" || c === "~") {
        const run = /^(\*+|_+|~+)/.exec(text.slice(i))[0];
        const delimiter = run.length >= 3 && c === "*" ? "***" : run.length >= 2 ? run.slice(0, 2) : run;
        const opens = EMPHASIS[delimiter] && text[i + delimiter.length] !== undefined
          && !/\s/.test(text[i + delimiter.length]) && !(c === "_" && isWordChar(text[i - 1]));
        const end = opens ? closingDelimiter(text, delimiter, i + delimiter.length + 1) : -1;
        if (end >= 0) {
          flush();
          const tags = EMPHASIS[delimiter];
          const outer = node(tags[0]);
          let inner = outer;
          for (const tag of tags.slice(1)) { const child = node(tag); inner.append(child); inner = child; }
          inline(text.slice(i + delimiter.length, end), inner, inLink);
          parent.append(outer);
          i = end + delimiter.length;
        } else {
          plain += run;
          i += run.length;
        }
        continue;
      }
      plain += c;
      i += 1;
    }
    flush();
  }

  /** Replace `container`'s children with `text` rendered as Markdown. */
  function render(container, text) {
    const fragment = document.createDocumentFragment();
    blocks(text.replace(/\r\n?/g, "\n").split("\n"), fragment);
    container.replaceChildren(fragment);
  }

  window.CorralMarkdown = { render };
})();
