"""How a run's figures are named in MLflow, and which are left out while they are zero.

The run reports its figures under plain names (the ones in scores.json and the summary table); the tracker logs
them under the names below. What MLflow 3.17's UI allows, and why these names:

- A run page's Overview lists the metrics in the order they were first logged, and shows the run description
  (the tag mlflow.note.content, Markdown) above them: arcfold writes the headline there (RunTracker.finish), and
  logs a batch's headline metrics before the rest.
- Its Model metrics tab draws one chart per metric, grouped into sections by the name's prefix before "/":
  the prefixed sections first (alphabetically), then "Model metrics" (the names without a prefix), then
  "System metrics" (`system/...`, MLflow's sampler); charts in a section are alphabetical. So the headline keeps
  plain names and everything else goes under a prefix that says what it is: `fold/` (the per-fold series and
  their per-run summaries), `detail/` (counts and the other rankings' scores), `sys/` (seconds per phase,
  throughput, workers: the machine and the clock), `budget/` (the time budget). The runs table, the parent run
  and arcfold.cli.compare read the plain headline names.
- A series that is zero from start to end (no task failed, the budget cut nothing, no adapter saved) is not
  logged: a failure or budget figure appears once it is not zero, and from then on every value is logged.
"""

from __future__ import annotations

# The headline: plain names, logged first, what the runs table and a comparison read.
HEADLINE = (
    "score",
    "oracle",
    "answer_nll",
    "seconds_total",
    "selection_accuracy",
    "score_pairs",
    "answer_nll_base",
    "failed_tasks",
    "train_loss",
)
SYS = (
    "train_tokens_per_second",
    "inference_tokens_per_second",
    "gen_seconds",
    "scoring_seconds",
    "nll_seconds",
    "workers",
    "worker_idle_share",
    "fold_overhead_share",
)
DETAIL = (
    "tasks",
    "test_inputs",
    "solved",
    "solved_pairs",
    "covered_pairs",
    "mean_candidates",
    "forward_tokens",
    "invalid_completions",
    "dropped_demos",
    "timed_out_inputs",
    "n_folds",
    "train_tokens",
    "adapters_disk_mb",
)
# Failure and budget figures (also per fold), and the adapters' disk estimate: logged only once not zero.
UNTIL_NOT_ZERO = (
    "failed_tasks",
    "timed_out_inputs",
    "invalid_completions",
    "dropped_demos",
    "budget_cuts",
    "budget_cut_inputs",
    "budget_placeholder_inputs",
    "adapters_disk_mb",
)


def mlflow_name(key: str) -> str:
    """The MLflow metric name of a run's figure (a name this module does not know stays as it is)."""
    if key in HEADLINE:
        return key
    if key in SYS or key.startswith("seconds_"):
        return f"sys/{key}"
    if key.startswith("budget_"):
        return f"budget/{key.removeprefix('budget_')}"
    if key.startswith("fold_"):
        return f"fold/{key.removeprefix('fold_')}"
    if key in DETAIL or key.startswith("score_"):  # score_<aggregate>: the other rankings' scores
        return f"detail/{key}"
    return key


def waits_for_not_zero(key: str) -> bool:
    return key.removeprefix("fold_") in UNTIL_NOT_ZERO


def headline_first(keys: list[str]) -> list[str]:
    """The keys in the order to log them: the headline's, in HEADLINE order, then the rest as they came."""
    return sorted(keys, key=lambda k: HEADLINE.index(k) if k in HEADLINE else len(HEADLINE))


__all__ = ["HEADLINE", "headline_first", "mlflow_name", "waits_for_not_zero"]
