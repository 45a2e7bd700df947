"""The budget planner on its own: slices, projection, the degradation order, placeholders, caps (no model, no clock)."""

from __future__ import annotations

import pytest

from arcfold.checks import ConfigError, check_budget
from arcfold.config import BudgetConfig, InferenceConfig
from arcfold.run.budget import FoldWork, Planner, Step, degraded, margin_seconds, total_seconds


def planner(seconds=None, margin=0.0, work=((100.0, 50.0), (300.0, 150.0)), workers=1, **kw) -> Planner:
    budget = BudgetConfig(seconds=seconds, margin_seconds=margin, **kw)
    return Planner(budget, [FoldWork(t, i) for t, i in work], start=0.0, full_views=8, workers=workers)


def test_total_seconds_adds_hours_and_seconds():
    assert total_seconds(BudgetConfig()) is None
    assert total_seconds(BudgetConfig(hours=1.5, seconds=30)) == 5430.0


def test_without_a_deadline_nothing_is_capped_or_cut():
    p = planner()
    plan = p.start_fold(0, 0.0)
    assert plan.end is None and plan.train_seconds is None and plan.projected_total is None
    step = p.next_input(0, plan, 10.0, 1e9, "x")
    assert step.cuts == () and step.max_seconds is None and not p.events


def test_slices_follow_the_work_left_and_what_a_fold_leaves_passes_on():
    p = planner(seconds=110.0, margin=10.0)  # 100 s to spend; fold 0 has a quarter of the work (token counts)
    plan = p.start_fold(0, 0.0)
    assert plan.end == pytest.approx(25.0)
    assert plan.train_seconds == pytest.approx(12.5)  # uncalibrated: half the slice
    p.observe_train(0, 1.0, 5.0)  # 100 tokens in 5 s
    p.observe_input(0, p.next_input(0, plan, 50.0, 5.0, "a"), 50.0, 5.0)  # 50 units in 5 s
    plan1 = p.start_fold(1, 10.0)  # fold 0 used 10 of its 25 s: fold 1 gets all 90 s left
    assert plan1.end == pytest.approx(100.0)
    # calibrated: training's share is its projected share of the fold (300*0.05 vs 150*0.1 seconds)
    assert plan1.train_seconds == pytest.approx(90.0 * 15.0 / 30.0)
    assert plan1.projected_total == pytest.approx(10.0 + 300 * 0.05 + 150 * 0.1)


def test_inference_steps_down_the_configured_order_one_step_per_input():
    p = planner(seconds=100.0, work=((0.0, 100.0),), degrade=["greedy", "views", "placeholders"], views=2)
    plan = p.start_fold(0, 0.0)
    first = p.next_input(0, plan, 10.0, 0.0, "t0")
    assert first.cuts == () and first.max_seconds == pytest.approx(20.0)  # twice its share: 2 * 100 s * 10 / 100
    p.observe_input(0, first, 10.0, 60.0)  # 6 s per unit: the 90 units left need 540 s, 40 s are left
    second = p.next_input(0, plan, 10.0, 60.0, "t1")
    assert second.cuts == ("greedy",) and second.max_seconds == pytest.approx(2 * 40.0 * 10 / 90)
    assert p.events[-1]["cut"] == "greedy" and "540.0 s" in p.events[-1]["why"] and "t1" == p.events[-1]["at"]
    # greedy is not measured yet: one step per input, so the next input steps on only after a measurement
    p.observe_input(0, second, 10.0, 30.0)  # 3 s per unit: 80 units need 240 s, 10 s left
    third = p.next_input(0, plan, 10.0, 90.0, "t2")
    assert third.cuts == ("greedy", "views")
    assert p.infer_rate(2) == pytest.approx(3.0 * 2 / 8)  # unmeasured views cut: its view ratio assumed
    # the last real cut is as far as projection goes; placeholders come only when the slice is spent
    p.observe_input(0, third, 10.0, 5.0)
    last = p.next_input(0, plan, 70.0, 95.0, "t3")  # the last input may use all that is left, no more
    assert last.cuts == ("greedy", "views") and last.max_seconds == pytest.approx(5.0)
    spent = p.next_input(0, plan, 10.0, 100.0, "t4")
    assert spent.placeholders and spent.max_seconds == 0.0
    assert [e["cut"] for e in p.events] == ["greedy", "views", "placeholders"]
    p.next_input(0, plan, 10.0, 101.0, "t5")
    assert len(p.events) == 3  # placeholders is logged once per fold


def test_a_fast_enough_run_is_never_cut():
    p = planner(seconds=1000.0, work=((0.0, 100.0),))
    plan = p.start_fold(0, 0.0)
    for k in range(10):
        step = p.next_input(0, plan, 10.0, k * 10.0, f"t{k}")
        assert step.cuts == ()
        p.observe_input(0, step, 10.0, 10.0)
    assert not p.events


def test_the_projection_is_elapsed_plus_rate_times_work_left():
    p = planner(seconds=1e6, work=((100.0, 40.0), (200.0, 80.0), (300.0, 120.0)))
    plan = p.start_fold(0, 0.0)
    p.observe_train(0, 0.5, 2.0)  # stopped after half its steps: 50 tokens in 2 s
    step = p.next_input(0, plan, 40.0, 2.0, "a")
    p.observe_input(0, step, 40.0, 8.0)
    expected = 10.0 + (200 + 300) * (2.0 / 50) + (80 + 120) * (8.0 / 40)
    assert p.projection(10.0) == pytest.approx(expected)


def test_degraded_settings_per_cut():
    inference = InferenceConfig(strategy="dfs", min_prob=0.1, max_seconds=120.0)
    budget = BudgetConfig(views=3, min_prob=0.4)
    settings, views = degraded(Step(2, ("views", "min_prob"), 30.0), budget, inference, 16)
    assert settings == {"max_seconds": 30.0, "min_prob": 0.4} and views == 3
    settings, views = degraded(Step(1, ("greedy",), 500.0), budget, inference, 16)
    assert settings == {"max_seconds": 120.0, "strategy": "greedy", "scoring.views": 0} and views == 16
    assert degraded(Step(0, (), None), budget, inference, 8) == ({}, 8)


@pytest.mark.parametrize(
    "values,key",
    [
        ({"seconds": 0}, "budget.seconds"),
        ({"hours": -1.0}, "budget.hours"),
        ({"degrade": ["views", "greedy"]}, "budget.degrade"),
        ({"degrade": ["fast", "placeholders"]}, "budget.degrade"),
        ({"degrade": ["views", "views", "placeholders"]}, "budget.degrade"),
        ({"seconds": 30, "margin_seconds": 30}, "budget.margin_seconds"),
        ({"views": 0}, "budget.views"),
        ({"min_prob": 1.5}, "budget.min_prob"),
    ],
)
def test_bad_budgets_are_refused_naming_the_key(values, key):
    with pytest.raises(ConfigError) as err:
        check_budget(BudgetConfig(**values))
    assert err.value.key == key and "\n" not in str(err.value)


def test_a_good_budget_passes():
    check_budget(BudgetConfig(hours=11.5, margin_seconds=1800, degrade=["greedy", "placeholders"]))
    assert planner(seconds=100.0, margin=20.0).write_by == 80.0  # the deadline minus the margin


@pytest.mark.parametrize(
    "values,margin",
    [
        ({"seconds": 40}, 4.0),  # refused before: the default margin was 60 s
        ({"seconds": 300}, 30.0),
        ({"seconds": 600}, 60.0),
        ({"hours": 11}, 60.0),
        ({"hours": 11, "margin_seconds": 1800}, 1800.0),  # explicit: as given
        ({"seconds": 40, "margin_seconds": 0}, 0.0),
        ({}, 0.0),  # no deadline, no margin
    ],
)
def test_the_default_margin_scales_with_the_budget(values, margin):
    budget = BudgetConfig(**values)
    check_budget(budget)
    assert budget.margin_seconds == values.get("margin_seconds") and margin_seconds(budget) == margin
    if values:
        assert Planner(budget, [FoldWork(1.0, 1.0)], start=0.0, full_views=8).write_by == total_seconds(budget) - margin


def test_a_short_budget_and_the_kaggle_presets_margin_compose_and_pass():
    from hydra import compose, initialize_config_module

    from arcfold.checks import check
    from arcfold.config import register

    register()
    with initialize_config_module("arcfold.conf", version_base="1.3"):
        short = compose("config", overrides=["budget.seconds=40"])
        kaggle = compose("config", overrides=["experiment=kaggle", "data.challenges=/nope", "model.path=/nope"])
    check(short)
    assert short.budget.margin_seconds is None and margin_seconds(short.budget) == 4.0
    assert kaggle.budget.margin_seconds == 1800 and margin_seconds(kaggle.budget) == 1800.0


def test_with_workers_a_fold_gets_their_share_of_the_work_left_and_the_projection_divides():
    one, two = planner(seconds=110.0, margin=10.0), planner(seconds=110.0, margin=10.0, workers=2)
    # Fold 1 holds three quarters of the work: alone it gets 75 of the 100 s; beside another worker all of them.
    assert one.start_fold(1, 0.0).end == pytest.approx(75.0) and two.start_fold(1, 0.0).end == pytest.approx(100.0)
    assert two.start_fold(0, 0.0).end == pytest.approx(50.0)  # its quarter, doubled
    for p in (one, two):
        p.observe_train(0, 1.0, 5.0)
        p.observe_input(0, p.next_input(0, p.start_fold(0, 0.0), 50.0, 5.0, "a"), 50.0, 5.0)
    rest = 300 * 0.05 + 150 * 0.1  # fold 1's projected seconds
    assert one.projection(10.0) == pytest.approx(10.0 + rest) and two.projection(10.0) == pytest.approx(10.0 + rest / 2)
