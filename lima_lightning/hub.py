"""Hugging Face hub access: the one place `HF_TOKEN` is read and hub failures become one-line errors.

The token is read from the environment at the moment of a download and handed straight to the hub
client, so it never reaches a config, a log, hparams or a checkpoint.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from lima_lightning.errors import UserError


def hub_token() -> str | None:
    """`HF_TOKEN` from the environment (gated Llama-2 and LIMA need it), or None."""
    return os.environ.get("HF_TOKEN") or None


@contextmanager
def hub_errors(option: str, name: str, kind: str = "model", local_hint: str = "pass a local directory"):
    """Turn what the hub client raises for `option=name` into one `UserError` line.

    kind: `model` or `dataset` (where the terms are accepted: huggingface.co/<name> or /datasets/<name>).
    local_hint: the local alternative to offer, e.g. "pass a local .jsonl file".
    """
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    page = f"huggingface.co/{'datasets/' if kind == 'dataset' else ''}{name}"
    try:
        yield
    except GatedRepoError:
        raise UserError(
            f"{option}={name}: the {kind} is gated; accept its terms on {page} and set HF_TOKEN in the environment, or {local_hint}"
        ) from None
    except RepositoryNotFoundError:
        hint = "set HF_TOKEN in the environment" if hub_token() is None else "check the name and that HF_TOKEN has access"
        raise UserError(f"{option}={name}: no such {kind} on the hub (or it is gated): {hint}, or {local_hint}") from None
    except LocalEntryNotFoundError:
        raise UserError(f"{option}={name}: not in the local cache and the hub is unreachable; check the network, or {local_hint}") from None
    except (HfHubHTTPError, OSError) as e:
        if isinstance(e, UserError):
            raise
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(
            f"{option}={name}: could not reach the hub ({type(e).__name__}: {reason}); check the network and HF_TOKEN, or {local_hint}"
        ) from None


def download_dataset_file(repo_id: str, filename: str, option: str) -> str:
    """Fetch one file of a hub dataset (LIMA's `train.jsonl`, `test.jsonl`) into the hub cache; return its path."""
    from huggingface_hub import hf_hub_download

    with hub_errors(option, repo_id, kind="dataset", local_hint="pass a local file such as path/to/train.jsonl"):
        return hf_hub_download(repo_id, filename, repo_type="dataset", token=hub_token())
