"""The web chat and arena page (corral/serve/web), driven in real headless Chromium against a real `corral serve`.

The tiny random model answers gibberish (at temperature 0: newlines), so these tests check structure:
what the page sends, that the reply streams in pieces and equals the server's own answer, that Stop
aborts, that errors are shown, and that an arena vote lands in the votes file as shown on screen.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import ServerProcess

try:
    from playwright.sync_api import expect
except ImportError:  # pragma: no cover - depends on the machine
    expect = None  # the browser fixture skips these tests

KEY = "web-key-456"
WAIT_MS = 60_000  # generous: other tests may share a small CPU


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory, tiny_model_dir, tiny_lora_dir):
    votes = tmp_path_factory.mktemp("web-votes") / "votes.jsonl"
    proc = ServerProcess(["--model", f"tiny={tiny_model_dir}", "--model", f"tuned={tiny_lora_dir}",
                          "--api-key", KEY, "--votes", str(votes), "--max_tokens", "24"])
    proc.votes = votes
    yield proc
    proc.stop()


CSP = "default-src 'self'"  # what the server sends with the page; the page must work under it


@pytest.fixture
def open_page(browser, server):
    """open_page(key=True) -> a fresh page (own storage) on the server, its model list loaded when keyed.

    The key is seeded into sessionStorage, where the page keeps it by default. Every page is served under
    `Content-Security-Policy: default-src 'self'` (added here beside whatever policy the server sends, so the
    page is held to both), and any policy violation the browser reports fails the test, as an uncaught page
    error does.
    `context=` opens another page (a new tab) in an earlier page's browser context: same localStorage,
    its own sessionStorage.
    """
    contexts, page_errors = [], []

    def with_csp(route):
        response = route.fetch()
        sent = response.headers.get("content-security-policy")
        # Comma-separated policies are all enforced: the server's own (if any) and this one.
        policy = f"{sent}, {CSP}" if sent else CSP
        route.fulfill(response=response, headers={**response.headers, "content-security-policy": policy})

    def on_console(message):
        if message.type == "error" and "Content Security Policy" in message.text:
            page_errors.append(message.text)

    def open_(key: bool = True, models: list[str] | None = None, context=None, wait_models: bool | None = None):
        if context is None:
            context = browser.new_context()
            contexts.append(context)
            if key:
                context.add_init_script(f"sessionStorage.setItem('corral.api_key', {json.dumps(KEY)})")
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on("pageerror", lambda e: page_errors.append(str(e)))
        page.on("console", on_console)
        page.route(server.url + "/", with_csp)
        if models is not None:  # pretend the server lists only these
            body = {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "corral"}
                                               for m in models]}  # fmt: skip
            page.route("**/v1/models", lambda route: route.fulfill(json=body))
        page.goto(server.url + "/")
        if key if wait_models is None else wait_models:
            expect(page.locator("#model option")).to_have_count(len(models or ["tiny", "tuned"]), timeout=WAIT_MS)
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not page_errors, f"uncaught errors or CSP violations in the page: {page_errors}"


def stored_key(page) -> dict:
    return page.evaluate("""() => ({session: sessionStorage.getItem('corral.api_key'),
                                    local: localStorage.getItem('corral.api_key')})""")


def text_of(page, selector: str) -> str:
    """The exact text (whitespace included, unlike inner_text) of the element: a reply's as received (the
    Markdown source the page renders from), anything else's text content."""
    return page.eval_on_selector(selector, "e => e.dataset.markdown ?? e.textContent")


def wait_done(page, selector: str, nth: int = 0) -> None:
    """Wait until the nth match has finished streaming (the page sets data-done when a stream ends)."""
    expect(page.locator(selector).nth(nth)).to_have_attribute("data-done", "true", timeout=WAIT_MS)


def server_reply(server, messages: list[dict], **params) -> str:
    body = {"model": "tiny", "messages": messages, **params}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def page_params(page) -> dict:
    return {"temperature": float(page.input_value("#temperature")), "top_p": float(page.input_value("#top-p")),
            "max_tokens": int(page.input_value("#max-tokens")),
            "repetition_penalty": float(page.input_value("#repetition-penalty"))}  # fmt: skip


def test_chat_streams_the_servers_reply_and_keeps_history(open_page, server):
    page = open_page(key=False)
    # No key saved: the 401 is shown, the settings open at the key field, and typing the key loads the models.
    expect(page.locator("#error")).to_contain_text("API key")
    expect(page.locator("#settings")).to_be_visible()
    page.fill("#api-key", KEY)
    expect(page.locator("#model option")).to_have_text(["tiny", "tuned"])
    expect(page.locator("#error")).to_be_hidden()
    page.select_option("#model", "tiny")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.fill("#repetition-penalty", "1.1")
    params = page_params(page)
    assert params == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 24, "repetition_penalty": 1.1}
    assert page.input_value("#system") == ""

    page.fill("#prompt", "Hello there")
    # The Stop button shows while the reply streams. A tiny model can finish 24 tokens before a poll of the page
    # would see it, so the page records the moment it shows.
    page.evaluate("""() => { const stop = document.querySelector('#stop'); window.stopShown = false;
        new MutationObserver(() => { if (!stop.hidden) window.stopShown = true; })
            .observe(stop, {attributes: true, attributeFilter: ['hidden']}); }""")
    page.press("#prompt", "Enter")
    wait_done(page, ".msg.assistant")
    assert page.evaluate("window.stopShown")
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator(".msg.user")).to_have_text(["Hello there"])
    reply = text_of(page, ".msg.assistant")
    first = [{"role": "user", "content": "Hello there"}]
    assert reply and reply == server_reply(server, first, **params)
    bubble = page.locator(".msg.assistant")
    assert int(bubble.get_attribute("data-chunks")) > 1  # streamed in pieces, not in one go
    assert bubble.get_attribute("data-finish") == "length"
    assert page.input_value("#prompt") == ""

    # Shift+Enter is a new line, Enter sends; the second turn carries the first one.
    page.click("#prompt")
    page.keyboard.type("And")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("then?")
    assert page.input_value("#prompt") == "And\nthen?"
    expect(page.locator(".msg")).to_have_count(2)
    page.keyboard.press("Enter")
    wait_done(page, ".msg.assistant", nth=1)
    second = text_of(page, ".msg.assistant >> nth=1")
    history = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "And\nthen?"}]
    assert second == server_reply(server, history, **params)

    # The key (sessionStorage) and settings (localStorage) survive a reload; New chat clears the conversation.
    page.reload()
    expect(page.locator("#model option")).to_have_count(2)
    assert page.input_value("#api-key") == KEY and page.input_value("#temperature") == "0"
    expect(page.locator(".msg")).to_have_count(0)
    page.fill("#prompt", "again")
    page.press("#prompt", "Enter")
    wait_done(page, ".msg.assistant")
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#chat-empty")).to_be_visible()


def test_api_key_is_kept_for_the_tab_unless_remembered(open_page):
    page = open_page(key=False)
    expect(page.locator("#settings")).to_be_visible()  # the 401 opened the settings at the key field
    assert not page.is_checked("#remember-key")
    page.fill("#api-key", KEY)
    expect(page.locator("#model option")).to_have_text(["tiny", "tuned"])
    assert stored_key(page) == {"session": KEY, "local": None}  # by default: this tab only
    # A new tab of the same browser shares localStorage, not sessionStorage: it has no key.
    other = open_page(context=page.context, wait_models=False)
    expect(other.locator("#error")).to_contain_text("API key")
    assert other.input_value("#api-key") == "" and not other.is_checked("#remember-key")
    assert stored_key(other) == {"session": None, "local": None}
    other.close()

    page.check("#remember-key")  # the explicit choice: kept on this device
    assert stored_key(page) == {"session": KEY, "local": KEY}
    again = open_page(context=page.context)  # loads the models with the remembered key
    assert again.input_value("#api-key") == KEY and again.is_checked("#remember-key")
    again.close()

    page.uncheck("#remember-key")  # forgets it on this device; this tab keeps it
    assert stored_key(page) == {"session": KEY, "local": None}
    page.reload()
    expect(page.locator("#model option")).to_have_count(2)
    assert page.input_value("#api-key") == KEY and not page.is_checked("#remember-key")
    last = open_page(context=page.context, wait_models=False)
    expect(last.locator("#error")).to_contain_text("API key")
    assert last.input_value("#api-key") == "" and stored_key(last) == {"session": None, "local": None}


def test_server_error_is_shown_and_the_turn_given_back(open_page):
    page = open_page()
    page.click("#settings-toggle")
    page.fill("#temperature", "5")
    page.fill("#prompt", "too hot")
    page.click("#send")
    expect(page.locator("#error")).to_contain_text("temperature")
    expect(page.locator(".msg")).to_have_count(0)
    assert page.input_value("#prompt") == "too hot"
    expect(page.locator("#send")).to_be_visible()
    page.fill("#temperature", "0")
    page.click("#send")
    wait_done(page, ".msg.assistant")
    expect(page.locator(".msg.user")).to_have_text(["too hot"])


def test_stop_aborts_the_stream_and_the_page_stays_usable(open_page):
    page = open_page()
    page.click("#settings-toggle")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "800")
    page.fill("#prompt", "Go on and on")
    page.press("#prompt", "Enter")
    page.wait_for_function("() => Number(document.querySelector('.msg.assistant')?.dataset.chunks) >= 1")
    page.click("#stop")
    wait_done(page, ".msg.assistant")
    bubble = page.locator(".msg.assistant")
    assert bubble.get_attribute("data-stopped") == "true"
    assert bubble.get_attribute("data-finish") is None
    assert 1 <= int(bubble.get_attribute("data-chunks")) < 800
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#error")).to_be_hidden()

    page.fill("#max-tokens", "4")
    page.fill("#prompt", "Shorter, please")
    page.press("#prompt", "Enter")
    wait_done(page, ".msg.assistant", nth=1)
    again = page.locator(".msg.assistant >> nth=1")
    assert again.get_attribute("data-finish") == "length" and again.get_attribute("data-stopped") is None
    expect(page.locator(".msg.user")).to_have_text(["Go on and on", "Shorter, please"])


def read_votes(server) -> list[dict]:
    if not server.votes.exists():
        return []
    return [json.loads(line) for line in server.votes.read_text().splitlines() if line.strip()]


def test_arena_round_vote_is_recorded_as_shown(open_page, server):
    before = len(read_votes(server))
    page = open_page()
    page.click("#mode-arena")
    expect(page.locator("#arena-view")).to_be_visible()
    expect(page.locator("#chat-view")).to_be_hidden()
    prompt = "Which of you is better?"
    page.fill("#arena-prompt", prompt)
    page.click("#arena-send")
    wait_done(page, "#reply-a")
    wait_done(page, "#reply-b")
    expect(page.locator("#vote-bar")).to_be_visible()
    expect(page.locator("#arena-note")).to_be_hidden()  # two models served: two different ones
    expect(page.locator("#name-a")).to_have_text("Model A")
    expect(page.locator("#name-b")).to_have_text("Model B")
    text_a, text_b = text_of(page, "#reply-a"), text_of(page, "#reply-b")

    page.click("#vote-b")
    expect(page.locator("#name-b")).not_to_have_text("Model B")
    name_a, name_b = page.text_content("#name-a"), page.text_content("#name-b")
    assert {name_a, name_b} == {"tiny", "tuned"}
    for button in ("#vote-a", "#vote-b", "#vote-tie", "#vote-bad"):
        expect(page.locator(button)).to_be_disabled()

    records = read_votes(server)[before:]
    assert len(records) == 1
    (record,) = records
    assert record["prompt"] == prompt and record["vote"] == "b"
    assert record["chosen"] == text_b and record["rejected"] == text_a
    assert record["models"] == {"chosen": name_b, "rejected": name_a}

    page.click("#new-round")
    expect(page.locator("#name-a")).to_have_text("Model A")
    expect(page.locator("#vote-bar")).to_be_hidden()
    assert text_of(page, "#reply-a") == "" and text_of(page, "#reply-b") == ""


def test_arena_with_one_model_uses_it_on_both_sides(open_page, server):
    before = len(read_votes(server))
    page = open_page(models=["tiny"])
    page.click("#mode-arena")
    page.fill("#arena-prompt", "Just one of you")
    page.press("#arena-prompt", "Enter")
    expect(page.locator("#arena-note")).to_be_visible()
    wait_done(page, "#reply-a")
    wait_done(page, "#reply-b")
    page.click("#vote-tie")
    expect(page.locator("#name-a")).to_have_text("tiny")
    expect(page.locator("#name-b")).to_have_text("tiny")
    (record,) = read_votes(server)[before:]
    assert record["vote"] == "tie" and record["models"] == {"a": "tiny", "b": "tiny"}
    assert record["chosen"] is None and record["rejected"] is None  # a tie is no preference
