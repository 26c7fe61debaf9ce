"""A full or read-only disk: the write that fails leaves the previous good file intact, and the run stops with one
line naming the path (exit status 1). Real failures where the machine allows (root: a 800 KiB tmpfs fills up, a
read-only bind mount refuses); everywhere, a write that raises ENOSPC or EACCES part-way through, for every writer:
checkpoints, adapters, predictions, reports, samples. Files and directories get the user's umask."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import subprocess
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported at collection: its log handler must not bind one test's captured stderr)
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import demo_args, run_cli

SHORT = ("--data.synthetic_size", "64", "--trainer.max_epochs", "1", "--samples.num_prompts", "0", "--trainer.log_every_n_steps", "1")
EVERY_STEP = ("--checkpoint.every_n_train_steps", "1")


def visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(".*"))


def last_err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err), err
    return err[-1]


def mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A real 800 KiB filesystem (tmpfs): room for one demo checkpoint (517 KB), not for its successor beside it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not mount("-t", "tmpfs", "-o", "size=800k", "tmpfs", str(disk)):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


class FullAfter:
    """`Path.open(..., "w*"/"a*")` of files whose name contains `name` returns a file that writes `after` bytes and then
    raises OSError(`code`): a disk filling up, or a permission refused, part-way through a write."""

    def __init__(self, monkeypatch, name: str, code: int = errno.ENOSPC, after: int = 100) -> None:
        real_open = pathlib.Path.open
        self.hits = 0

        def open_(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            if name not in path.name or not set(mode) & set("wax"):
                return f
            self.hits += 1
            return _Failing(f, code, after)

        monkeypatch.setattr(pathlib.Path, "open", open_)


class _Failing:
    def __init__(self, f, code: int, after: int) -> None:
        self._f, self._code, self._left = f, code, after

    def write(self, data) -> int:
        if len(data) > self._left:
            self._f.write(data[: self._left])
            self._f.flush()
            self._left = 0
            raise OSError(self._code, os.strerror(self._code))
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


# ----------------------------------------------------------------------------- real failures
@pytest.mark.slow
def test_a_disk_that_fills_up_while_checkpointing_stops_the_run_in_one_line(small_disk, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *demo_args(small_disk, *SHORT, *EVERY_STEP))
    assert exit_info.value.code == 1
    ckpt = small_disk / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert last_err_line(capsys) == (
        f"lima-lightning: error: cannot write {ckpt}: no space left on the device (ENOSPC); the previous last.ckpt is intact; "
        "free some space, or write elsewhere with --trainer.default_root_dir"
    )
    assert torch.load(ckpt, weights_only=True)["global_step"] == 1  # step 2's checkpoint did not fit beside it
    assert visible(ckpt.parent) == ["last.ckpt"] and not leftovers(ckpt.parent)


@pytest.mark.slow
def test_a_disk_full_under_the_last_checkpoint_write_stops_the_run_in_one_line_at_the_end_of_fit(tmp_path, capsys, monkeypatch):
    """The one checkpoint (the epoch end's) is written behind the final adapter save: its failure is the end's wait."""
    full = FullAfter(monkeypatch, "last.ckpt", after=100)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *demo_args(tmp_path, *SHORT, "--checkpoint.every_n_train_steps", "0"))
    assert exit_info.value.code == 1 and full.hits == 1
    run = tmp_path / "lightning_logs" / "version_0"
    assert last_err_line(capsys) == (
        f"lima-lightning: error: cannot write {run / 'checkpoints' / 'last.ckpt'}: no space left on the device (ENOSPC); "
        "nothing was left half-written; free some space, or write elsewhere with --trainer.default_root_dir"
    )
    assert (run / "adapters" / "final").is_dir() and not visible(run / "checkpoints") and not leftovers(run)


@pytest.mark.slow
def test_a_checkpoint_dir_gone_read_only_stops_the_run_in_one_line(tmp_path, capsys):
    """A real read-only directory (a read-only bind mount: root ignores permission bits, not a read-only mount)."""
    checkpoints = tmp_path / "read-only"
    checkpoints.mkdir()
    if not (mount("--bind", str(checkpoints), str(checkpoints)) and mount("-o", "remount,ro,bind", str(checkpoints))):
        subprocess.run(["umount", str(checkpoints)], check=False)
        pytest.skip("cannot bind-mount here (needs root with CAP_SYS_ADMIN)")
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_cli("fit", *demo_args(tmp_path, *SHORT, *EVERY_STEP, "--checkpoint.dirpath", str(checkpoints)))
    finally:
        subprocess.run(["umount", str(checkpoints)], check=False)
    assert exit_info.value.code == 1
    assert last_err_line(capsys) == (
        f"lima-lightning: error: cannot write {checkpoints / 'last.ckpt'}: read-only filesystem (EROFS); nothing was left "
        f"half-written; write elsewhere with --trainer.default_root_dir, or make {checkpoints} writable"
    )


# ----------------------------------------------------------------------------- every writer, part-way
@pytest.fixture(scope="module")
def module(tiny_dir):
    from lima_lightning.module import LIMALoRAModule

    module = LIMALoRAModule(base_model="tiny", quantization="none", lora_r=4, gradient_checkpointing=False)
    module.configure_model()
    return module


@pytest.mark.parametrize("behind", [False, True], ids=["synchronous", "behind"])
def test_checkpoint_write_that_fills_the_disk_part_way_keeps_the_previous_one(tmp_path, monkeypatch, behind):
    from lima_lightning.checkpointing import AsyncAtomicCheckpointIO
    from lima_lightning.io import WriteError

    io, target = AsyncAtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.zeros(1000)}, target)
    full = FullAfter(monkeypatch, "last.ckpt", after=700)
    with pytest.raises(WriteError) as error:  # torch itself raises "RuntimeError: ... unexpected pos 704 vs 598"
        with io.writing_behind() if behind else contextlib.nullcontext():
            io.save_checkpoint({"global_step": 2, "w": torch.ones(1000)}, target)
        io.wait()  # behind training: where the end of fit, or the next save, finds the failure
    monkeypatch.undo()
    assert full.hits == 1 and (error.value.errno, error.value.filename, error.value.existed) == (errno.ENOSPC, str(target), True)
    assert visible(tmp_path) == ["last.ckpt"] and not leftovers(tmp_path)
    assert io.load_checkpoint(target)["global_step"] == 1


def test_adapter_save_that_fills_the_disk_part_way_keeps_the_previous_adapter(module, tmp_path, monkeypatch):
    import peft.peft_model
    from safetensors import SafetensorError

    from lima_lightning.callbacks import save_adapter
    from lima_lightning.io import WriteError

    target = tmp_path / "adapters" / "final"
    save_adapter(module, target)
    before = load_file(target / "adapter_model.safetensors")

    def half_then_full(tensors, filename, metadata=None):  # what safetensors raises on a real full disk
        Path(filename).write_bytes(b"\x00" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", half_then_full)
    with pytest.raises(WriteError) as error:
        save_adapter(module, target)
    assert (error.value.errno, error.value.filename) == (errno.ENOSPC, str(target))
    assert visible(target.parent) == ["final"] and not leftovers(target.parent)
    after = load_file(target / "adapter_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EDQUOT])
def test_jsonl_and_text_writes_that_fail_part_way_keep_the_previous_file(code, tmp_path, monkeypatch):
    from lima_lightning.io import WriteError, write_jsonl_atomically, write_text_atomically

    for name, write in (
        ("predictions.jsonl", lambda p, v: write_jsonl_atomically(p, [{"id": v}] * 50)),
        ("page.html", write_text_atomically),
    ):
        target = tmp_path / name
        write(target, "old" if name.endswith("html") else 0)
        before = target.read_bytes()
        with monkeypatch.context() as patched:
            FullAfter(patched, name, code=code, after=30)
            with pytest.raises(WriteError) as error:
                write(target, "new" * 100 if name.endswith("html") else 1)
        assert error.value.errno == code and target.read_bytes() == before and not leftovers(tmp_path), name


def test_an_append_that_fills_the_disk_keeps_only_whole_rows(tmp_path, monkeypatch):
    from lima_lightning.io import WriteError, append_jsonl

    samples = tmp_path / "samples.jsonl"
    append_jsonl(samples, [{"epoch": 0, "response": "a"}])
    before = samples.read_bytes()
    FullAfter(monkeypatch, "samples.jsonl", after=10)
    with pytest.raises(WriteError):
        append_jsonl(samples, [{"epoch": 1, "response": "b" * 100}])
    monkeypatch.undo()
    assert samples.read_bytes() == before  # not a half row that would break every reader of the file


# ----------------------------------------------------------------------------- through the commands: one line, stop
@pytest.mark.slow
def test_predictions_that_cannot_be_written_stop_predict_in_one_line(tmp_path, capsys, monkeypatch):
    FullAfter(monkeypatch, "predictions.jsonl", code=errno.EACCES, after=0)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("predict", *demo_args(tmp_path, "--model.generation.max_new_tokens", "4", "--data.synthetic_size", "40"))
    assert exit_info.value.code == 1
    run = tmp_path / "lightning_logs" / "version_0"
    assert last_err_line(capsys) == (
        f"lima-lightning: error: cannot write {run / 'predictions.jsonl'}: permission denied (EACCES); nothing was left half-written; "
        f"write elsewhere with --trainer.default_root_dir, or make {run} writable"
    )
    assert not (run / "predictions.jsonl").exists() and not leftovers(run)


@pytest.mark.slow
def test_samples_that_fill_the_disk_stop_fit_in_one_line_and_keep_whole_rows(tmp_path, capsys, monkeypatch):
    from lima_lightning.io import append_jsonl

    writes = []

    def full_at_the_second_epoch(target, rows):
        writes.append(len(rows))
        if len(writes) == 2:
            FullAfter(monkeypatch, "samples.jsonl", after=40)
        return append_jsonl(target, rows)

    monkeypatch.setattr("lima_lightning.callbacks.append_jsonl", full_at_the_second_epoch)
    args = demo_args(tmp_path, *SHORT, "--trainer.max_epochs", "2", "--samples.num_prompts", "2", "--samples.max_new_tokens", "4")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *args)
    assert exit_info.value.code == 1
    samples = tmp_path / "lightning_logs" / "version_0" / "samples.jsonl"
    assert last_err_line(capsys).startswith(f"lima-lightning: error: cannot write {samples}: no space left on the device (ENOSPC)")
    assert [json.loads(line)["epoch"] for line in samples.read_text().splitlines()] == [0, 0]


def test_a_report_that_cannot_be_written_is_one_line_and_keeps_the_previous_report(tmp_path, capsys, monkeypatch):
    from lima_lightning.cli import main

    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"id": 0, "prompt": "p", "response": "r", "finish_reason": "eos", "new_tokens": 1}\n')
    out = tmp_path / "report"
    main(["report", "--run", f"a={predictions}", "--out", str(out)])
    before = (out / "report.html").read_bytes()
    FullAfter(monkeypatch, "report.html", code=errno.ENOSPC, after=1000)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--run", f"b={predictions}", "--out", str(out)])
    assert exit_info.value.code == 1
    assert last_err_line(capsys) == (
        f"lima-lightning: error: cannot write {out}: no space left on the device (ENOSPC); the previous report is intact; "
        "free some space, or write elsewhere with --out"
    )
    assert (out / "report.html").read_bytes() == before and not leftovers(tmp_path)


# ----------------------------------------------------------------------------- the user's umask
@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_outputs_get_the_users_umask(umask, dir_mode, file_mode, module, tmp_path):
    """An adapter (safetensors writes 0600, mkdtemp 0700), a checkpoint, a predictions file: as `mkdir`/`open` would."""
    from lima_lightning.callbacks import save_adapter
    from lima_lightning.checkpointing import AtomicCheckpointIO
    from lima_lightning.io import write_jsonl_atomically

    previous = os.umask(umask)
    try:
        adapter = save_adapter(module, tmp_path / "adapters" / "final")
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "checkpoints" / "last.ckpt")
        write_jsonl_atomically(tmp_path / "predictions.jsonl", [{"id": 0}])
    finally:
        os.umask(previous)
    paths = [adapter, *adapter.iterdir(), tmp_path / "checkpoints", tmp_path / "checkpoints" / "last.ckpt", tmp_path / "predictions.jsonl"]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in paths}
    assert modes == {p.name: oct(dir_mode if p.is_dir() else file_mode) for p in paths}
