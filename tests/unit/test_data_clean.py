"""`corral data clean` and `corral data stats`: each cleaning step on its own, then the command on a raw
ShareGPT-style file (HTML, debris, broken roles, error replies, duplicates, a bad line): what is kept, what is
rejected and why (nothing silently), the report, both layouts, the seeded test split, splitting by tokens,
streaming in chunks and processes; and the statistics of a file."""

import json
from collections import Counter

import pytest

from corral.chat.conversation import Conversation, Message
from corral.cli import main
from corral.data import sharegpt_clean as sc
from corral.data.dedup import NearDuplicates, first_exchange_key, signature
from corral.data.filters import detect_language, first_bad_turn, numbering_restarts
from corral.data.text import fix_unicode, html_to_markdown, normalise_whitespace, remove_export_debris, scrub_pii

CHATGPT_HTML = (
    '<div class="markdown prose"><p>Use <strong>snake_case</strong>:</p><pre><div class="bg-black"><div class="flex">'
    '<span>python</span><button class="flex ml-auto"><svg></svg>Copy code</button></div><div class="p-4">'
    '<code class="!whitespace-pre hljs language-python"><span class="hljs-keyword">def</span> add_one(x):\n'
    '    <span class="hljs-keyword">return</span> x + 1\n</code></div></div></pre>'
    "<ol><li>First</li><li>Second</li></ol><h2>Notes</h2><p>2 * 3 = 6</p></div>"
)


def test_html_to_markdown_keeps_code_blocks_and_their_language():
    assert html_to_markdown(CHATGPT_HTML) == (
        "Use **snake_case**:\n\n```python\ndef add_one(x):\n    return x + 1\n```\n\n1. First\n2. Second\n\n"
        "## Notes\n\n2 * 3 = 6"
    )


def test_export_debris_removed_and_counted():
    text = "1 / 2Sure.\n\n```pythonCopy code\nprint(1)\n```\n\n```\n\n```\nCopy12 chars / 3 words"
    cleaned, found = remove_export_debris(text)
    assert cleaned == "Sure.\n\n```python\nprint(1)\n```"
    assert found == {"regeneration counters": 1, "'Copy code' headers": 1, "empty code blocks": 1,
                     "char / word counters": 1}
    # Not debris: a fraction that is no counter, and two code blocks in a row (the fences must not pair up wrongly).
    two_blocks = "3 / 2 of them.\n```\na\n```\n```js\nb\n```"
    assert remove_export_debris(two_blocks) == (two_blocks, Counter())


def test_unicode_whitespace_and_pii():
    assert fix_unicode("donâ€™t “say” ，好") == "don’t “say” ，好"  # quotes and full-width forms left alone
    assert normalise_whitespace("a  \r\n\n\n\nb\u00a0c\u200b\n```\n\n\n\nx\n```\n\n") == "a\n\nb c\n```\n\n\n\nx\n```"
    text, found = scrub_pii("write to jo.doe+x@mail.example.org or +1 (555) 123-4567; order 1234567890", True, True)
    assert text == "write to [EMAIL] or [PHONE]; order 1234567890" and found == {"e-mail addresses": 1,
                                                                                    "phone numbers": 1}


def turns(*pairs):
    return [(sc.role_names()[name.lower()], name, text) for name, text in pairs]


def test_role_repair_counts_each_repair_and_rejects_what_still_does_not_alternate():
    messages, changes = sc.repair_roles(turns(("gpt", "Hi, how can I help?"), ("human", "Q"), ("Human", "more"),
                                              ("bing", "A"), ("human", "unanswered")))  # fmt: skip
    assert [(m.role, m.content) for m in messages] == [("user", "Q\n\nmore"), ("assistant", "A")]
    assert changes == {"leading assistant turns dropped": 1, "same-role turns merged": 1,
                       "trailing user turns dropped": 1, "role aliases mapped": 1}
    with pytest.raises(sc.Rejected, match="roles do not alternate: turn 1: expected assistant, got user"):
        sc.repair_roles(turns(("human", "Q"), ("human", "Q2"), ("gpt", "A")), merge_consecutive=False)
    with pytest.raises(sc.Rejected, match="system message after the first turn"):
        sc.repair_roles(turns(("human", "Q"), ("system", "S"), ("gpt", "A")))
    with pytest.raises(sc.Rejected, match="no exchange left"):
        sc.repair_roles(turns(("gpt", "A")))


def conv(*texts, system=None):
    pairs = [("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)]
    return Conversation.from_pairs(*pairs, system=system)


def test_reply_filters_name_the_first_bad_turn():
    errors = ("Too many requests in 1 hour", "network error")
    assert first_bad_turn(conv("Q", "A", "Q2", "Too many requests in 1 hour. Try again later."), errors) == (
        3, "error reply", "Too many requests in 1 hour")
    explained = "Network errors happen when the connection drops. " * 10
    assert first_bad_turn(conv("Q", explained), errors) is None  # explaining network errors is no error reply
    assert first_bad_turn(conv("Q", "  "))[1] == "empty reply"
    assert first_bad_turn(conv("", "A"))[1] == "empty user turn"
    assert first_bad_turn(conv("Q", "Ok"), min_reply_chars=5)[1] == "too-short reply"
    assert first_bad_turn(conv("Q", "As an AI language model, I can't."), blocklist=["as an AI language model"])[1] == (
        "blocklisted phrase")
    assert numbering_restarts("Steps:\n1. a\n1. b\n1. c")
    assert not numbering_restarts("1. a\n2. b\n\nThen:\n1. c\n2. d")  # two lists, each counting up: fine
    assert not numbering_restarts("```\n1. x\n1. y\n```")  # code is not a list


def test_filters_cut_at_the_bad_exchange_or_drop():
    bad = conv("Q", "A", "Q2", "network error", "Q3", "A3")
    kept, changes = sc.apply_filters(bad, error_phrases=("network error",))
    assert [m.content for m in kept.messages] == ["Q", "A"] and changes == {"cut at: error reply": 1}
    assert kept.meta["cut"]["dropped"][0] == {"role": "user", "content": "Q2"}  # for the rejects file
    with pytest.raises(sc.Rejected, match="error reply"):
        sc.apply_filters(bad, cut=False, error_phrases=("network error",))
    with pytest.raises(sc.Rejected, match="error reply"):  # nothing before the bad exchange
        sc.apply_filters(conv("Q", "network error"), error_phrases=("network error",))


def test_language_detection_and_lists():
    english = conv("What is the capital of France?", "The capital of France is Paris, a city on the Seine.")
    french = conv("Quelle est la capitale de la France ?", "La capitale de la France est Paris, sur la Seine.")
    assert detect_language(english)[0] == "en" and detect_language(french)[0] == "fr"
    assert detect_language(conv("```\nx = 1\n```", "```\ny = 2\n```"))[0] == "unknown"  # only code
    assert sc.check_language(english, keep=("en",))[0] is english
    with pytest.raises(sc.Rejected, match="language fr not kept"):
        sc.check_language(french, keep=("en",))
    with pytest.raises(sc.Rejected, match="language fr skipped"):
        sc.check_language(french, skip=("fr",))


def test_duplicate_keys_and_near_duplicates():
    a = conv("Tell me about cats", "Cats are small carnivorous mammals. " * 20)
    respaced = conv("tell me  about CATS", "cats are small carnivorous mammals. " * 20)
    assert first_exchange_key(a) == first_exchange_key(respaced) != first_exchange_key(conv("Tell me about dogs", "Ok"))
    text = "The quick brown fox jumps over the lazy dog near the river bank today. " * 30
    index = NearDuplicates(threshold=0.8)
    assert index.check("one", signature(text + " Goodbye.")) is None
    assert index.check("two", signature(text + " Farewell.")) == "one"
    assert index.check("three", signature("Something else entirely, about databases and indexes. " * 30)) is None


def sg(*values, **extra):
    """A ShareGPT record whose turns alternate human / gpt."""
    return {"conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)],
            **extra}


def raw_records():
    return [
        sg("How do I add one in Python?", CHATGPT_HTML, id="html"),                     # converted
        sg("Hi", "1 / 1Hello! How can I help?", id="debris"),                           # counter removed
        sg("Hi", "1 / 1Hello! How can I help?", id="debris"),                           # same id
        sg("HI", "Hello!  How can I help?", id="same-first"),                           # same first exchange
        sg("Q1", "A1", "Q2", "Too many requests in 1 hour. Try again later.", id="cut"),  # cut after A1
        sg("network error?", "network error", id="error"),                              # dropped: error reply
        {"id": "roles", "conversations": [{"from": "gpt", "value": "Welcome"}, {"from": "human", "value": "Q"},
                                          {"from": "user", "value": "Q more"}, {"from": "bard", "value": "A"}]},
        {"id": "robot", "conversations": [{"from": "robot", "value": "beep"}]},           # dropped: unknown role
        {"id": "oa", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
                                  {"role": "assistant", "content": "donâ€™t   worry\n\n\n\nok"}]},
    ]  # fmt: skip


def write_raw(path, records, bad_line=True):
    lines = [json.dumps(r) for r in records] + (['{"conversations": [oops'] if bad_line else [])
    path.write_text("\n".join(lines) + "\n")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_data_clean_command_keeps_rejects_and_reports(tmp_path, capsys):
    raw = write_raw(tmp_path / "raw.jsonl", raw_records())
    out = tmp_path / "clean.jsonl"
    assert main(["data", "clean", str(raw), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    kept = {r["id"]: r["conversations"] for r in read_jsonl(out)}
    assert list(kept) == ["html", "debris", "cut", "roles", "oa"]
    assert kept["html"][1]["value"].startswith("Use **snake_case**:\n\n```python\ndef add_one(x):")
    assert kept["debris"][1]["value"] == "Hello! How can I help?"
    assert [t["value"] for t in kept["cut"]] == ["Q1", "A1"]
    assert [(t["from"], t["value"]) for t in kept["roles"]] == [("human", "Q\n\nQ more"), ("gpt", "A")]
    assert kept["oa"] == [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Q"},
                          {"from": "gpt", "value": "don’t   worry\n\nok"}]  # spaces inside a line may align text
    rejects = read_jsonl(tmp_path / "clean.rejects.jsonl")
    by_id = {(r.get("record") or r.get("conversation") or {}).get("id", r["location"]): (r["step"], r["reason"])
             for r in rejects if "cut" not in r}
    assert by_id == {"debris": ("dedup", "same id"), "same-first": ("dedup", "same first exchange"),
                     "error": ("filters", "error reply"), "robot": ("read", "field 'conversations[].from': unknown role"),
                     f"{raw}:10": ("read", "invalid JSON")}  # fmt: skip
    (cut,) = [r for r in rejects if "cut" in r]
    assert cut["location"] == f"{raw}:5" and cut["cut"]["dropped"][1]["content"].startswith("Too many requests")
    report = json.loads((tmp_path / "clean.report.json").read_text())
    assert (report["records"], report["kept"], report["written"], report["rejected"], report["cut"]) == (10, 5, 5, 5, 1)
    assert report["records"] == report["kept"] + report["rejected"]  # nothing lost silently
    steps = report["steps"]
    assert steps["html"]["changes"]["messages converted from HTML"] == 1
    assert steps["html"]["changes"]["regeneration counters"] == 2
    assert steps["roles"]["changes"] == {"role aliases mapped": 1, "same-role turns merged": 1,
                                         "leading assistant turns dropped": 1}
    assert steps["unicode"]["changed"] == 1 and steps["whitespace"]["changed"] == 1
    assert steps["dedup"]["reasons"] == {"same id": 1, "same first exchange": 1}
    assert steps["pii"]["enabled"] is False and steps["split"]["enabled"] is False
    assert "data clean: 10 records -> 5 conversations kept" in printed and "roles" in printed
    assert not list(tmp_path.glob("*.tmp-*"))  # written beside and renamed


def test_data_clean_openai_layout_test_split_and_steps_switched_off(tmp_path):
    records = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"Question {i}?"},
                                                 {"from": "gpt", "value": f"<p>Answer {i}</p>"}]} for i in range(40)]
    raw = write_raw(tmp_path / "raw.jsonl", records, bad_line=False)
    args = ["data", "clean", str(raw), "--output", str(tmp_path / "o.jsonl"), "layout=openai", "test_fraction=0.25",
            "seed=7", "html.enabled=false", "dedup.near.enabled=false"]
    assert main(args) == 0
    train, test = read_jsonl(tmp_path / "o.jsonl"), read_jsonl(tmp_path / "o.test.jsonl")
    assert len(train) + len(test) == 40 and 3 <= len(test) <= 18
    by_id = {r["id"]: r["messages"] for r in train + test}
    assert by_id["c0"] == [{"role": "user", "content": "Question 0?"},
                           {"role": "assistant", "content": "<p>Answer 0</p>"}]  # html off: left as it was
    assert main(args) == 0 and read_jsonl(tmp_path / "o.test.jsonl") == test  # same seed, same split
    assert main(args[:-3] + ["seed=8", "html.enabled=false", "dedup.near.enabled=false"]) == 0
    assert read_jsonl(tmp_path / "o.test.jsonl") != test


def test_data_clean_splits_long_conversations_by_tokens(tmp_path, tiny_model_dir, tiny_tokenizer):
    from corral.chat.templates import get_template

    values = []
    for i in range(12):
        values += [f"Question number {i}?", " ".join(f"answer{i}" for _ in range(12))]
    raw = write_raw(tmp_path / "raw.jsonl", [{"id": "long", "conversations": [
        {"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]}], bad_line=False)
    out = tmp_path / "o.jsonl"
    assert main(["data", "clean", str(raw), "--output", str(out), f"model={tiny_model_dir}", "template=chatml",
                 "split_max_len=128"]) == 0
    pieces = read_jsonl(out)
    fmt = get_template("chatml", tiny_tokenizer)
    assert len(pieces) > 2 and pieces[0]["id"] == "long_0" and pieces[1]["id"].startswith("long_")
    assert [t["value"] for p in pieces for t in p["conversations"]] == values  # every turn once, in order
    for piece in pieces:
        messages = [Message("user" if t["from"] == "human" else "assistant", t["value"]) for t in piece["conversations"]]
        assert len(fmt.render_with_masks(Conversation(messages))[0]) <= 128
    split = json.loads((tmp_path / "o.report.json").read_text())["steps"]["split"]
    assert split["changed"] == 1 and split["changes"]["pieces made"] == len(pieces)


def test_streaming_in_chunks_and_processes_gives_the_same_output(tmp_path):
    records = raw_records() * 3  # duplicates across chunks
    raw = write_raw(tmp_path / "raw.jsonl", records)
    outputs = []
    for extra in ([], ["chunk_size=2", "workers=2"]):
        out = tmp_path / f"o{len(extra)}.jsonl"
        assert main(["data", "clean", str(raw), "--output", str(out), *extra]) == 0
        outputs.append((out.read_text(), (tmp_path / f"o{len(extra)}.rejects.jsonl").read_text()))
    assert outputs[0] == outputs[1]


def test_chunks_are_read_only_as_far_as_the_workers_need():
    consumed = []

    def jobs():
        for i in range(100):
            consumed.append(i)
            yield i

    results = sc.map_ordered(abs, jobs(), workers=2)
    assert next(results) == 0 and len(consumed) <= 5  # 2 x workers in flight, not the whole input
    assert list(results) == list(range(1, 100))


def test_data_stats_counts_tokens_splits_and_duplicates(tmp_path, tiny_model_dir, capsys):
    records = [{"conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": "Yes. " * (i + 1)}]}
               for i in range(6)]  # fmt: skip
    records.append({"system": "Be kind.", "conversations": [
        {"from": "human", "value": "Question 0?"}, {"from": "gpt", "value": "Yes. "},  # same first exchange as #0
        {"from": "human", "value": "More?"}, {"from": "gpt", "value": "word " * 80}]})
    data = tmp_path / "chats.jsonl.gz"
    import gzip

    data.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    out = tmp_path / "report" / "chats.stats.md"
    assert main(["data", "stats", str(data), f"model={tiny_model_dir}", "template=chatml", "max_len=64",
                 f"output={out}"]) == 0
    printed = capsys.readouterr().out
    markdown = out.read_text()
    assert "| conversations | 7 |" in markdown and "| with a system prompt | 1 |" in markdown
    assert "| messages by role | assistant 8, system 1, user 8 |" in markdown
    assert "| multi-turn (more than one exchange) | 1 |" in markdown
    assert "| conversations longer than max_len | 1 |" in markdown and "| split at turn boundaries | 1 |" in markdown
    assert "| same first exchange as an earlier one | 0 (0.0%) |" in markdown  # the system prompt differs
    assert "![tokens per conversation](chats.stats.png)" in markdown
    assert (out.parent / "chats.stats.png").read_bytes()[:4] == b"\x89PNG"
    assert "| conversations | 7 |" in printed


# ---------------------------------------------------------------------------------------------------------
# The fast paths give what the slow ones give


def random_reply_html(rng, depth=0):
    """ChatGPT-page-like markup: blocks, inline tags, code blocks with their header, odd spacing, entities."""
    words = ["alpha", "x_y", "2 * 3", "a`b", "&lt;tag&gt;", "&amp;", "&#39;q&#39;", "&nbsp;", "caf\u00e9", "1.", "#"]
    spaces = ["", " ", "  ", "\n", " \n ", "\t", "\r\n"]

    def text():
        return rng.choice(spaces) + " ".join(rng.choice(words) for _ in range(rng.randint(0, 3))) + rng.choice(spaces)

    def inline(d):
        if d > 2 or rng.random() < 0.4:
            return text()
        if rng.random() < 0.1:
            return rng.choice(["<br>", "<br/>"])
        tag = rng.choice(["strong", "em", "code", "span", "a", "B"])
        attrs = ' href="http://x.org" title="T"' if tag == "a" else ""
        return f"<{tag}{attrs}>{''.join(inline(d + 1) for _ in range(rng.randint(0, 3)))}</{tag}>"

    def block(d):
        kind = rng.random()
        if d > 2 or kind < 0.25:
            return inline(d)
        if kind < 0.4:
            language = rng.choice(["python", "", "c++"])
            code = "".join(rng.choice(["x = 1", "\n", "  ", '<span class="k">def</span>', "&lt;", "\n\n"])
                           for _ in range(rng.randint(0, 6)))  # fmt: skip
            header = rng.choice(["", f'<div><span>{language or "code"}</span><button><svg><path d="M1"/></svg>'
                                     "Copy code</button></div>"])  # fmt: skip
            return f'<pre><div>{header}<code class="hljs language-{language}">{code}</code></div></pre>'
        if kind < 0.6:
            tag = rng.choice(["ol", "ul"])
            items = "".join(f"{rng.choice(spaces)}<li>{''.join(block(d + 1) for _ in range(rng.randint(0, 2)))}</li>"
                            for _ in range(rng.randint(0, 3)))  # fmt: skip
            start = ' start="3"' if tag == "ol" and rng.random() < 0.3 else ""
            return f"<{tag}{start}>{items}</{tag}>"
        tag = rng.choice(["p", "div", "h2", "h3", "blockquote", "hr"])
        if tag == "hr":
            return "<hr>"
        return f"<{tag}>{''.join(rng.choice([block, inline])(d + 1) for _ in range(rng.randint(0, 3)))}</{tag}>"

    counter = rng.choice(["", "1 / 1"])
    return f'<div class="markdown prose">{counter}{"".join(block(depth) for _ in range(rng.randint(1, 5)))}</div>'


def test_fast_html_converter_writes_what_bs4_and_markdownify_write():
    import random

    from corral.data.markdown import convert
    from corral.data.text import _strip_code_spans, html_to_markdown_full

    rng = random.Random(0)
    documents = [CHATGPT_HTML] + [random_reply_html(rng) for _ in range(300)]
    answered = 0
    for document in documents:
        fast = convert(_strip_code_spans(document))
        if fast is not None:
            answered += 1
            assert fast == html_to_markdown_full(document), document
    assert answered >= 280  # nearly all of it is markup the fast converter knows
    # What it does not know it refuses, and html_to_markdown takes the full path for it.
    for unknown in ("<table><tr><td>a</td></tr></table>", "<p>a < b</p>", "<p>&copy; x</p>", "<p>open", "<p>a</div>",
                    "<!-- c --><p>x</p>", '<a href=x>y</a>'):  # fmt: skip
        assert convert(unknown) is None, unknown
        assert html_to_markdown(unknown) == html_to_markdown_full(unknown)


def split_reference(conv, fmt, max_len):
    """split_long as it was: every piece's cut and length from rendering (plan_pieces)."""
    from corral.data.clean import plan_pieces

    planned = plan_pieces(conv, fmt, max_len)
    return [(start, end) for start, end, _ in planned], sum(len(ids) > max_len for _, _, (ids, _) in planned)


@pytest.mark.parametrize("template", ["chatml", "llama2", "auto"])
def test_split_by_unit_lengths_cuts_where_rendering_cuts(tiny_tokenizer, template):
    import random

    from corral.chat.templates import get_template
    from corral.data.clean import exchanges_of, split_long

    fmt = get_template(template, tiny_tokenizer)
    rng = random.Random(template)
    for k in range(30):
        pairs = []
        for i in range(rng.randint(1, 12)):
            pairs += [("user", " ".join(f"q{i}w{j}" for j in range(rng.randint(1, 10)))),
                      ("assistant", " ".join(f"a{i}x{j}" for j in range(rng.choice([1, 4, 15, 50]))))]
        conv = Conversation.from_pairs(*pairs, system="Be brief." if k % 3 == 0 else None)
        conv.id = f"c{k}"
        for max_len in (30, 80, 200, 10_000):
            cuts, too_long = split_reference(conv, fmt, max_len)
            pieces, got_too_long = split_long(conv, fmt, max_len)
            exchanges = exchanges_of(conv)
            expected = [[m for e in exchanges[start:end] for m in e] for start, end in cuts]
            assert [p.turns for p in pieces] == expected and got_too_long == too_long, (k, max_len)
            assert [p.id for p in pieces] == ([conv.id] if len(cuts) == 1 else [f"c{k}_{2 * s}" for s, _ in cuts])


def test_a_rendering_of_fewer_bytes_than_max_len_is_not_tokenized(tiny_tokenizer):
    from tokenizers import normalizers

    from corral.chat.templates import get_template
    from corral.data.clean import split_long, tokens_at_most_bytes

    assert tokens_at_most_bytes(tiny_tokenizer)  # byte-level BPE: each token is at least one byte
    normalized = copy_tokenizer(tiny_tokenizer)
    normalized.backend_tokenizer.normalizer = normalizers.NFKC()  # may lengthen text: no bound
    assert not tokens_at_most_bytes(normalized)
    fmt = get_template("chatml", tiny_tokenizer)
    conv = Conversation.from_pairs(("user", "Hi there"), ("assistant", "Hello! How are you?"))
    rendered = len(fmt.render_text(conv, add_generation_prompt=False).encode())
    calls = []
    fmt.tokenizer = CountingTokenizer(tiny_tokenizer, calls)
    assert split_long(conv, fmt, rendered) == ([conv], 0) and calls == []  # fits by its bytes: not tokenized
    assert split_long(conv, fmt, rendered - 1) == ([conv], 0) and calls  # counted: still fits in tokens


class CountingTokenizer:
    """A tokenizer that records every batch it tokenizes, through its call or its Rust backend."""

    def __init__(self, tokenizer, calls):
        self.tokenizer, self.calls = tokenizer, calls
        self.backend_tokenizer = CountingBackend(tokenizer.backend_tokenizer, calls)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, texts, **kwargs):
        self.calls.append(texts)
        return self.tokenizer(texts, **kwargs)


class CountingBackend:
    def __init__(self, backend, calls):
        self.backend, self.calls = backend, calls

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def encode_batch_fast(self, texts, **kwargs):
        self.calls.append(texts)
        return self.backend.encode_batch_fast(texts, **kwargs)


def test_token_counts_equal_the_tokenizers_own_call(tiny_tokenizer):
    """The backend shortcut counts what the tokenizer's call counts, special tokens and non-ASCII text included;
    a tokenizer told to split special tokens (which the backend call would not) goes through its call."""
    from corral.data.clean import token_counts

    texts = ["<|im_start|>user\nHi there<|im_end|>\n", "naïve café – 東京 🙂", "", "  spaced   out\n\n", "x" * 300]
    special = tiny_tokenizer.all_special_tokens[0]
    texts.append(f"{special}mid{special}")
    expected = [len(ids) for ids in tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert token_counts(tiny_tokenizer, texts) == expected
    assert len(tiny_tokenizer(special, add_special_tokens=False)["input_ids"]) == 1  # the case that needs care
    splitting = copy_tokenizer(tiny_tokenizer)
    splitting.add_special_tokens({"additional_special_tokens": [special]})
    splitting.split_special_tokens = True
    split = len(splitting(special, add_special_tokens=False)["input_ids"])
    assert split > 1 and token_counts(splitting, [special]) == [split]


def copy_tokenizer(tokenizer):
    from transformers import PreTrainedTokenizerFast

    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))


def test_shingles_hash_each_word_as_before():
    import zlib

    import numpy as np

    from corral.data.dedup import shingle_hashes

    text = "The cat sat on the mat, and the cat sat again: the end. " * 7
    words = text.casefold().replace(",", " ").replace(":", " ").replace(".", " ").split()
    hashes = np.array([zlib.crc32(w.encode()) for w in words], dtype=np.uint64)
    combined = np.zeros(len(words) - 4, dtype=np.uint64)
    for j in range(5):
        combined = combined * np.uint64(1_000_003) + hashes[j : len(words) - 4 + j]
    expected = np.unique((combined ^ (combined >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    assert np.array_equal(shingle_hashes(text), expected)


def test_workers_split_in_their_processes_and_write_the_same_files(tmp_path, tiny_model_dir):
    values = []
    for i in range(9):
        values += [f"Question number {i}?", " ".join(f"answer{i}" for _ in range(12))]
    records = raw_records() + [{"id": f"long{k}", "conversations": [
        {"from": "human" if j % 2 == 0 else "gpt", "value": f"{v} {k}"} for j, v in enumerate(values)]}
        for k in range(4)]  # fmt: skip
    raw = write_raw(tmp_path / "raw.jsonl", records * 2)  # the second half: duplicates, split in the workers too
    outputs = []
    for extra in (["workers=1"], ["workers=2", "chunk_size=3"]):
        out = tmp_path / f"o-{extra[0]}.jsonl"
        assert main(["data", "clean", str(raw), "--output", str(out), f"model={tiny_model_dir}", "template=chatml",
                     "split_max_len=96", *extra]) == 0  # fmt: skip
        report = json.loads(out.with_suffix(".report.json").read_text())
        outputs.append((out.read_text(), out.with_suffix(".rejects.jsonl").read_text(),
                        {k: {**v, "seconds": 0} for k, v in report["steps"].items()}))  # fmt: skip
    assert outputs[0] == outputs[1]
    split = outputs[0][2]["split"]
    assert split["seen"] == 9 and split["changed"] == 5  # the 4 long chats split, the HTML one too long in one exchange
    assert split["changes"]["pieces made"] > 8
    assert split["changes"]["pieces still longer than max_len (one long exchange)"] == 1


def test_workers_finish_with_tokenizers_parallelism_exported(tmp_path, tiny_model_dir):
    """TOKENIZERS_PARALLELISM=true turns off the tokenizers library's after-fork guard, and a forked worker's first
    batch call then hung for good: the workers now keep the library's threads off. In a child process, with a
    timeout, so that a hang fails this test instead of the suite."""
    import os
    import subprocess
    import sys

    values = [f"turn {j} " + "word " * 30 for j in range(12)]
    records = [{"id": f"c{k}", "conversations": [{"from": "human" if j % 2 == 0 else "gpt", "value": f"{v}{k}"}
                                                 for j, v in enumerate(values)]} for k in range(6)]  # fmt: skip
    raw = write_raw(tmp_path / "raw.jsonl", records)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    done = subprocess.run([sys.executable, "-m", "corral.cli", "data", "clean", str(raw), "--output", str(out),
                           f"model={tiny_model_dir}", "template=chatml", "split_max_len=96", "workers=2",
                           "chunk_size=2"], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(out.with_suffix(".report.json").read_text())["steps"]["split"]["changed"] == 6
