"""Tokenize conversations into `input_ids` and `labels` (`-100` where no loss is taken).

With a text template (`llama2-chat`, `lima`: `templates.py`) each segment is tokenized on its own and the ids
concatenated; for `llama2-chat`:

    [BOS] prompt(user_1)  assistant_1 [EOS]  [BOS] prompt(user_2)  assistant_2 [EOS] ...
    \\_____ untrained ___/ \\___ trained ___/  \\_____ untrained ___/ \\___ trained ___/

so the boundary between what is trained and what is not falls exactly between token ids. With
`data.template=tokenizer` the segments are differences between renderings of growing prefixes of the
conversation by the tokenizer's own chat_template (`_tokenizer_template_pieces`). Either way a prompt at
predict time is the very same id sequence as the prefix in training (`encode_prompt` and
`encode_conversation` share `_segments`), and `set_chat_template` gives a tokenizer a chat_template whose
`apply_chat_template` renders those same ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from lima_lightning.data.conversations import Conversation
from lima_lightning.data.templates import CHAT_TEMPLATES, TEXT_TEMPLATES
from lima_lightning.errors import UserError

IGNORE_INDEX = -100  # label value PyTorch's cross_entropy skips
TEMPLATE_NAMES = (*TEXT_TEMPLATES, "tokenizer")


def _text_template(template: str):
    if template not in TEXT_TEMPLATES:
        raise UserError(f"data.template={template}: unknown template; use one of {', '.join(TEMPLATE_NAMES)}")
    return TEXT_TEMPLATES[template]


def segment_texts(conversation: Conversation, template: str):
    """Yield (text, trained) per segment of a text template, before tokenization: a rendered prompt, then an answer, ...

    BOS and EOS are ids, added by `_segments`, not part of this text (`rendered_segments` shows them).
    """
    for segment in _text_template(template)(conversation):
        yield segment.text, segment.trained


def _segments(conversation: Conversation, tokenizer, template: str) -> Iterator[tuple[list[int], bool]]:
    """Yield (ids, trained) segments: with a text template, each segment's text tokenized alone between its BOS/EOS ids."""
    if template == "tokenizer":
        for _, ids, trained in _tokenizer_template_pieces(conversation, tokenizer):
            yield ids, trained
        return
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for segment in _text_template(template)(conversation):
        ids = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
        yield [bos] * segment.bos + ids + [eos] * segment.eos, segment.trained


def rendered_segments(conversation: Conversation, tokenizer, template: str) -> list[tuple[str, bool]]:
    """(text, trained) of each segment `encode_conversation` trains on, as its ids should decode (`lima-lightning inspect`).

    A trailing user turn is left out, as in training. With a text template: BOS and EOS as their token text, and a
    single space before each segment's text, the word boundary a Llama tokenizer puts at the start of a separately
    tokenized text (`<s> [INST] hi [/INST]`, ` yo</s>`). With `tokenizer`: the chat_template's own rendering, cut
    where the ids are.
    """
    if conversation.ends_on_user:
        conversation = Conversation(conversation.turns[:-1], conversation.system, conversation.where)
    if template == "tokenizer":
        return [(text, trained) for text, _, trained in _tokenizer_template_pieces(conversation, tokenizer)]
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    return [(f"{bos if s.bos else ''} {s.text}{eos if s.eos else ''}", s.trained) for s in _text_template(template)(conversation)]


# ----------------------------------------------------------------------------- data.template=tokenizer
def chat_messages(conversation: Conversation) -> list[dict[str, str]]:
    """The conversation as `apply_chat_template` takes it: an optional system message, then user and assistant turns."""
    messages = [{"role": "system", "content": conversation.system.strip()}] if conversation.system else []
    roles = ("user", "assistant")
    return messages + [{"role": roles[i % 2], "content": turn.strip()} for i, turn in enumerate(conversation.turns)]


def _check_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"data.template=tokenizer: the tokenizer of {tokenizer.name_or_path} has no chat_template "
            "(base Llama-2 has none); use data.template=llama2-chat or lima, or a base model whose tokenizer has one"
        )


def _render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2's TemplateError, a template's raise_exception, ...
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(
            f"{where}: data.template=tokenizer: the tokenizer's chat_template refused this conversation ({reason}); "
            "use data.template=llama2-chat or lima"
        ) from None


def _tokenizer_template_pieces(conversation: Conversation, tokenizer) -> list[tuple[str, list[int], bool]]:
    """(text, ids, trained) pieces of the conversation rendered by the tokenizer's chat_template, exactly masked.

    The chat_template renders whole conversations, so each turn's ids are the difference between consecutive
    renderings of growing prefixes: messages up to a user turn with the generation prompt (what predict feeds the
    model), then up to its answer without it. Each rendering's ids must begin with the previous one's, or no exact
    mask exists (a one-line error). An answer's piece is trained up to and including its last EOS: the answer text,
    whitespace the template writes before EOS (the model has to generate it to reach EOS) and the EOS; whatever the
    template writes after EOS is not trained. Any other template text in it is an error.
    """
    _check_chat_template(tokenizer)
    eos, where = tokenizer.eos_token_id, conversation.where or "conversation"
    messages = chat_messages(conversation)
    first = len(messages) - len(conversation.turns)  # 1 with a system message
    pieces: list[tuple[str, list[int], bool]] = []
    before_text, before_ids = "", []
    for k in range(len(conversation.turns)):
        answer = k % 2 == 1
        text = _render(tokenizer, messages[: first + k + 1], not answer, where)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids[: len(before_ids)] != before_ids or not text.startswith(before_text):
            raise UserError(
                f"{where}: data.template=tokenizer: the tokenizer's chat_template gives no exact answer mask: the ids of the "
                f"first {first + k} messages are not the beginning of the ids of the first {first + k + 1}; "
                "use data.template=llama2-chat or lima"
            )
        new_text, new_ids = text[len(before_text) :], ids[len(before_ids) :]
        before_text, before_ids = text, ids
        if not answer:
            pieces.append((new_text, new_ids, False))
            continue
        if eos not in new_ids:
            raise UserError(
                f"{where}: data.template=tokenizer: the tokenizer's chat_template ends assistant turn {k // 2 + 1} without EOS "
                f"({tokenizer.eos_token}), so the model would not learn to stop; use data.template=llama2-chat or lima"
            )
        end = len(new_ids) - new_ids[::-1].index(eos)  # through the last EOS
        written = _decode(tokenizer, new_ids[: end - 1]).strip()
        expected = _decode(tokenizer, tokenizer(messages[first + k]["content"], add_special_tokens=False)["input_ids"]).strip()
        if written != expected:
            raise UserError(
                f"{where}: data.template=tokenizer: the tokenizer's chat_template writes template text into assistant turn "
                f"{k // 2 + 1} (it renders {written[:60]!r}... for {expected[:60]!r}...), which would be trained; "
                "use data.template=llama2-chat or lima"
            )
        cut = new_text.rfind(tokenizer.eos_token) + len(tokenizer.eos_token) if tokenizer.eos_token in new_text else len(new_text)
        pieces.append((new_text[:cut], new_ids[:end], True))
        if end < len(new_ids):
            pieces.append((new_text[cut:], new_ids[end:], False))
    return pieces


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def encode_conversation(conversation: Conversation, tokenizer, template: str = "llama2-chat") -> dict[str, list[int]]:
    """Every assistant turn is trained with its full earlier context; a trailing user turn is dropped."""
    if conversation.ends_on_user:
        conversation = Conversation(conversation.turns[:-1], conversation.system, conversation.where)
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trained in _segments(conversation, tokenizer, template):
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    # The first token (BOS) is never a target: in a packed row it would be predicted from the previous
    # conversation's last token, which unpacked training never does. Collation relies on this.
    assert not labels or labels[0] == IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}


def without_targets(example: dict[str, list[int]]) -> dict[str, list[int]]:
    """A copy of `example` that trains nothing (every label ignored): DDP's padding for an uneven epoch."""
    return {**example, "labels": [IGNORE_INDEX] * len(example["labels"])}


def prompt_turns(conversation: Conversation) -> Conversation:
    """The conversation up to and including its last user turn: what the model is asked to answer."""
    turns = conversation.turns if conversation.ends_on_user else conversation.turns[:-1]
    return Conversation(turns, conversation.system, conversation.where)


def encode_prompt(conversation: Conversation, tokenizer, template: str = "llama2-chat") -> list[int]:
    """Ids the model receives at predict time: earlier turns in full, then the last user turn's prompt."""
    conversation = prompt_turns(conversation)
    input_ids: list[int] = []
    for ids, _ in _segments(conversation, tokenizer, template):
        input_ids += ids
    return input_ids


@dataclass
class TokenizationStats:
    """What happened to a dataset on its way to training examples; logged at the start of fit."""

    conversations: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    trailing_user_turns: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated_where: list[str] = field(default_factory=list)
    example_where: list[str] = field(default_factory=list)  # `file:line` of each example, in order

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if isinstance(v, int)}


def tokenize_for_training(
    conversations: list[Conversation], tokenizer, template: str, max_seq_length: int
) -> tuple[list[dict[str, list[int]]], TokenizationStats]:
    """Encode, truncate to `max_seq_length` and drop examples left with no trained token."""
    stats = TokenizationStats(conversations=len(conversations))
    examples = []
    for conversation in conversations:
        stats.trailing_user_turns += conversation.ends_on_user
        example = encode_conversation(conversation, tokenizer, template)
        if len(example["input_ids"]) > max_seq_length:
            # Cut input_ids and labels at the same index: labels stay aligned, no EOS is invented at the cut.
            example = {k: v[:max_seq_length] for k, v in example.items()}
            stats.truncated += 1
            stats.truncated_where.append(conversation.where)
        n_trained = sum(label != IGNORE_INDEX for label in example["labels"])
        if n_trained == 0:
            stats.dropped_no_target += 1
            continue
        stats.tokens += len(example["input_ids"])
        stats.trained_tokens += n_trained
        stats.example_where.append(conversation.where)
        examples.append(example)
    stats.examples = len(examples)
    return examples, stats


def prompts_for_generation(conversations: list[Conversation], tokenizer, template: str) -> list[dict]:
    """One prompt per conversation, in input order (`id` is the row index): predict and the samples callback.

    `prompt` is the last user turn, `reference` the answer that followed it in the data (None if none).
    """
    prompts = []
    for i, conversation in enumerate(conversations):
        reference = None if conversation.ends_on_user else conversation.turns[-1]
        prompts.append(
            {
                "id": i,
                "prompt": prompt_turns(conversation).turns[-1],
                "reference": reference,
                "input_ids": encode_prompt(conversation, tokenizer, template),
            }
        )
    return prompts


# ----------------------------------------------------------------------------- chat_template of an exported tokenizer
# Conversations a chat_template is checked on before it is written: system prompt, several turns, spacing, bytes.
PROBE_CONVERSATIONS = (
    Conversation(("What is 2 + 3?", "5")),
    Conversation(("  Write a haiku.\n", "\nSoft rain on the roof,\n  a kettle sings  ", "Another, about snow ☃?"), system="Be brief."),
    Conversation(("Hi", "Hello! How can I help?", "Translate `x = 1` to C.", "```c\nint x = 1;\n```", "Thanks")),
    Conversation(("Ünïcödé: naïve café — 東京", "Okay.")),
)


def set_chat_template(tokenizer, template: str) -> None:
    """Give `tokenizer` the chat_template of `template`, checked: `apply_chat_template` renders the ids training used.

    For any conversation, `apply_chat_template(messages, add_generation_prompt=True)` then gives exactly the ids
    `encode_prompt` (predict, chat) feeds the model, and without the generation prompt the ids `encode_conversation`
    trains on. `tokenizer` keeps its own chat_template (after the same check). A tokenizer that tokenizes the
    rendered text differently (e.g. a Llama tokenizer with `legacy: true`) is a one-line error, not a silent mismatch.
    """
    before = getattr(tokenizer, "chat_template", None)
    if template == "tokenizer":
        _check_chat_template(tokenizer)
    else:
        _text_template(template)
        tokenizer.chat_template = CHAT_TEMPLATES[template]
    for conversation in PROBE_CONVERSATIONS:
        answered = conversation if not conversation.ends_on_user else Conversation(conversation.turns[:-1], conversation.system)
        prompt = tokenizer.apply_chat_template(
            chat_messages(prompt_turns(conversation)), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        whole = tokenizer.apply_chat_template(chat_messages(answered), tokenize=True, return_dict=True)["input_ids"]
        if (
            list(prompt) != encode_prompt(conversation, tokenizer, template)
            or list(whole) != (encode_conversation(conversation, tokenizer, template)["input_ids"])
        ):
            tokenizer.chat_template = before
            raise UserError(
                f"data.template={template}: the tokenizer of {tokenizer.name_or_path} does not tokenize the rendered chat_template "
                f"into the ids training used (checked on {conversation.turns[0].strip()!r}); no chat_template was set"
            )
