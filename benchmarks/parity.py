"""Loss parity: on one identical batch, the plain path's per-token loss and LoRA gradients vs ours.

Dropout is off (eval mode), so both paths compute the same function; differences are bf16 rounding.
Ours is the module's own loss (`LIMALoRAModule.masked_nll`) on the product's collated batches.
"""

from __future__ import annotations

import torch
from reference import IGNORE_INDEX, plain_padded_batch, shuffled


def our_batches(chunk: list[dict], pad_id: int, max_seq_length: int) -> list[tuple[str, dict]]:
    """The same 4 conversations as the product collates them: one per row, and two per packed row."""
    from lima_lightning.data.collate import collate_rows

    rows_of_two = [chunk[:2], chunk[2:]]
    fits = all(sum(len(e["input_ids"]) for e in row) <= max_seq_length for row in rows_of_two)
    return [
        ("padded, no mask, LM head at trained positions", collate_rows([[e] for e in chunk], pad_id)),
        ("packed rows (position restarts)", collate_rows(rows_of_two if fits else [[e] for e in chunk], pad_id)),
    ]


def parity_check(model, module, examples, seed: int, max_seq_length: int, device, attentions: tuple[str, ...] = ("sdpa",)) -> list[dict]:
    """Rows of {path, loss[, loss_diff, grad_rel_diff | error]}: the plain path first, then ours per attention kernel.

    `module` is a LIMALoRAModule around `model` (its masked_nll is the loss under test).
    """
    from lima_lightning.models.speed import set_attention

    chunk = [examples[i] for i in shuffled(len(examples), seed)[:4]]
    pad_id = module.tokenizer.pad_token_id
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.eval()

    def on_device(batch: dict) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def run(loss_fn) -> tuple[float, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with autocast:
            nll, count = loss_fn()
        nll.backward()
        return float(nll) / float(count), torch.cat([params[n].grad.float().flatten() for n in sorted(params)])

    def plain() -> tuple[torch.Tensor, torch.Tensor]:
        batch = on_device(plain_padded_batch(chunk, pad_id))
        count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return model(**batch).loss * count, count  # transformers' loss is the mean over trained tokens

    reference_loss, reference_grads = run(plain)
    rows = [{"path": "plain: padded + attention mask, full logits, labels= loss", "loss": reference_loss}]
    base = model.get_base_model()
    for attention in attentions:
        for label, batch in our_batches(chunk, pad_id, max_seq_length):
            label = f"ours ({attention}): {label}"
            try:
                used = set_attention(base, attention, device)
                loss, grads = run(lambda batch=batch: module.masked_nll(on_device(batch)))
                rel = float((grads - reference_grads).norm() / reference_grads.norm().clamp(min=1e-30))
                label += "" if used == attention else f" [{used}: fallback]"
                rows.append({"path": label, "loss": loss, "loss_diff": loss - reference_loss, "grad_rel_diff": rel})
            except Exception as e:  # noqa: BLE001 - report it and keep measuring
                rows.append({"path": label, "error": f"{type(e).__name__}: {e}"[:300]})
            finally:
                set_attention(base, "sdpa", device)
    model.zero_grad(set_to_none=True)
    model.train()
    return rows
