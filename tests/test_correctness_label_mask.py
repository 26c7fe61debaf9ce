"""Items 1 and 2: the label mask and truncation on every LIMA training conversation, with the real Llama-2 tokenizer.

A wrong mask trains the model to write user turns, or never to stop, and the loss curve looks fine either way.
These tests read our examples back against the text and against an independent rendering of Meta's format.
"""

from __future__ import annotations

import pytest

from lima_lightning.data.conversations import Conversation
from lima_lightning.data.tokenization import IGNORE_INDEX, encode_conversation, tokenize_for_training
from tests.conftest import LIMA_TRAIN, needs_lima

pytestmark = needs_lima  # the llama2_tokenizer fixture skips on its own when the tokenizer is absent

MAX_SEQ_LENGTH = 2048


@pytest.fixture(scope="module")
def lima(llama2_tokenizer):
    """(conversation, example before truncation) for all 1030 LIMA training conversations (~1 s)."""
    from lima_lightning.data.conversations import read_conversations

    conversations = read_conversations(LIMA_TRAIN)
    return [(c, encode_conversation(c, llama2_tokenizer)) for c in conversations]


def runs(example: dict) -> list[tuple[bool, list[int]]]:
    """Split an example into maximal runs of (trained, ids), in order."""
    out: list[tuple[bool, list[int]]] = []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        trained = label != IGNORE_INDEX
        if out and out[-1][0] == trained:
            out[-1][1].append(token)
        else:
            out.append((trained, [token]))
    return out


def answered_turns(conversation) -> tuple[str, ...]:
    return conversation.turns[:-1] if conversation.ends_on_user else conversation.turns


def meta_reference(conversation, tok) -> list[int]:
    """Meta's llama2-chat format tokenized the independent way: each exchange as ONE string, BOS/EOS as ids.

    `[BOS] [INST] {user} [/INST] {answer} [EOS]` per exchange (Meta's `chat_completion`, less the space it puts
    before EOS). Tokenizing prompt and answer as one string shows our per-segment tokenization creates no
    boundary artefact (a merged or split token where the trained part begins).
    """
    turns = answered_turns(conversation)
    ids: list[int] = []
    for user, answer in zip(turns[::2], turns[1::2], strict=True):
        ids += [tok.bos_token_id, *tok(f"[INST] {user.strip()} [/INST] {answer.strip()}", add_special_tokens=False)["input_ids"]]
        ids.append(tok.eos_token_id)
    return ids


def test_item1_lima_has_what_these_tests_claim_to_cover(lima):
    conversations = [c for c, _ in lima]
    assert len(conversations) == 1030
    assert sum(len(answered_turns(c)) > 2 for c in conversations) == 30  # multi-turn
    assert [c.where.rsplit(":", 1)[1] for c in conversations if c.ends_on_user] == ["1022"]
    assert sum(len(e["input_ids"]) <= MAX_SEQ_LENGTH for _, e in lima) == 960


def test_item1_input_ids_equal_metas_format_tokenized_whole(lima, llama2_tokenizer):
    mismatched = [c.where for c, e in lima if e["input_ids"] != meta_reference(c, llama2_tokenizer)]
    assert mismatched == []


def test_item1_trained_tokens_are_exactly_the_assistant_turns_each_with_eos(lima, llama2_tokenizer):
    """On every conversation that fits in 2048 tokens: trained runs decode to the answers, untrained to the prompts."""
    tok = llama2_tokenizer
    checked = 0
    for conversation, example in lima:
        if len(example["input_ids"]) > MAX_SEQ_LENGTH:
            continue  # truncation: see test_item2_truncation_keeps_labels_aligned_on_lima
        turns = answered_turns(conversation)
        spans = runs(example)
        # untrained, trained, untrained, trained, ...: one pair per exchange, every answer trained
        assert [trained for trained, _ in spans] == [False, True] * (len(turns) // 2), conversation.where
        for (_, prompt), (_, answer), user, reference in zip(spans[::2], spans[1::2], turns[::2], turns[1::2], strict=True):
            # BOS, then exactly the rendered user turn: no user text, template marker or BOS is ever trained
            assert prompt[0] == tok.bos_token_id and tok.eos_token_id not in prompt, conversation.where
            assert tok.decode(prompt[1:]) == f"[INST] {user.strip()} [/INST]", conversation.where
            # the answer's text, then one EOS so that the model learns to stop
            assert answer[-1] == tok.eos_token_id and tok.eos_token_id not in answer[:-1], conversation.where
            assert tok.decode(answer[:-1]) == reference.strip(), conversation.where
        # labels are the input ids themselves (the loss shifts them), never shifted here
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(example["input_ids"], example["labels"], strict=True))
        checked += 1
    assert checked == 960


def test_item1_multi_turn_trains_every_answer_with_its_full_earlier_context(lima, llama2_tokenizer):
    """Each answer of a multi-turn conversation is trained in the same sequence as every exchange before it."""
    multi = [(c, e) for c, e in lima if len(answered_turns(c)) > 2]
    for conversation, example in multi:
        turns = answered_turns(conversation)
        starts = [
            i for i in range(1, len(example["labels"])) if example["labels"][i] != IGNORE_INDEX and example["labels"][i - 1] == IGNORE_INDEX
        ]
        assert len(starts) == len(turns) // 2, conversation.where
        for k, start in enumerate(starts):
            # everything before the k-th answer is the whole conversation so far, rendered independently
            context = meta_reference(Conversation(turns[: 2 * k]), llama2_tokenizer) if k else []
            prompt = [
                llama2_tokenizer.bos_token_id,
                *llama2_tokenizer(f"[INST] {turns[2 * k].strip()} [/INST]", add_special_tokens=False)["input_ids"],
            ]
            assert example["input_ids"][:start] == context + prompt, (conversation.where, k)


def test_item1_system_prompt_is_never_trained(lima, llama2_tokenizer):
    """LIMA has no system prompts but chat-format data may: one is added to each multi-turn LIMA conversation."""
    tok = llama2_tokenizer
    system = "You are a careful assistant.\nAnswer briefly."
    for conversation, _ in lima:
        turns = answered_turns(conversation)
        if len(turns) <= 2:
            continue
        example = encode_conversation(Conversation(turns, system=system), tok)
        spans = runs(example)
        assert [trained for trained, _ in spans] == [False, True] * (len(turns) // 2), conversation.where
        # Meta's format: the system block sits inside the first [INST] only
        assert tok.decode(spans[0][1][1:]) == f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{turns[0].strip()} [/INST]"
        assert all(tok.decode(ids[1:]) == f"[INST] {user.strip()} [/INST]" for (_, ids), user in zip(spans[2::2], turns[2::2], strict=True))
        assert [tok.decode(ids[:-1]) for _, ids in spans[1::2]] == [a.strip() for a in turns[1::2]]


def test_item1_trailing_user_turn_is_dropped(lima, llama2_tokenizer):
    (conversation, example), *_ = [(c, e) for c, e in lima if c.ends_on_user]
    tok = llama2_tokenizer
    assert example["input_ids"] == meta_reference(conversation, tok)  # the last user turn is not in the ids at all
    assert example["input_ids"][-1] == example["labels"][-1] == tok.eos_token_id  # it ends on the last answer's EOS
    _, stats = tokenize_for_training([conversation], tok, "llama2-chat", 4096)
    assert (stats.trailing_user_turns, stats.examples) == (1, 1)


@pytest.mark.parametrize("max_seq_length", [2048, 1024])
def test_item2_truncation_keeps_labels_aligned_on_lima(lima, llama2_tokenizer, max_seq_length):
    """A cut example is the full example's first n ids AND labels: no label shifted, no EOS made up at the cut."""
    tok = llama2_tokenizer
    full = {c.where: e for c, e in lima}
    examples, stats = tokenize_for_training([c for c, _ in lima], tok, "llama2-chat", max_seq_length)
    too_long = {where for where, e in full.items() if len(e["input_ids"]) > max_seq_length}
    assert set(stats.truncated_where) == too_long and stats.truncated == len(too_long) > 0

    kept = iter(examples)
    cut_inside_an_answer = 0
    for where, whole in full.items():
        n_trained_in_cut = sum(label != IGNORE_INDEX for label in whole["labels"][:max_seq_length])
        if n_trained_in_cut == 0:
            continue  # dropped: nothing to train within the cut (counted below)
        example = next(kept)
        assert example == {k: v[:max_seq_length] for k, v in whole.items()}, where
        if where in too_long:
            assert len(example["input_ids"]) == max_seq_length
            # the last kept token ends in EOS only where the untruncated example had one at that very index
            if example["input_ids"][-1] == tok.eos_token_id:
                assert whole["input_ids"][max_seq_length - 1] == tok.eos_token_id
            assert example["input_ids"].count(tok.eos_token_id) == whole["input_ids"][:max_seq_length].count(tok.eos_token_id)
            cut_inside_an_answer += example["labels"][-1] not in (IGNORE_INDEX, tok.eos_token_id)
    assert next(kept, None) is None
    assert cut_inside_an_answer > 0.9 * len(too_long)  # the case that matters is exercised: most cuts fall mid-answer
    assert stats.dropped_no_target == len(full) - len(examples) == {2048: 0, 1024: 4}[max_seq_length]
