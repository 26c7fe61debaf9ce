"""Token-budget batching: the sampler's guarantees, the collator's tensors, and the same loss and gradients
from a packed or length-grouped batch as from the plain padded batch (tiny model, CPU, fp32)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from lima_lightning.data.collate import collate_rows
from lima_lightning.data.sampling import MicroBatchSampler, length_grouped_batches, pack_rows
from lima_lightning.data.tokenization import IGNORE_INDEX
from tests.conftest import LIMA_TRAIN, needs_lima, padded_batch, randomize_lora_b

MODES = ["padded", "length_grouped", "packed"]


def sampler_for(lengths, mode, max_tokens=2048, row_tokens=512, seed=0, step_group=1) -> MicroBatchSampler:
    return MicroBatchSampler(lengths, mode, batch_size=4, max_tokens=max_tokens, row_tokens=row_tokens, seed=seed, step_group=step_group)


def padding_fraction(batches, lengths) -> float:
    """Share of the tensor cells (rows x width, summed over batches) that hold padding."""
    real = sum(lengths[i] for batch in batches for row in batch for i in row)
    cells = sum(len(batch) * max(sum(lengths[i] for i in row) for row in batch) for batch in batches)
    return 1.0 - real / cells


def random_lengths(n: int = 300, seed: int = 0, longest: int = 512) -> list[int]:
    rng = random.Random(seed)
    # Skewed like LIMA: many short conversations, a tail of long ones, some at the cap.
    return [min(longest, int(rng.lognormvariate(5.0, 0.9)) + 8) for _ in range(n)]


def flat(batches) -> list[int]:
    return [i for batch in batches for row in batch for i in row]


# ----------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize("mode", MODES)
def test_every_example_exactly_once_per_epoch_and_len_is_constant(mode):
    lengths = random_lengths()
    sampler = sampler_for(lengths, mode, seed=3)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert Counter(flat(batches)) == Counter(range(len(lengths)))
        # Lightning reads len() once per fit; every epoch must have exactly that many batches.
        assert len(batches) == len(sampler)


@pytest.mark.parametrize("mode", MODES)
def test_order_is_a_pure_function_of_seed_and_epoch(mode):
    lengths = random_lengths()
    a = sampler_for(lengths, mode, seed=3)
    b = sampler_for(lengths, mode, seed=3)
    for epoch in (0, 1, 2):  # `a` walks through epochs 0..2; `b` jumps straight to 2, as a resumed run does
        a.set_epoch(epoch)
        list(a)
    b.set_epoch(2)
    assert list(a) == list(b) == a.epoch_batches(2)
    assert a.epoch_batches(2) != a.epoch_batches(3)  # a new order each epoch
    assert sampler_for(lengths, mode, seed=4).epoch_batches(2) != a.epoch_batches(2)


@pytest.mark.parametrize("mode", MODES)
def test_token_budget_and_row_capacity_are_respected(mode):
    lengths = random_lengths()
    sampler = sampler_for(lengths, mode)
    examples = [{"input_ids": [5] * n, "labels": [7] * n} for n in lengths]
    biggest = 0
    for epoch in range(3):
        for batch in sampler.epoch_batches(epoch):
            tensors = collate_rows([[examples[i] for i in row] for row in batch], pad_id=0)
            rows, width = tensors["input_ids"].shape
            assert rows * width <= 2048 and width <= 512  # widths as collated, rounded up to a multiple of 8
            biggest = max(biggest, rows * width)
    # `max_batch_tokens` (what gradient_checkpointing=auto plans memory for) bounds every batch.
    assert biggest <= sampler.max_batch_tokens <= 2048


def test_length_grouped_batches_hold_similar_lengths():
    lengths = random_lengths()
    batches = length_grouped_batches(lengths, 2048, seed=0)
    for batch in batches:
        widths = [lengths[row[0]] for row in batch]
        assert widths == sorted(widths, reverse=True)  # the first row sets the width
        assert len(batch) * widths[0] <= 2048


def test_one_optimizer_steps_micro_batches_are_neighbours_of_the_plan():
    """step_group=2 (2 GPUs, or 1 GPU accumulating 2): each step's two batches are plan neighbours, so under DDP
    neither rank waits long for the other; the epoch is still every batch once, in a new order per epoch."""
    lengths = random_lengths(600)
    plan = length_grouped_batches(lengths, 2048, seed=0)
    grouped = sampler_for(lengths, "length_grouped", step_group=2)
    ungrouped = sampler_for(lengths, "length_grouped")

    def cost(batch) -> int:  # what a step waits for: rows x width, plus attention's square term
        width = lengths[batch[0][0]]
        return len(batch) * width * (1 + width // 256)

    def waiting(batches) -> float:  # share of device time spent waiting for the slower rank of each step
        steps = [batches[k : k + 2] for k in range(0, len(batches) - 1, 2)]
        return sum(abs(cost(a) - cost(b)) for a, b in steps) / sum(2 * max(cost(a), cost(b)) for a, b in steps)

    for epoch in (0, 1):
        batches = grouped.epoch_batches(epoch)
        assert sorted(map(str, batches)) == sorted(map(str, plan))
        position = {str(batch): i for i, batch in enumerate(plan)}
        for k in range(0, len(batches) - 1, 2):
            first, second = position[str(batches[k])], position[str(batches[k + 1])]
            assert first % 2 == 0 and second == first + 1, (epoch, k)
        assert waiting(batches) < waiting(ungrouped.epoch_batches(epoch)) / 3
    assert grouped.epoch_batches(0) != grouped.epoch_batches(1)


def test_first_fit_decreasing_fills_rows():
    lengths = random_lengths()
    rows = pack_rows(lengths, 512, seed=0)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    # Within one row of the optimum: the token total needs at least this many rows.
    assert len(rows) <= -(-sum(lengths) // 512) + 1


def test_an_example_longer_than_the_budget_is_refused():
    with pytest.raises(ValueError, match="exceeds"):
        sampler_for([10, 600], "packed", max_tokens=1024, row_tokens=512)
    with pytest.raises(ValueError, match="exceeds"):
        sampler_for([10, 600], "length_grouped", max_tokens=512, row_tokens=512)


def plain_batches(n: int, batch_size: int, seed: int):
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [[[i] for i in order[k : k + batch_size]] for k in range(0, n, batch_size)]


@needs_lima
def test_padding_fraction_on_lima_lengths_is_far_below_plain(llama2_tokenizer):
    from lima_lightning.data.conversations import read_conversations
    from lima_lightning.data.tokenization import tokenize_for_training

    examples, _ = tokenize_for_training(read_conversations(LIMA_TRAIN), llama2_tokenizer, "llama2-chat", 2048)
    lengths = [len(e["input_ids"]) for e in examples]
    plain = padding_fraction(plain_batches(len(lengths), 4, seed=0), lengths)
    grouped = padding_fraction(sampler_for(lengths, "length_grouped", 8192, 2048).epoch_batches(0), lengths)
    packed = padding_fraction(sampler_for(lengths, "packed", 8192, 2048).epoch_batches(0), lengths)
    assert plain > 0.35  # the reference: ~45% padding at batch 4
    assert grouped < 0.05 and packed < 0.01, (plain, grouped, packed)


# ----------------------------------------------------------------------------- the collator
def test_collate_rows_restarts_positions_and_copies_the_labels():
    a = {"input_ids": [1, 10, 11], "labels": [IGNORE_INDEX, 10, 11]}
    b = {"input_ids": [1, 20], "labels": [IGNORE_INDEX, 20]}
    c = {"input_ids": [1, 30, 31, 32], "labels": [IGNORE_INDEX, IGNORE_INDEX, 31, 32]}
    batch = collate_rows([[a, b], [c]], pad_id=0)
    X = IGNORE_INDEX
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_tokens", "packed"} and batch["packed"] is False
    # Width 5 rounded up to 8 (`collate.WIDTH_MULTIPLE`): padding trained on nowhere.
    assert batch["input_ids"].tolist() == [[1, 10, 11, 1, 20, 0, 0, 0], [1, 30, 31, 32, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[X, 10, 11, X, 20, X, X, X], [X, X, 31, 32, X, X, X, X]]
    # Restarts mark each conversation; the padding tail continues the last one, so row 2 is plain 0..7.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]]
    assert batch["num_tokens"] == 9
    assert collate_rows([[a], [c]], pad_id=0)["num_tokens"] == 7


def test_every_example_starts_with_an_untrained_bos(tiny_tokenizer):
    """What lets packed rows keep each example's labels as they are: no first token is ever a target (it would be
    predicted from the previous conversation's last token), whatever the turns and the truncation."""
    from lima_lightning.data.conversations import Conversation
    from lima_lightning.data.tokenization import tokenize_for_training

    conversations = [Conversation(("q", "a", "q2", "a2")), Conversation(("q" * 50, "a")), Conversation(("q", "a" * 80))]
    examples, _ = tokenize_for_training(conversations, tiny_tokenizer, "llama2-chat", 40)
    assert examples and all(e["labels"][0] == IGNORE_INDEX and e["input_ids"][0] == tiny_tokenizer.bos_token_id for e in examples)


# ----------------------------------------------------------------------------- same loss, same gradients
@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    from lima_lightning.data.synthetic import synthetic_conversations
    from lima_lightning.data.tokenization import tokenize_for_training

    conversations = synthetic_conversations("train", 7)
    examples, _ = tokenize_for_training(conversations, tiny_tokenizer, "llama2-chat", 256)
    assert len({len(e["input_ids"]) for e in examples}) > 1  # mixed lengths, so the padded batch pads
    return examples


def make_module(quantization: str = "none", **overrides):
    from lima_lightning.module import LIMALoRAModule

    settings = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "gradient_checkpointing": False, **overrides}
    module = LIMALoRAModule(base_model="tiny", quantization=quantization, **settings)
    module.configure_model()
    torch.manual_seed(0)
    randomize_lora_b(module, std=0.05)  # non-zero B: every adapter weight then gets a gradient
    return module


def plain_path(module, batch) -> tuple[torch.Tensor, dict]:
    """What a user's loop computes: full logits with the padding mask, textbook shifted cross-entropy (sum)."""
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, gradients(module, nll)


def gradients(module, loss) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


def our_path(module, batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    nll, count = module.masked_nll(batch)
    return nll, count, gradients(module, nll)


def assert_grads_close(actual: dict, expected: dict) -> None:
    # fp32 sums in another order differ by ~1e-7 of the largest entry; 1e-5 of it is still tight.
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)


def trained_count(examples) -> int:
    return sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples)


BATCHINGS = {
    # The plain batch itself, through our path: no attention mask, LM head at trained positions only.
    "padded": lambda ex, pad: padded_batch(ex, pad),
    # One conversation per row in another order (what length_grouped yields).
    "length_grouped": lambda ex, pad: collate_rows([[e] for e in sorted(ex, key=lambda e: -len(e["input_ids"]))], pad),
    # Three rows of several conversations each, blocked from attending to one another.
    "packed": lambda ex, pad: collate_rows([ex[0:3], ex[3:5], ex[5:]], pad),
}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("batching", list(BATCHINGS))
def test_same_loss_and_gradients_as_the_plain_padded_batch(examples, batching, attention):
    module = make_module()
    module.model.get_base_model().set_attn_implementation(attention)
    plain = padded_batch(examples, 0)
    assert (plain["attention_mask"] == 0).any()  # the plain batch pads
    reference_nll, reference_grads = plain_path(module, plain)
    nll, count, grads = our_path(module, BATCHINGS[batching](examples, 0))
    assert count == trained_count(examples)
    torch.testing.assert_close(nll, reference_nll, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, reference_grads)


def test_packing_without_the_restarts_would_be_caught(examples):
    """The parity test can fail: the same packed rows with plain positions let conversations attend to each other."""
    module = make_module()
    reference_nll, _ = plain_path(module, padded_batch(examples, 0))
    leaky = collate_rows([examples[0:3], examples[3:5], examples[5:]], 0)
    leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1]).expand_as(leaky["input_ids"])
    nll, _ = module.masked_nll(leaky)
    assert not torch.allclose(nll, reference_nll, rtol=1e-3)


def test_chunked_head_loss_gives_the_same_loss_and_gradients(examples):
    module = make_module()
    batch = collate_rows([examples[0:3], examples[3:]], 0)
    nll, count, grads = our_path(module, batch)
    module.hparams.loss_chunk_size = 5  # several chunks, the last one short
    assert count > 10
    chunked_nll, chunked_count, chunked_grads = our_path(module, batch)
    assert chunked_count == count
    torch.testing.assert_close(chunked_nll, nll, rtol=1e-5, atol=1e-5)
    assert_grads_close(chunked_grads, grads)


def test_packed_nf4_base_matches_padded_to_bf16_rounding(examples):
    """Each conversation packed behind another has its padded NLL to 1e-4 (measured: 1.1e-5 at most, bf16 matmuls of
    other shapes). Conversations attending to the ones before them in the row are 1.2e-2 or more off: they fail it."""
    torch.manual_seed(0)  # the LoRA init draws from the global RNG: the same weights on every run
    module = make_module("nf4")
    rows = [list(range(0, 4)), list(range(4, len(examples)))]

    def only(r: int, j: int, plain_positions: bool = False) -> dict:
        """The packed batch with the labels of conversation j of row r alone: its NLL, in the packed context."""
        batch = collate_rows(
            [[e if (q, k) == (r, j) else {**e, "labels": [IGNORE_INDEX] * len(e["labels"])} for k, e in enumerate(examples[i] for i in row)]
             for q, row in enumerate(rows)],
            0,
        )  # fmt: skip
        if plain_positions:  # no restarts: every conversation attends to the ones before it in its row
            batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        return batch

    with torch.no_grad():
        reference, _ = module.masked_nll(padded_batch(examples, 0), per_row=True)
        later = [(r, j) for r, row in enumerate(rows) for j in range(1, len(row))]
        expected = torch.stack([reference[rows[r][j]] for r, j in later])
        packed = torch.stack([module.masked_nll(only(r, j))[0] for r, j in later])
        leaked = torch.stack([module.masked_nll(only(r, j, plain_positions=True))[0] for r, j in later])
    torch.testing.assert_close(packed, expected, rtol=1e-4, atol=0.0)
    assert ((leaked - expected).abs() > 1e-3 * expected).all(), "the tolerance would not catch attention across conversations"


# ----------------------------------------------------------------------------- through the data module
@pytest.mark.parametrize("mode", MODES)
def test_data_module_loader_trains_every_token_once_per_epoch(tiny_dir, mode):
    from lima_lightning.data.datamodule import LIMADataModule

    dm = LIMADataModule(
        dataset="synthetic", tokenizer=str(tiny_dir), synthetic_size=120, max_seq_length=128, batching=mode, max_tokens_per_batch=512
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches) == dm.stats["train"].trained_tokens
        assert sum(b["num_tokens"] for b in batches) == dm.stats["train"].tokens
        assert max(b["input_ids"].numel() for b in batches) <= dm.max_batch_tokens <= 512
        assert {b["packed"] for b in batches} == {mode == "packed"}  # compiled layers then get a mask every batch
    assert not any(b["packed"] for b in dm.val_dataloader())  # validation rows hold one conversation each


def test_token_budget_below_the_sequence_cap_is_refused():
    from lima_lightning.data.datamodule import LIMADataModule
    from lima_lightning.errors import UserError

    with pytest.raises(UserError, match="data.max_tokens_per_batch=1024: must be at least data.max_seq_length=2048"):
        LIMADataModule(batching="packed", max_tokens_per_batch=1024)
