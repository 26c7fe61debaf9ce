"""Resolve `data.dataset` / `data.predict_dataset` to conversations: the hub, a file, or `synthetic`."""

from __future__ import annotations

import os
from pathlib import Path

from lima_lightning.data.conversations import FILE_SUFFIXES, Conversation, read_conversations
from lima_lightning.data.synthetic import synthetic_conversations
from lima_lightning.errors import UserError

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
    return read_conversations(download_hub_file(spec, f"{split}.jsonl", option))


def download_hub_file(repo_id: str, filename: str, option: str) -> str:
    """Fetch one file of a hub dataset; gated or unreachable repos become a one-line `UserError`."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    # The token comes from the environment only, so it never reaches a config or a log.
    token = os.environ.get("HF_TOKEN")
    try:
        return hf_hub_download(repo_id, filename, repo_type="dataset", token=token)
    except GatedRepoError:
        raise UserError(
            f"{option}={repo_id}: the dataset is gated; accept its terms on huggingface.co/datasets/{repo_id} "
            "and set HF_TOKEN in the environment, or pass a local .jsonl file"
        ) from None
    except RepositoryNotFoundError:
        hint = "set HF_TOKEN in the environment" if token is None else "check the name and that HF_TOKEN has access"
        raise UserError(f"{option}={repo_id}: no such dataset on the hub (or it is gated): {hint}, or pass a local .jsonl file") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise UserError(
            f"{option}={repo_id}: could not download {filename} ({type(e).__name__}); "
            "check the network and HF_TOKEN, or pass a local file such as path/to/train.jsonl"
        ) from None
