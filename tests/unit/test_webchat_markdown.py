"""Replies rendered as Markdown in the web page (corral/serve/web/markdown.js), in real headless Chromium.

The page is served by a real `corral serve`; the chat completion itself is answered by a canned
server-sent-event stream (a random model cannot write Markdown), sent in pieces as the server sends
them, so the page's streaming, re-rendering and escaping are what is tested.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import ServerProcess

try:
    from playwright.sync_api import expect
except ImportError:  # pragma: no cover - depends on the machine
    expect = None  # the browser fixture skips these tests

WAIT_MS = 60_000
CODE = 'def greet(name):\n    return f"<b>{name}</b>"  # & more'
XSS = '<img src=x onerror="window.__pwned=1">'
REPLY = (
    "Here is **the plan**, with `inline()` code:\n\n"
    f"```python\n{CODE}\n```\n\n"
    "| tool | stars |\n|:-----|------:|\n| corral | 5 |\n| `x|y` | 3 |\n\n"
    "1. first\n2. second\n   - nested *one*\n\n"
    f"Raw HTML stays text: {XSS} and [a link](javascript:alert(1)) and [docs](https://example.com/d).\n"
)


@pytest.fixture(scope="module")
def server(browser, tiny_model_dir):
    proc = ServerProcess(["--model", f"tiny={tiny_model_dir}", "--max_tokens", "8"])
    yield proc
    proc.stop()


def sse(deltas: list[dict], finish: str) -> str:
    def chunk(delta, finish_reason=None):
        body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "tiny",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(body)}\n\n"

    return "".join([chunk({"role": "assistant", "content": ""}), *map(chunk, deltas), chunk({}, finish),
                    "data: [DONE]\n\n"])


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(server.url + "/")
    expect(page.locator("#model option")).to_have_count(1)
    yield page
    context.close()
    assert not errors, f"errors or CSP violations in the page: {errors}"


def answer_with(page, body: str) -> None:
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    expect(page.locator(".msg.assistant").last).to_have_attribute("data-done", "true")


def test_reply_markdown_renders_code_tables_lists_and_neutralises_html(page):
    # Pieces cut through the fence and the table, as tokens arrive; the first leaves the fence open (an open
    # fence renders as code: see the exact-output test).
    pieces = [REPLY[:60], REPLY[60:75], REPLY[75:140], REPLY[140:]]
    assert "```python" in pieces[0] and "```\n" not in pieces[0][pieces[0].index("```python") + 3:]
    answer_with(page, sse([{"content": p} for p in pieces], "stop"))
    send(page, "show me")
    bubble = page.locator(".msg.assistant")
    assert bubble.get_attribute("data-chunks") == "4" and bubble.get_attribute("data-finish") == "stop"
    assert bubble.get_attribute("data-markdown") == REPLY

    code = bubble.locator(".code-block pre code")
    assert code.evaluate("e => e.textContent") == CODE and code.get_attribute("class") == "language-python"
    assert bubble.locator(".code-block .code-lang").text_content() == "python"
    bubble.locator(".code-block button.copy").click()
    expect(bubble.locator(".code-block button.copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == CODE

    assert bubble.locator("table thead th").all_text_contents() == ["tool", "stars"]
    assert bubble.locator("table tbody tr").count() == 2
    assert bubble.locator("table tbody td").all_text_contents() == ["corral", "5", "x|y", "3"]
    assert bubble.locator("table tbody td code").text_content() == "x|y"
    assert bubble.locator("table th").nth(1).get_attribute("class") == "align-right"
    assert bubble.locator("p strong").first.text_content() == "the plan"
    assert bubble.locator("p code").first.text_content() == "inline()"
    assert bubble.locator("ol > li").count() == 2
    assert bubble.locator("ol > li ul > li em").text_content() == "one"

    # The HTML is shown as its text: no img element anywhere, nothing ran.
    assert page.locator("#messages img").count() == 0
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert XSS in bubble.inner_text()
    links = bubble.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.com/d"
    assert links.get_attribute("rel") == "noopener noreferrer nofollow"
    assert "a link" in bubble.inner_text()  # the unsafe link's words stay, without a link


def test_renderer_output_is_exact_for_the_common_constructs(page):
    cases = {
        "# Title\ntext *em* __strong__ ~~gone~~ \\*not em\\*": "<h1>Title</h1><p>text <em>em</em> <strong>strong</strong> "
                                                                "<del>gone</del> *not em*</p>",
        "line one\nline two": "<p>line one<br>line two</p>",
        "- a\n- b\n\n  more b\n- c": "<ul><li><p>a</p></li><li><p>b</p><p>more b</p></li><li><p>c</p></li></ul>",
        "3. three\n4. four": '<ol start="3"><li>three</li><li>four</li></ol>',
        "> quoted **bold**\n> more": "<blockquote><p>quoted <strong>bold</strong><br>more</p></blockquote>",
        "---": "<hr>",
        "snake_case_name, 2 * 3 * 4 and 2*3*4": "<p>snake_case_name, 2 * 3 * 4 and 2<em>3</em>4</p>",
        "see https://example.com/x.": '<p>see <a href="https://example.com/x" rel="noopener noreferrer nofollow" '
                                     'target="_blank">https://example.com/x</a>.</p>',
        "[**https://example.com**](https://example.com)": '<p><a href="https://example.com/" rel="noopener '
                                                          'noreferrer nofollow" target="_blank"><strong>'
                                                          "https://example.com</strong></a></p>",
        "![cat](https://example.com/cat.png)": '<p><a href="https://example.com/cat.png" rel="noopener noreferrer '
                                               'nofollow" target="_blank">[image: cat]</a></p>',
        "``a ` b`` <script>alert(1)</script>": "<p><code>a ` b</code> &lt;script&gt;alert(1)&lt;/script&gt;</p>",
        "~~~\nopen fence": '<div class="code-block"><div class="code-head"><span class="code-lang">code</span>'
                           '<button class="copy" type="button" title="Copy the code">Copy</button></div>'
                           "<pre><code>open fence</code></pre></div>",
    }
    rendered = page.evaluate("""(cases) => Object.fromEntries(Object.keys(cases).map((md) => {
        const div = document.createElement('div'); window.CorralMarkdown.render(div, md); return [md, div.innerHTML];
    }))""", cases)
    assert rendered == cases


def test_streamed_tool_calls_are_shown_not_run(page):
    deltas = [{"content": "Checking."},
              {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Pa'}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": 'ris"}'}}]}]
    answer_with(page, sse(deltas, "tool_calls"))
    send(page, "weather?")
    bubble = page.locator(".msg.assistant")
    assert bubble.get_attribute("data-finish") == "tool_calls"
    assert bubble.locator("p").text_content() == "Checking."
    call = bubble.locator(".tool-call")
    assert call.get_attribute("data-name") == "get_weather"
    assert call.locator(".tool-head code").text_content() == "get_weather"
    assert json.loads(call.locator("pre").text_content()) == {"city": "Paris"}
