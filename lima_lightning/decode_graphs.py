"""Decoding steps replayed as one CUDA graph each, under our decoding loop (`decoding`) or transformers' `generate`.

Uncompiled decoding of a 7B model issues ~2,000 small kernels per new token (NF4 dequantization, LoRA, norms,
attention), and the CPU issuing them is the bound at small batches: 70 ms a step for the 4 samples of an NF4 +
LoRA model, 24-26 ms for a 24 GiB predict chunk whose GPU work is ~10 ms (benchmarks/RESULTS.md, S8-4).
A static KV cache makes every decoding step of a call the same shapes at the same addresses, so the
step can be captured once and replayed: one launch a token, and no compile (torch.compile's CUDA graphs cost
about a minute for 7B before the first token).

`graphed_decoding(model)` stands in for the model's `forward` while a chunk of prompts is decoded. The prefill and the
first decoding step run as they always do (the first step also warms up the kernels the capture records);
the second step is captured, and it and every later step copy their inputs into the captured ones and replay.
The same kernels run on the same values, so the tokens are the same as without graphs (tests/test_gpu.py
compares them). Anything that is not a decoding step of the captured shapes runs eagerly.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from lightning.pytorch.utilities import rank_zero_info


class CudaGraphStep:
    """One captured call of `fn` on CUDA: `capture` records it (running nothing), `replay` runs it again."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn):
        # thread_local: another thread's CUDA call (a data loader, a logger) does not invalidate this capture.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class GraphedForward:
    """A model's `forward` whose single-token steps past the first are replayed from one captured graph.

    `make_step` builds the capture (CudaGraphStep on CUDA; tests pass one that re-runs the call, to check on the
    CPU that every replay reads its own step's inputs).
    """

    def __init__(self, forward, make_step=CudaGraphStep) -> None:
        self.forward, self.make_step = forward, make_step
        self.step = self.inputs = self.output = self.signature = None
        self.warmed_up = None  # the signature that last ran eagerly: the warm-up a capture needs
        self.replays = 0
        self.failed = False

    def __call__(self, **kwargs):
        if self.failed or not is_decoding_step(kwargs):
            return self.forward(**kwargs)
        signature = call_signature(kwargs)
        if signature != self.signature:
            if signature != self.warmed_up:  # a new cache or batch shape: run it once as it is, then capture
                self.warmed_up = signature
                return self.forward(**kwargs)
            self._capture(signature, kwargs)
            if self.failed:
                return self.forward(**kwargs)
        for name, value in self.inputs.items():
            value.copy_(kwargs[name])
        self.step.replay()
        self.replays += 1
        return self.output

    def _capture(self, signature, kwargs) -> None:
        self.close()
        self.inputs = {name: value.clone() for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
        step = self.make_step()
        inputs = {**kwargs, **self.inputs}
        # Inside the capture, autocast (as it is now, on or off) must not cache casted weights: the cache would
        # outlive the graph's memory.
        enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        autocast = torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)
        try:
            with autocast:
                self.output = step.capture(lambda: self.forward(**inputs))
        except RuntimeError as error:  # an operation that cannot be captured (a host sync in some model's code)
            rank_zero_info(f"generation: decoding without CUDA graphs ({str(error).splitlines()[0][:120]})")
            self.failed = True
            self.close()
            return
        self.step, self.signature = step, signature

    def close(self) -> None:
        """Release the graph and its memory pool (the next chunk's cache has other addresses anyway)."""
        self.step = self.inputs = self.output = self.signature = None


def is_decoding_step(kwargs: dict) -> bool:
    """One new token per row against a static cache: the only call whose shapes and addresses repeat."""
    input_ids = kwargs.get("input_ids")
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    mask = kwargs.get("attention_mask")
    return (
        isinstance(input_ids, torch.Tensor)
        and input_ids.shape[-1] == 1
        and getattr(cache, "is_compileable", False)  # static: its tensors stay where they are
        # transformers builds the full-length 4D mask for a static cache; flex attention's BlockMask is rebuilt
        # on the host each step, so those steps stay eager.
        and (mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4))
    )


def call_signature(kwargs: dict) -> tuple:
    """What must match for a replay: each tensor's shape, dtype and device, the identity of everything else."""
    parts = []
    for name, value in sorted(kwargs.items()):
        if isinstance(value, torch.Tensor):
            parts.append((name, tuple(value.shape), value.dtype, value.device))
        elif isinstance(value, (bool, int, float, str, type(None))):
            parts.append((name, value))
        else:
            parts.append((name, id(value)))
    return tuple(parts)


@contextlib.contextmanager
def graphed_decoding(model, make_step=CudaGraphStep):
    """For the decoding inside: decoding steps of `model` (a transformers model, or PEFT around one)
    replayed as CUDA graphs. Yields the GraphedForward, whose `replays` says how many steps were replayed."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT calls the model inside
    original = target.forward
    graphed = GraphedForward(original, make_step)

    @functools.wraps(original)  # keeps forward's signature visible: transformers reads it (e.g. logits_to_keep)
    def forward(*args, **kwargs):
        return graphed(**kwargs) if not args else original(*args, **kwargs)

    target.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's forward
    try:
        yield graphed
    finally:
        del target.forward
        graphed.close()
