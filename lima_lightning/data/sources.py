"""Resolve `data.dataset` / `data.predict_dataset` to conversations: the hub, a file, or `synthetic`."""

from __future__ import annotations

from pathlib import Path

from lima_lightning.data.conversations import FILE_SUFFIXES, Conversation, read_conversations
from lima_lightning.data.synthetic import synthetic_conversations
from lima_lightning.hub import download_dataset_file

LIMA_HUB_ID = "GAIR/lima"


def load_conversations(spec: str, split: str, option: str, synthetic_size: int = 512) -> list[Conversation]:
    """`spec` is `synthetic`, a local file, or a hub dataset id holding `<split>.jsonl` (LIMA's layout)."""
    if spec == "synthetic":
        if split == "train":
            return synthetic_conversations("train", synthetic_size)
        # A tenth as many fresh prompts: enough to judge the fit, quick to generate.
        return synthetic_conversations("predict", max(1, synthetic_size // 10))
    if Path(spec).exists() or spec.lower().endswith(FILE_SUFFIXES) or spec.startswith((".", "/", "~")):
        return read_conversations(Path(spec).expanduser())
    return read_conversations(download_dataset_file(spec, f"{split}.jsonl", option))
