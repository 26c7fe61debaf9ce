"""Progress wherever the output goes: predict's prompts and tokens, fit's lines in a log file."""

from __future__ import annotations

from types import SimpleNamespace

from lima_lightning import progress


class _Trainer:
    """What GenerationProgress reads of a Trainer."""

    is_global_zero, enable_progress_bar, progress_bar_callback = True, True, None

    def __init__(self, prompts: int) -> None:
        self.datamodule = type("DataModule", (), {"predict_dataset": [None] * prompts})()


def test_generation_progress_in_a_log_file_is_a_plain_line_every_few_seconds(monkeypatch, capsys):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    bar = progress.GenerationProgress()
    module = type("Module", (), {})()
    bar.on_predict_start(_Trainer(300), module)
    assert module.generation_progress is bar and bar.bar is None  # stdout is not a terminal under pytest
    for _ in range(120):  # 60 s of decoding, 8 steps of 300 rows every half second
        clock[0] += 0.5
        bar.tokens(2400)
    bar.prompts(150)
    bar.prompts(150)  # all answered: the last line, once
    bar.on_predict_end(None, module)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 60 // progress.PLAIN_LINE_EVERY_S + 1 and module.generation_progress is None
    assert lines[0] == "generate: 0/300 prompts, 72,000 tokens, 4,800 tokens/s"
    assert lines[-1] == "generate: 300/300 prompts, 288,000 tokens, 4,800 tokens/s"


def test_generation_progress_on_a_terminal_is_a_bar(monkeypatch, capsys):
    monkeypatch.setattr(progress.sys.stdout, "isatty", lambda: True)
    bar = progress.GenerationProgress()
    module = type("Module", (), {})()
    bar.on_predict_start(_Trainer(2), module)
    bar.tokens(5)
    bar.prompts(2)
    assert bar.bar is not None and bar.bar.n == 2 and bar.closed


def test_a_fit_in_a_log_file_prints_a_line_every_few_seconds_and_each_validation(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    trainer = SimpleNamespace(
        is_global_zero=True, global_step=0, estimated_stepping_batches=125, max_epochs=3, current_epoch=0, loggers=[],
        callback_metrics={"train/tokens_per_sec": 8827.4}, progress_bar_metrics={"loss": 1.25}, sanity_checking=False,
        state=SimpleNamespace(fn="fit"),
    )  # fmt: skip
    bar = progress.LogLineProgressBar()
    bar._trainer = trainer
    bar.on_train_start(trainer, None)
    for step in range(1, 41):  # 2 s an optimizer step: 80 s
        clock[0] += 2.0
        trainer.global_step = step
        bar.on_train_batch_end(trainer, None, None, None, step)
    trainer.progress_bar_metrics = {"loss": 1.2, "val/loss": 1.5, "val/perplexity": 4.48}
    bar.on_validation_end(trainer, None)
    bar.on_train_epoch_end(trainer, None)
    trainer.sanity_checking = True
    bar.on_validation_end(trainer, None)  # the sanity check says nothing
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 80 // progress.PLAIN_LINE_EVERY_S + 2
    assert lines[0] == "epoch 1/3, step 8/125 (6%), 0:16 elapsed, ~3:54 left, loss 1.250, 8,827 tokens/s"
    assert lines[-2:] == [
        "validation: val/loss 1.500, val/perplexity 4.480",
        "epoch 1/3, step 40/125 (32%), 1:20 elapsed, ~2:50 left, loss 1.200, 8,827 tokens/s",
    ]
    bar.disable()
    bar.on_train_epoch_end(trainer, None)
    assert capsys.readouterr().out == ""
    bar.enable()
    clock[0], trainer.global_step = 1000.0, 100  # resumed at step 100: the time left from this process's steps
    bar.on_train_start(trainer, None)
    clock[0], trainer.global_step = 1010.0, 105
    bar.on_train_epoch_end(trainer, None)
    assert "step 105/125 (84%), 0:10 elapsed, ~0:40 left" in capsys.readouterr().out


def test_the_default_bar_gives_way_to_lines_where_stdout_is_not_a_terminal(monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from lima_lightning.trainer_cli import quiet_trainer

    trainer = SimpleNamespace(callbacks=[RichProgressBar(), TQDMProgressBar(refresh_rate=7)])
    quiet_trainer(trainer)  # under pytest stdout is not a terminal
    assert [type(c) for c in trainer.callbacks] == [progress.LogLineProgressBar] * 2
