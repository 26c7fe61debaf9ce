"""Hugging Face hub access: the one place `HF_TOKEN` is read and hub failures become one-line errors.

The token is read from the environment at the moment of a download and handed straight to the hub
client, so it never reaches a config, a log, hparams or a checkpoint.

Offline: the hub client retries a dead connection for about a minute before it gives up. So before the first
hub call of a process, one request with a short timeout (`LIMA_HUB_PROBE_TIMEOUT`, 3 s) asks whether the hub
answers at all; when it does not (or `HF_HUB_OFFLINE=1` is set) every load is made from the local HF cache
only (`local_files_only`), and a model or dataset that is not there is one line saying so, in seconds.
"""

from __future__ import annotations

import functools
import os
import threading
from contextlib import contextmanager

from lima_lightning.errors import Unavailable, UserError

PROBE_TIMEOUT_S = 3.0


def hub_token() -> str | None:
    """`HF_TOKEN` from the environment (gated Llama-2 and LIMA need it), or None."""
    return os.environ.get("HF_TOKEN") or None


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _offline_mode() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _probe(url: str, timeout: float) -> str | None:
    """None if `url` answers at all (any HTTP status) within `timeout` seconds, name lookup included; else why not."""
    from huggingface_hub.utils import get_session

    failure = [f"did not answer within {timeout:g} s"]

    def ask() -> None:
        try:
            get_session().head(url, timeout=timeout)  # the hub client's session: its proxies and certificates
            failure.clear()
        except Exception as e:
            reason = str(e).splitlines()[0][:100] if str(e) else ""
            failure[:] = [f"is unreachable ({type(e).__name__}: {reason})" if reason else f"is unreachable ({type(e).__name__})"]

    # A thread, because a name lookup that hangs ignores the request's timeout.
    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(timeout + 0.5)
    if asker.is_alive():
        return f"did not answer within {timeout:g} s"
    return failure[0] if failure else None


@functools.cache
def offline_reason() -> str | None:
    """None if the hub answers; else why every load must come from the local cache (asked once per process)."""
    if _offline_mode():
        return "HF_HUB_OFFLINE=1 is set"
    failure = _probe(_endpoint(), float(os.environ.get("LIMA_HUB_PROBE_TIMEOUT") or PROBE_TIMEOUT_S))
    return f"the hub ({_endpoint()}) {failure}" if failure else None


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _causes(e: BaseException):
    """`e` and what it was raised from (transformers wraps the hub's errors in an OSError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


@contextmanager
def hub_errors(option: str, name: str, kind: str = "model", local_hint: str = "pass a local directory"):
    """Load `option=name` from the hub, or from the cache alone when the hub is out of reach; failures are one line.

    Yields the keyword arguments to pass to the loader (`{"local_files_only": True}` when offline, else none).
    kind: `model` or `dataset` (where the terms are accepted: huggingface.co/<name> or /datasets/<name>).
    local_hint: the local alternative to offer, e.g. "pass a local .jsonl file".
    """
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    page = f"huggingface.co/{'datasets/' if kind == 'dataset' else ''}{name}"
    offline = offline_reason()
    try:
        yield {"local_files_only": True} if offline else {}
    except UserError:
        raise
    except Exception as e:
        causes = list(_causes(e))
        if any(isinstance(c, GatedRepoError) for c in causes):
            raise UserError(
                f"{option}={name}: the {kind} is gated; accept its terms on {page} and set HF_TOKEN in the environment, or {local_hint}"
            ) from None
        if any(isinstance(c, RepositoryNotFoundError) for c in causes):
            hint = "set HF_TOKEN in the environment" if hub_token() is None else "check the name and that HF_TOKEN has access"
            raise UserError(f"{option}={name}: no such {kind} on the hub (or it is gated): {hint}, or {local_hint}") from None
        not_cached = offline or any(isinstance(c, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for c in causes)
        if not_cached and isinstance(e, (OSError, HfHubHTTPError, ValueError)):
            why = offline or "the hub is unreachable"
            if _offline_mode():
                then = "or unset HF_HUB_OFFLINE to download it"
            else:
                then = "or download it once where the hub answers (with the files cached, HF_HUB_OFFLINE=1 skips this check)"
            raise Unavailable(
                f"{option}={name}: {why}, and the {kind} is not in the HF cache ({_cache_dir()}); {local_hint}, {then}"
            ) from None
        if isinstance(e, (HfHubHTTPError, OSError)):
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise Unavailable(
                f"{option}={name}: could not reach the hub ({type(e).__name__}: {reason}); check the network and HF_TOKEN, or {local_hint}"
            ) from None
        raise


def download_dataset_file(repo_id: str, filename: str, option: str) -> str:
    """Fetch one file of a hub dataset (LIMA's `train.jsonl`, `test.jsonl`) into the hub cache; return its path."""
    from huggingface_hub import hf_hub_download

    with hub_errors(option, repo_id, kind="dataset", local_hint="pass a local file such as path/to/train.jsonl") as offline:
        return hf_hub_download(repo_id, filename, repo_type="dataset", token=hub_token(), **offline)
