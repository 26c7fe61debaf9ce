"""Tokenize conversations into `input_ids` and `labels` (`-100` where no loss is taken).

Each turn is tokenized as separate segments and the ids concatenated:

    [BOS] prompt(user_1)  assistant_1 [EOS]  [BOS] prompt(user_2)  assistant_2 [EOS] ...
    \\_____ untrained ___/ \\___ trained ___/  \\_____ untrained ___/ \\___ trained ___/

so the boundary between what is trained and what is not falls exactly between token ids,
and a prompt at predict time is the very same id sequence as the prefix in training
(`encode_prompt` and `encode_conversation` share `_segments`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lima_lightning.data.conversations import Conversation
from lima_lightning.data.templates import TEMPLATES

IGNORE_INDEX = -100  # label value PyTorch's cross_entropy skips


def segment_texts(conversation: Conversation, template: str):
    """Yield (text, trained) per segment, before tokenization: a rendered prompt, then an answer, per turn.

    Public so that `lima-lightning inspect` can compare decoded ids with the text they came from; BOS
    (before each prompt) and EOS (after each answer) are ids, added by `_segments`, not part of this text.
    """
    render = TEMPLATES[template]
    turns = conversation.turns
    for i in range(0, len(turns), 2):
        yield render(turns[i], conversation.system if i == 0 else None), False
        if i + 1 < len(turns):
            yield turns[i + 1].strip(), True


def _segments(conversation: Conversation, tokenizer, template: str):
    """Yield (ids, trained) segments: each user turn's prompt (BOS first), then its answer and EOS if it has one."""
    for text, trained in segment_texts(conversation, template):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        yield ([*ids, tokenizer.eos_token_id] if trained else [tokenizer.bos_token_id, *ids]), trained


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
