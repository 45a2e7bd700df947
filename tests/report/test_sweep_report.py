"""A sweep's comparison from run records: configurations over seeds, the baseline intervals, the report files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from arcfold.report.comparison import MIN_TASKS, RunRecord, compare, swept_keys, table_rows, verdict
from arcfold.report.comparison_files import write_report
from arcfold.report.stats import paired_bootstrap

TASKS = [f"t{i:02d}" for i in range(30)]


def record(rank: int, seed: int, rng: np.random.Generator, p_solve: float, nll: float) -> RunRecord:
    scores = {t: float(rng.random() < p_solve) for t in TASKS}
    nlls = {t: nll + rng.normal(0, 0.05) for t in TASKS}
    params = {
        "lora.rank": str(rank),
        "seed": str(seed),
        "train.seed": str(seed),
        "split.seed": str(seed),
        "folds": "2",
        "data.limit": "30",
    }
    metrics = {
        "score": float(np.mean(list(scores.values()))),
        "oracle": 0.5,
        "selection_accuracy": 0.4,
        "answer_nll": float(np.mean(list(nlls.values()))),
        "seconds_total": 10.0 + seed,
    }
    return RunRecord(
        f"{rank:04d}{seed:028d}",
        f"lora.rank={rank} seed={seed}",
        params,
        metrics,
        "FINISHED",
        {"score": scores, "answer_nll": nlls},
    )


@pytest.fixture
def runs() -> list[RunRecord]:
    rng = np.random.default_rng(0)
    return [record(rank, seed, rng, p, nll) for rank, p, nll in ((16, 0.6, 0.8), (4, 0.2, 1.2)) for seed in (1, 2, 3)]


def test_configurations_are_the_swept_params_without_the_seeds(runs):
    swept, seeds = swept_keys(runs)
    assert swept == ["lora.rank"] and seeds == ["seed", "split.seed", "train.seed"]
    c = compare(runs, n_boot=500)
    assert [conf.label for conf in c.configurations] == ["lora.rank=4", "lora.rank=16"]  # numeric order
    assert [[r.seed for r in conf.runs] for conf in c.configurations] == [["1", "2", "3"]] * 2
    assert c.configurations[c.best].label == "lora.rank=16" and c.baseline == 0


def test_the_interval_pairs_tasks_over_each_configurations_seed_means(runs):
    c = compare(runs, baseline="lora.rank=4", n_boot=800, seed=5)
    low, high = c.configurations
    expected = {}
    for metric in ("score", "answer_nll"):  # an independent computation of the per-task means
        a = np.array([[r.per_task[metric][t] for t in TASKS] for r in high.runs]).mean(axis=0)
        b = np.array([[r.per_task[metric][t] for t in TASKS] for r in low.runs]).mean(axis=0)
        expected[metric] = paired_bootstrap(a, b, 800, 0.95, 5)
        assert c.intervals[metric][0] is None and c.intervals[metric][1] == expected[metric]
    assert expected["score"].excludes_zero and expected["score"].mean > 0.25
    rows = table_rows(c)
    assert rows[1]["d score vs baseline"].endswith("**better**")
    assert rows[1]["d answer_nll vs baseline"].endswith("**better**")  # lower NLL is better
    assert rows[0]["d score vs baseline"] == "baseline" and rows[1]["lora.rank"] == "16 (best)"
    mean, sd = np.mean([r.metrics["score"] for r in high.runs]), np.std([r.metrics["score"] for r in high.runs], ddof=1)
    assert rows[1]["score"] == f"{mean:.3f} +- {sd:.3f}"


def test_a_sweep_over_a_preset_is_named_by_the_preset_where_it_tells_the_configurations_apart(runs):
    for r in runs:  # two presets that set other keys of their own as well
        r.params.update({"variant": f"v{r.params['lora.rank']}", "train.lr": str(int(r.params["lora.rank"]) / 1e4)})
    c = compare(runs, n_boot=100)
    assert c.swept == ["variant"] and [conf.label for conf in c.configurations] == ["variant=v16", "variant=v4"]
    assert list(table_rows(c)[0])[:2] == ["variant", "runs"]
    runs[0].params["variant"] = runs[3].params["variant"]  # now the preset alone would merge two configurations
    assert compare(runs, n_boot=100).swept == ["lora.rank", "train.lr", "variant"]


def test_a_baseline_that_matches_nothing_names_the_configurations(runs):
    with pytest.raises(ValueError, match="lora.rank=4; lora.rank=16"):
        compare(runs, baseline="lora.rank=99")
    assert compare(runs, baseline=runs[3].run_id, n_boot=100).baseline == 0  # a run id picks its configuration


def test_the_report_files_are_written_with_strict_json(tmp_path, runs, read_png):
    for r in runs[:3]:
        r.metrics["oracle"] = math.nan  # the mean and sd are NaN: they must come out as null, not NaN
    c = compare(runs, n_boot=300)
    files = write_report(c, tmp_path, "test sweep")
    text = files["report"].read_text()
    assert "| lora.rank | runs | score |" in text and "lora.rank=16 (best)" not in text
    assert "16 (best)" in text and "Solved per task" in text and "repeats by seed." in text
    assert f"r1 = lora.rank=4 seed=1 ({c.runs[0].run_id[:8]})" in text  # runs labelled by `seed`, not train.seed
    for key in ("solved_matrix_png", "score_png", "answer_nll_png", "d_score_png", "d_answer_nll_png"):
        read_png(files[key])
        assert f"]({files[key].name})" in text  # report.md: the plots as images beside it
    page = files["html"].read_text()  # report.html: one file, every plot inside it
    assert page.count('src="data:image/png;base64,') == 5 and ".png" not in page.replace("image/png", "")
    assert "<table>" in page and "<b>Best: lora.rank=16</b>" not in page and "Best: lora.rank=16" in page
    assert "answer NLL, no TTT" not in text  # no run has it: no column of dashes
    doc = json.loads(files["json"].read_text(), parse_constant=lambda x: pytest.fail(f"non-strict JSON {x}"))
    assert doc["configurations"][1]["metrics"]["oracle"] == {"mean": None, "sd": None}
    assert doc["best"] == "lora.rank=16" and doc["configurations"][1]["vs_baseline"]["score"]["excludes_zero"]
    matrix = files["solved_matrix_csv"].read_text().splitlines()
    assert len(matrix) == 1 + len(TASKS) and matrix[0].split(",")[1:] == [r.run_id for r in c.runs]


def tied(n_tasks: int, nll_gap: float, noise: float = 0.05) -> list[RunRecord]:
    """Two configurations that solve the same tasks (a tied score), the second's answer NLL lower by nll_gap."""
    rng = np.random.default_rng(2)
    tasks = [f"t{i:02d}" for i in range(n_tasks)]
    solved = {t: float(rng.random() < 0.5) for t in tasks}
    runs = []
    for rank, nll in ((4, 1.0), (8, 1.0 - nll_gap)):
        for seed in (0, 1):
            nlls = {t: nll + rng.normal(0, noise) for t in tasks}
            metrics = {
                "score": float(np.mean(list(solved.values()))),
                "answer_nll": float(np.mean(list(nlls.values()))),
            }
            params = {"lora.rank": str(rank), "seed": str(seed)}
            runs.append(
                RunRecord(f"{rank}-{seed}", "", params, metrics, "FINISHED", {"score": solved, "answer_nll": nlls})
            )
    return runs


def test_a_tied_score_with_an_nll_interval_across_zero_is_no_clear_winner():
    c = compare(tied(20, nll_gap=0.001, noise=0.2), n_boot=500)
    assert c.configurations[c.leader].label in ("lora.rank=4", "lora.rank=8") and c.best is None
    assert not any("(best)" in v for row in table_rows(c) for v in row.values())
    assert verdict(c).startswith("no clear winner: ") and " leads with score " in verdict(c)


def test_a_tied_score_is_decided_by_an_nll_interval_that_excludes_zero():
    c = compare(tied(20, nll_gap=0.3), n_boot=500)
    assert c.best == c.leader and c.configurations[c.best].label == "lora.rank=8"
    assert table_rows(c)[1]["lora.rank"] == "8 (best)" and verdict(c).startswith("best: lora.rank=8, score ")


def test_too_few_tasks_give_no_winner_however_large_the_gap():
    c = compare(tied(MIN_TASKS - 1, nll_gap=0.5), n_boot=300)
    assert c.best is None and f"over {MIN_TASKS - 1} tasks: too few for a verdict" in verdict(c)


def test_one_configuration_is_not_called_best_of_one():
    runs = [r for r in tied(12, 0.3) if r.params["lora.rank"] == "4"]
    c = compare(runs, n_boot=100)
    assert verdict(c).startswith("one configuration: ") and "(best)" not in str(table_rows(c))


def test_the_nll_column_and_its_difference_are_one_mean_per_test_output():
    # Tasks with 1 or 3 test outputs: a per-task mean and a per-output mean differ, and must not be mixed.
    rng = np.random.default_rng(4)
    tasks = [f"t{i:02d}" for i in range(16)]
    outputs = {t: 1 + 2 * (i % 2) for i, t in enumerate(tasks)}
    runs = []
    for rank, shift in ((4, 0.0), (8, -0.2)):
        for seed in (0, 1):
            per_output = {
                t: [1.0 + shift * (1 + (outputs[t] == 3)) + rng.normal(0, 0.01) for _ in range(outputs[t])]
                for t in tasks
            }
            metrics = {"score": 0.0, "answer_nll": float(np.mean([v for vs in per_output.values() for v in vs]))}
            per_task = {
                "score": {t: 0.0 for t in tasks},
                "answer_nll": {t: float(np.mean(v)) for t, v in per_output.items()},
                "answer_nll_outputs": {t: float(len(v)) for t, v in per_output.items()},
            }
            runs.append(
                RunRecord(
                    f"{rank}-{seed}", "", {"lora.rank": str(rank), "seed": str(seed)}, metrics, "FINISHED", per_task
                )
            )
    c = compare(runs, n_boot=300)
    low, high = c.configurations
    column_gap = np.mean(high.metric("answer_nll")) - np.mean(low.metric("answer_nll"))
    assert c.intervals["answer_nll"][1].mean == pytest.approx(column_gap, abs=1e-9)
    unweighted = np.mean([high.per_task_mean("answer_nll", tasks) - low.per_task_mean("answer_nll", tasks)])
    assert abs(unweighted - column_gap) > 0.01  # a per-task mean would have disagreed with the column
