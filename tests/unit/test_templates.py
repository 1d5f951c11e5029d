"""Every template: inference rendering is a token prefix of training rendering; labels are exactly the replies."""

import pytest
from transformers import PreTrainedTokenizerFast

from corral.chat.conversation import Conversation, Message
from corral.chat.templates import IGNORE_INDEX, TEMPLATE_NAMES, TEMPLATES, TemplateError, get_template

REPLIES = ["Hello! I am Corral's assistant.", "Two plus two is 4.", "Goodbye {and} take care."]


def conversation(system: str | None) -> Conversation:
    return Conversation.from_pairs(
        ("user", "Hi, who are you?"), ("assistant", REPLIES[0]),
        ("user", "What is 2+2?"), ("assistant", REPLIES[1]),
        ("user", "Thanks, bye."), ("assistant", REPLIES[2]),
        system=system,
    )  # fmt: skip


def labelled_spans(labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for label in labels:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
@pytest.mark.parametrize("system", [None, "You are terse."])
def test_prompt_of_first_k_turns_is_token_prefix_of_training_rendering(tiny_tokenizer, name, system):
    fmt = get_template(name, tiny_tokenizer)
    conv = conversation(system)
    ids, labels = fmt.render_with_masks(conv)
    assert len(ids) == len(labels)
    messages = conv.messages
    offset = 1 if system else 0
    for k in range(3):
        prompt = Conversation(messages[: offset + 2 * k + 1])  # ... up to the k-th user message
        prompt_ids = fmt.render(prompt)
        assert ids[: len(prompt_ids)] == prompt_ids, f"{name}: turn {k} prompt is not a prefix"
        # The reply of turn k starts right where the prompt ends: the first trained token.
        assert labels[len(prompt_ids)] != IGNORE_INDEX
        assert all(label == IGNORE_INDEX for label in labels[len(prompt_ids) - 1 : len(prompt_ids)])


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_labels_decode_to_each_reply_plus_end_of_turn(tiny_tokenizer, name):
    fmt = get_template(name, tiny_tokenizer)
    ids, labels = fmt.render_with_masks(conversation("Be kind."))
    spans = labelled_spans(labels)
    assert len(spans) == 3, f"{name}: expected one trained span per assistant turn"
    end_of_turn = fmt.stop_strings[0]
    for span, reply in zip(spans, REPLIES):
        text = tiny_tokenizer.decode(span)
        assert text.strip() == f"{reply}{end_of_turn}".strip() or text.strip() == f"{reply} {end_of_turn}".strip()
        # The end-of-turn token is trained: the model must learn to stop.
        assert set(span) & set(fmt.stop_token_ids)
    # Nothing else is trained: system, user and template text are all IGNORE_INDEX.
    trained = sum(len(s) for s in spans)
    assert trained == sum(label != IGNORE_INDEX for label in labels)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_exported_jinja_renders_the_same_text(tiny_tokenizer, name):
    fmt = get_template(name, tiny_tokenizer)
    for system in (None, "Sys prompt."):
        conv = conversation(system)
        messages = conv.to_openai()
        jinja_train = tiny_tokenizer.apply_chat_template(messages, chat_template=fmt.chat_template_jinja, tokenize=False)
        assert jinja_train == fmt.render_text(conv, add_generation_prompt=False)
        prompt = Conversation(conv.messages[: (1 if system else 0) + 3])
        jinja_prompt = tiny_tokenizer.apply_chat_template(
            prompt.to_openai(), chat_template=fmt.chat_template_jinja, tokenize=False, add_generation_prompt=True
        )
        assert jinja_prompt == fmt.render_text(prompt, add_generation_prompt=True)


def test_registered_formats_match_reference_strings(tiny_tokenizer):
    conv = Conversation.from_pairs(("user", "Hi"), ("assistant", "Hey"), ("user", "Bye"), ("assistant", "Ciao"), system="S")
    expected = {
        "vicuna_v1.1": "<s>S USER: Hi ASSISTANT: Hey</s>USER: Bye ASSISTANT: Ciao</s>",
        "alpaca": "<s>S\n\n### Instruction:\nHi\n\n### Response:\nHey</s>\n\n### Instruction:\nBye\n\n### Response:\nCiao</s>\n\n",
        "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHey<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nCiao<|im_end|>\n",
        "llama2": "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST] Hey </s><s>[INST] Bye [/INST] Ciao </s>",
        "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHey<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nCiao<|eot_id|>",
    }
    for name, text in expected.items():
        assert get_template(name, tiny_tokenizer).render_text(conv, add_generation_prompt=False) == text, name


def test_auto_uses_tokenizer_template_with_its_default_system(tiny_tokenizer):
    fmt = get_template("auto", tiny_tokenizer)
    text = fmt.render_text(Conversation.from_pairs(("user", "Hi")))
    assert text == "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert fmt.stop_strings == ["<|im_end|>"]
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") in fmt.stop_token_ids


def test_auto_refuses_template_that_rewrites_history(tiny_tokenizer):
    # Like templates that drop earlier reasoning: turn 1 renders differently once turn 2 exists.
    tok = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="</s>")
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[old]{% else %}"
        "<{{ m['role'] }}>{{ m['content'] }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    fmt = get_template("auto", tok)
    with pytest.raises(TemplateError, match="not a prefix|prefix-consistent"):
        fmt.render_with_masks(conversation(None))


def test_bad_conversations_are_refused_with_their_source(tiny_tokenizer):
    fmt = get_template("chatml", tiny_tokenizer)
    bad = Conversation([Message("user", "a"), Message("user", "b")], source="data.jsonl:7")
    with pytest.raises(TemplateError, match="data.jsonl:7: message 1: expected role 'assistant'"):
        fmt.render_with_masks(bad)
    with pytest.raises(TemplateError, match="must end with an assistant reply"):
        fmt.render_with_masks(Conversation.from_pairs(("user", "a")))
    with pytest.raises(TemplateError, match="unknown template 'zephyr'"):
        get_template("zephyr", tiny_tokenizer)


def test_template_needing_missing_special_tokens_is_refused():
    # A tokenizer that never saw Llama 3's markers: llama3 would split '<|eot_id|>' into pieces.
    plain = PreTrainedTokenizerFast(tokenizer_object=_plain_tokenizer(), eos_token="</s>")
    with pytest.raises(TemplateError, match="'<\\|eot_id\\|>' as one token"):
        get_template("llama3", plain)


def _plain_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>", "<|begin_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["hello world"], trainer)
    return tok


def test_a_template_that_adds_a_system_prompt_says_so_and_can_leave_it_out(tiny_tokenizer):
    """template=auto on a tokenizer whose template adds a default system prompt (as SmolLM2's does): the text is
    found, the run says so once, and data.template_system=false renders records without it."""
    from corral.chat.conversation import Conversation
    from corral.recipes.runs import system_prompt_policy

    auto = get_template("auto", tiny_tokenizer)
    assert auto.added_system_text() == "You are a tiny test model."
    assert get_template("chatml", tiny_tokenizer).added_system_text() == ""
    assert get_template("vicuna_v1.1", tiny_tokenizer).added_system_text().startswith("A chat between a curious user")
    conv = Conversation.from_pairs(("user", "Who are you?"), ("assistant", "Corral."))
    said = []
    keep = system_prompt_policy(auto, True, said.append)
    assert keep(conv) is conv and len(said) == 1 and "You are a tiny test model." in said[0]
    leave_out = system_prompt_policy(auto, False, said.append)
    text = auto.render_text(leave_out(conv), add_generation_prompt=False)
    assert "tiny test model" not in text and text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWho")
    with_system = Conversation.from_pairs(("user", "Hi"), ("assistant", "Hello"), system="Be brief.")
    assert leave_out(with_system) is with_system  # a record's own system message is never touched
    said.clear()
    assert system_prompt_policy(get_template("chatml", tiny_tokenizer), True, said.append)(conv) is conv and not said
