"""Templates (`data.template`): each trains every answer plus exactly one EOS and nothing else, predict feeds the
training ids up to where the answer starts, and an exported tokenizer's chat_template renders those same ids."""

from __future__ import annotations

import pytest

from lima_lightning.data import templates
from lima_lightning.data.conversations import Conversation
from lima_lightning.data.tokenization import (
    IGNORE_INDEX,
    PROBE_CONVERSATIONS,
    chat_messages,
    encode_conversation,
    encode_prompt,
    set_chat_template,
)
from lima_lightning.errors import UserError
from tests.conftest import LIMA_TRAIN, needs_lima

# The chat_template of Meta's meta-llama/Llama-2-7b-chat-hf tokenizer (its tokenizer_config.json), verbatim.
META_LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# Zephyr's layout: a role header per message, EOS and a newline after each; the generation prompt opens the answer.
ZEPHYR = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
TEMPLATES = ["llama2-chat", "lima", "tokenizer"]
CONVERSATIONS = [
    *PROBE_CONVERSATIONS,
    Conversation(("Hi", "Yo")),
    Conversation(("  What is 2 + 3?", "5  ", "And times 4?", "20", "Thanks!"), system="You are terse."),  # ends on a user turn
    Conversation(("Line one\nline two", "Tab\tand ☃ snow", "a", "b", "c", "d")),
]


@pytest.fixture
def tok(tiny_tokenizer):
    """The tiny tokenizer with Zephyr's chat_template for data.template=tokenizer (restored afterwards)."""
    before = tiny_tokenizer.chat_template
    tiny_tokenizer.chat_template = ZEPHYR
    yield tiny_tokenizer
    tiny_tokenizer.chat_template = before


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def trained_runs(example: dict) -> list[tuple[int, list[int]]]:
    """(start, ids) of each maximal run of trained positions."""
    runs: list[tuple[int, list[int]]] = []
    for i, (token, label) in enumerate(zip(example["input_ids"], example["labels"], strict=True)):
        if label == IGNORE_INDEX:
            continue
        assert label == token  # a trained label is the token at its position (the model shifts)
        if runs and runs[-1][0] + len(runs[-1][1]) == i:
            runs[-1][1].append(token)
        else:
            runs.append((i, [token]))
    return runs


def check_mask_and_prefixes(conversation: Conversation, tokenizer, template: str) -> None:
    """Each answer (and nothing else) is one trained run ending in its only EOS; predict's ids at every answer are the
    training ids up to where that answer starts."""
    example = encode_conversation(conversation, tokenizer, template)
    answers = conversation.turns[1 : len(conversation.turns) - conversation.ends_on_user : 2]
    runs = trained_runs(example)
    assert len(runs) == len(answers) and example["labels"][0] == IGNORE_INDEX, conversation.where
    eos = tokenizer.eos_token_id
    for (start, run), answer, k in zip(runs, answers, range(1, 2 * len(answers), 2), strict=True):
        assert run[-1] == eos and run.count(eos) == 1, conversation.where
        written = tokenizer.decode(run[:-1], skip_special_tokens=False).strip()
        assert written == tokenizer.decode(ids(tokenizer, answer.strip())).strip(), conversation.where
        if template != "tokenizer":  # text templates: the answer tokenized on its own, exactly
            assert run == [*ids(tokenizer, answer.strip()), eos]
        prefix = Conversation(conversation.turns[:k], conversation.system, conversation.where)
        assert encode_prompt(prefix, tokenizer, template) == example["input_ids"][:start], conversation.where
    if conversation.ends_on_user:  # the prompt for a trailing user turn continues the training ids
        prompt = encode_prompt(conversation, tokenizer, template)
        assert prompt[: len(example["input_ids"])] == example["input_ids"] and len(prompt) > len(example["input_ids"])


# ----------------------------------------------------------------------------- hand-built layouts (tiny tokenizer)
def test_llama2_chat_and_lima_lay_out_ids_and_labels_as_documented(tok):
    conversation = Conversation(("U1", "A1", "U2", "A2"), system="S")
    bos, eos, x = tok.bos_token_id, tok.eos_token_id, IGNORE_INDEX
    a1, a2 = [*ids(tok, "A1"), eos], [*ids(tok, "A2"), eos]
    first, second = [bos, *ids(tok, "[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST]")], [bos, *ids(tok, "[INST] U2 [/INST]")]
    assert encode_conversation(conversation, tok, "llama2-chat") == {
        "input_ids": first + a1 + second + a2,
        "labels": [x] * len(first) + a1 + [x] * len(second) + a2,
    }
    # LIMA paper: one BOS, every utterance ended by EOS (the paper's EOT); the system prompt opens the first one.
    first, second = [bos, *ids(tok, "S\n\nU1"), eos], [*ids(tok, "U2"), eos]
    assert encode_conversation(conversation, tok, "lima") == {
        "input_ids": first + a1 + second + a2,
        "labels": [x] * len(first) + a1 + [x] * len(second) + a2,
    }
    assert encode_prompt(Conversation(("U1", "A1", "U2")), tok, "lima") == [bos, *ids(tok, "U1"), eos, *a1, *second]


def test_tokenizer_template_trains_each_answer_and_its_eos_but_not_the_template_text_after_it(tok):
    """Zephyr: `<|assistant|>\\n` comes with the generation prompt (untrained), the newline after EOS is untrained."""
    conversation = Conversation(("U1", "5", "U2", "20"))
    example = encode_conversation(conversation, tok, "tokenizer")
    rendered = tok.apply_chat_template(chat_messages(conversation), tokenize=False)
    assert rendered == "<s><|user|>\nU1</s>\n<|assistant|>\n5</s>\n<|user|>\nU2</s>\n<|assistant|>\n20</s>\n"
    assert example["input_ids"] == ids(tok, rendered)
    chars = tok.convert_tokens_to_ids  # after a newline the tiny tokenizer has no word-boundary mark: one id per character
    trained = [(start, run) for start, run in trained_runs(example)]
    assert [run for _, run in trained] == [[*chars(["5"]), tok.eos_token_id], [*chars(["2", "0"]), tok.eos_token_id]]
    assert example["input_ids"][trained[0][0] - 1] == chars("<0x0A>") and example["labels"][trained[0][0] + 2] == IGNORE_INDEX
    prompt = tok.apply_chat_template(chat_messages(Conversation(("U1",))), add_generation_prompt=True, tokenize=False)
    assert encode_prompt(Conversation(("U1",)), tok, "tokenizer") == ids(tok, prompt) == example["input_ids"][: trained[0][0]]


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_trains_answers_with_one_eos_and_predict_feeds_the_training_prefix(template, tok):
    for conversation in CONVERSATIONS:
        check_mask_and_prefixes(conversation, tok, template)


# ----------------------------------------------------------------------------- data.template=tokenizer refuses what it cannot mask
@pytest.mark.parametrize(
    "chat_template, says",
    [
        (None, "data.template=tokenizer: the tokenizer of "),
        ("{{ messages|length }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}", "gives no exact answer mask"),
        ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}", "ends assistant turn 1 without EOS"),
        ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}", "writes template text into assistant"),
        ("{{ raise_exception('no system prompts') }}", "the tokenizer's chat_template refused this conversation (no system prompts)"),
    ],
)
def test_tokenizer_template_without_an_exact_mask_is_one_line(chat_template, says, tok):
    tok.chat_template = chat_template
    with pytest.raises(UserError) as error:
        encode_conversation(Conversation(("Hi", "Yo"), where="d.jsonl:3"), tok, "tokenizer")
    message = str(error.value)
    assert says in message and "\n" not in message, message
    assert chat_template is None or message.startswith("d.jsonl:3: data.template=tokenizer: ")
    if chat_template is None:
        assert "has no chat_template" in message and "use data.template=llama2-chat or lima" in message


# ----------------------------------------------------------------------------- chat_template for an exported tokenizer
def every_prompt(conversation: Conversation):
    """The conversation cut after each user turn: every prompt predict or chat would feed along it."""
    for k in range(1, len(conversation.turns) + 1, 2):
        yield Conversation(conversation.turns[:k], conversation.system, conversation.where)


def check_chat_template(tokenizer, template: str, conversations) -> None:
    for conversation in conversations:
        for prompt in every_prompt(conversation):
            rendered = tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True)["input_ids"]
            assert list(rendered) == encode_prompt(prompt, tokenizer, template), (template, conversation.where)


@pytest.mark.parametrize("template", ["llama2-chat", "lima"])
def test_chat_template_renders_exactly_the_prompt_ids(template, tiny_tokenizer):
    before = tiny_tokenizer.chat_template
    try:
        set_chat_template(tiny_tokenizer, template)
        assert tiny_tokenizer.chat_template == templates.CHAT_TEMPLATES[template]
        check_chat_template(tiny_tokenizer, template, CONVERSATIONS)
    finally:
        tiny_tokenizer.chat_template = before


def test_set_chat_template_refuses_a_template_that_renders_other_ids(tiny_tokenizer, monkeypatch):
    """Without the space after <s>, the rendering tokenizes differently: refused in one line, nothing set."""
    monkeypatch.setitem(templates.CHAT_TEMPLATES, "lima", templates.LIMA_JINJA.replace("{{ ' ' + ", "{{ "))
    before = tiny_tokenizer.chat_template
    with pytest.raises(UserError, match=r"^data.template=lima: the tokenizer of .* does not tokenize the rendered chat_template"):
        set_chat_template(tiny_tokenizer, "lima")
    assert tiny_tokenizer.chat_template == before


def test_export_writes_the_runs_template_into_the_tokenizer(tmp_path, tiny_dir, capsys):
    """#14: `apply_chat_template` on the exported tokenizer gives exactly the ids `predict` feeds the model."""
    import yaml
    from transformers import AutoTokenizer

    from lima_lightning.cli import main
    from tests.test_export import make_run

    adapter = make_run(tmp_path / "run", tiny_dir, "none")
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({**config, "data": {"template": "lima"}}))
    main(["export", "--adapter_path", str(adapter), "--out", str(tmp_path / "out"), "--dtype", "fp32"])
    assert "chat_template renders data.template=lima" in capsys.readouterr().out
    exported = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert exported.chat_template == templates.LIMA_JINJA
    check_chat_template(exported, "lima", CONVERSATIONS)


# ----------------------------------------------------------------------------- the real Llama-2 tokenizer on LIMA
@pytest.fixture(scope="module")
def lima_rows():
    """LIMA's 30 multi-turn conversations and its first 60 others (the 1022nd ends on a user turn)."""
    if not LIMA_TRAIN.is_file():
        pytest.skip("../shared/lima is absent (a fresh clone)")
    from lima_lightning.data.conversations import read_conversations

    rows = read_conversations(LIMA_TRAIN)
    return [c for c in rows if len(c.turns) > 2] + [c for c in rows if len(c.turns) <= 2][:60]


@pytest.fixture
def llama2(llama2_tokenizer):
    before = llama2_tokenizer.chat_template
    yield llama2_tokenizer
    llama2_tokenizer.chat_template = before


@needs_lima
@pytest.mark.parametrize("template", TEMPLATES)
def test_llama2_tokenizer_masks_and_prefixes_on_lima(template, lima_rows, llama2):
    """llama2-chat against Meta's format on all of LIMA: test_correctness_label_mask.py. Here every template, and
    data.template=tokenizer with Meta's own Llama-2-chat chat_template (whose answers end `answer </s>`)."""
    llama2.chat_template = META_LLAMA2_CHAT
    for conversation in [*lima_rows, *CONVERSATIONS]:
        check_mask_and_prefixes(conversation, llama2, template)
    if template == "tokenizer":  # the trailing space Meta's template writes before EOS is trained with it (the path to EOS)
        example = encode_conversation(Conversation(("Hi", "Hello")), llama2, "tokenizer")
        assert llama2.convert_ids_to_tokens(trained_runs(example)[0][1]) == ["▁Hello", "▁", "</s>"]


@needs_lima
@pytest.mark.parametrize("template", ["llama2-chat", "lima", "tokenizer"])
def test_llama2_chat_template_renders_the_prompt_ids_on_lima(template, lima_rows, llama2):
    """BOS and spaces: with `legacy: false`, text after <s> or </s> gets no word boundary, so the template writes one."""
    if template == "tokenizer":
        llama2.chat_template = META_LLAMA2_CHAT
    set_chat_template(llama2, template)
    check_chat_template(llama2, template, [*lima_rows, *CONVERSATIONS])
    rendered = llama2.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered == {"llama2-chat": "<s> [INST] Hi [/INST]", "lima": "<s> Hi</s>", "tokenizer": "<s>[INST] Hi [/INST]"}[template]
