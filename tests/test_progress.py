"""Live progress: log lines off a terminal, bars when asked; the end-of-run summary table."""

from __future__ import annotations

import logging
import math
import os

from arcfold.run.progress import Progress, quiet_libraries, shows_bars, summary_table


def drive(progress: Progress) -> None:
    with progress:
        for f in range(2):
            progress.fold(f, 2)
            for step in range(1, 4):
                progress.train_step(step, 3, 2.5 / step)
            progress.task_done(f"t{f}a")
            progress.task_done(f"t{f}b")


def test_off_a_terminal_auto_mode_writes_plain_lines_with_the_loss_and_an_eta(caplog, capsys):
    caplog.set_level(logging.INFO, logger="arcfold.progress")
    progress = Progress("auto", tasks=4, folds=2, every=0.0)  # pytest's stderr is not a terminal
    assert not progress.bars and progress.lines and not shows_bars("auto") and shows_bars("bars")
    drive(progress)
    lines = [r.getMessage() for r in caplog.records]
    assert "fold 1/2: training step 3/3, loss 0.8333" in lines
    assert "fold 2/2: 4/4 tasks predicted, elapsed 0:00, ETA 0:00 (last t1b)" in lines
    assert not any("tasks (elapsed" in ln for ln in lines)  # no line at a fold's start: its summary line says it
    assert "\r" not in capsys.readouterr().err  # no bar redraws in a log file


def test_the_last_task_of_a_fold_leaves_the_line_to_the_folds_summary(caplog):
    caplog.set_level(logging.INFO, logger="arcfold.progress")
    progress = Progress("lines", tasks=2, folds=1, every=0.0)
    with progress:
        progress.fold(0, 2)
        progress.task_done("a")
        progress.task_done("b", fold_done=True)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["fold 1/1: 1/2 tasks predicted, elapsed 0:00, ETA 0:00 (last a)"]


def test_lines_are_throttled_and_the_fold_summary_line_gets_the_status(caplog):
    caplog.set_level(logging.INFO, logger="arcfold.progress")
    progress = Progress("lines", tasks=4, folds=2, every=3600.0)
    drive(progress)
    assert not caplog.records  # nothing due: the pipeline's one line per fold is the log
    assert progress.status() == "4/4 tasks predicted, elapsed 0:00, ETA 0:00"


def test_quiet_libraries_switches_off_the_loading_bar_and_the_known_warning(monkeypatch):
    import warnings

    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries(bars=False)
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1
        )
        warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
    try:
        assert [str(w.message) for w in caught] == ["another FutureWarning"]
        assert not transformers_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # worker processes inherit it
        assert logging.getLogger("bitsandbytes.backends.cpu.ops").level == logging.ERROR
    finally:
        transformers_logging.enable_progress_bar()
        enable_progress_bars()


def test_bars_show_the_fold_and_steps_with_the_loss_instead_of_lines(caplog, capsys):
    progress = Progress("bars", tasks=4, folds=2)
    drive(progress)
    err = capsys.readouterr().err
    assert "fold 2/2" in err and "loss=0.8333" in err and "4/4" in err
    assert not [r for r in caplog.records if r.name == "arcfold.progress"]  # bars replace the lines
    assert math.isnan(Progress("off", 3, 1).eta())


def test_the_summary_table_has_scores_phases_failures_files_and_the_link():
    text = summary_table(
        {
            "score": 0.25,
            "score_pairs": 0.3,
            "oracle": 0.5,
            "selection_accuracy": math.nan,
            "answer_nll": 1.23456,
            "seconds_total": 12.0,
            "seconds_load": 1.0,
            "seconds_train": 6.5,
            "tasks": 8,
            "n_folds": 2,
        },
        failures=1,
        run_dir="/runs/x",
        link="http://ui/#/run",
    )
    assert "0.250 (pairs 0.300)" in text and "0.500 (selection accuracy -)" in text and "1.2346" in text
    assert "12.0 total: load 1.0, train 6.5" in text and "8 in 2 folds, 1 failed" in text
    assert "/runs/x" in text and "http://ui/#/run" in text and "\x1b[" not in text  # plain text for the log
    assert not any(line.endswith(" ") for line in text.splitlines())  # no padding to the console's width
