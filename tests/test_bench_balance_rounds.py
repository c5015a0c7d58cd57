"""``llnode bench balance``'s static part: interleaved rounds over the candidate plans, and the figures
(medians, spread, paired ratios) computed from them. The numbers below are the shape of real runs: the
session-4 quiet VM measured the MILP-on-measured-speeds plan at 12.8 tok/s in one run and 29.9 in the
next, which one draw per plan turned into ``milp_over_best`` 0.41 and 0.81."""

from __future__ import annotations

import pytest

from llnode.bench.balance import (
    confirm_ratios,
    confirmation_labels,
    distinct_plans,
    round_orders,
    summarize_rounds,
)

EVEN = [("node0", 0, 11), ("node1", 11, 21), ("node2", 21, 32)]
MEASURED = [("node1", 0, 12), ("node2", 12, 18), ("node0", 18, 32)]


def _plans() -> dict[str, list[tuple[str, int, int]]]:
    return {
        "milp": [("node1", 0, 12), ("node0", 12, 32)],
        "even": EVEN,
        "memory": list(EVEN),
        "milp_measured": MEASURED,
        "brute0": list(MEASURED),
        "brute1": [("node2", 0, 7), ("node1", 7, 18), ("node0", 18, 32)],
        "brute2": [("node0", 0, 22), ("node2", 22, 28), ("node1", 28, 32)],
    }


def test_each_distinct_plan_is_measured_once_and_every_label_points_at_its_stand_in() -> None:
    unique, alias = distinct_plans(_plans())
    assert list(unique) == ["milp", "even", "milp_measured", "brute1", "brute2"]
    assert alias["memory"] == "even" and alias["brute0"] == "milp_measured"
    assert alias["brute2"] == "brute2" and set(alias) == set(_plans())


def test_rounds_interleave_every_plan_and_rotate_which_goes_first() -> None:
    orders = round_orders(["a", "b", "c"], 4)
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    # every plan once per round, and each plan takes each position once in as many rounds as plans
    assert all(sorted(o) == ["a", "b", "c"] for o in orders)
    assert {o.index("a") for o in orders[:3]} == {0, 1, 2}


def test_medians_not_one_outlier_decide_milp_over_best() -> None:
    _, alias = distinct_plans(_plans())
    samples = {
        "milp": [27.4, 31.0, 29.0],
        "even": [10.7, 16.6, 14.0],
        "milp_measured": [12.8, 29.9, 30.5],  # one bad draw (the 0.41 run) among good ones
        "brute1": [30.1, 31.5, 30.0],
        "brute2": [31.4, 37.0, 32.0],
    }
    s = summarize_rounds(samples, alias)
    assert s["best"] == "brute2"
    assert s["milp_over_best"] == pytest.approx(29.9 / 32.0)
    # one draw of each (the first round) would have said 0.41
    assert samples["milp_measured"][0] / samples["brute2"][0] == pytest.approx(0.41, abs=0.01)
    # paired per round: the measured-speed plan over that round's best brute-force plan
    assert s["paired_rounds"] == [round(12.8 / 31.4, 3), round(29.9 / 37.0, 3), round(30.5 / 32.0, 3)]
    assert s["paired_milp_over_best"] == pytest.approx(29.9 / 37.0)
    # every label has its stand-in's statistics, the spread relative to the median
    assert s["stats"]["brute0"] == s["stats"]["milp_measured"]
    assert s["stats"]["milp_measured"]["spread"] == pytest.approx((30.5 - 12.8) / 29.9)
    assert s["milp_over_memory"] == s["milp_over_even"] == pytest.approx(29.0 / 14.0)
    assert s["milp_startup_over_best"] == pytest.approx(29.0 / 32.0)


def test_the_retained_gain_cancels_which_fresh_cluster_each_drift_run_drew() -> None:
    """The session-4 quiet run: the rebalancing cluster was 11 % slower before the cut than the other
    one (same quotas, same load); over its own pre-cut rate it kept 0.79 where the other kept 0.67."""
    from llnode.bench.balance import gain_ceiling, retained_gain

    drift = {
        "with": {"tokens_per_s_before": 29.564, "tokens_per_s_after": 23.384, "tokens_per_s_tail": 26.538},
        "without": {"tokens_per_s_before": 33.396, "tokens_per_s_after": 22.246, "tokens_per_s_tail": 22.477},
        "fresh": {"tokens_per_s": 26.699},
    }
    assert retained_gain(drift) == pytest.approx((23.384 / 29.564) / (22.246 / 33.396), abs=1e-3)
    assert retained_gain(drift) == pytest.approx(1.187, abs=1e-3)  # raw with/without: 1.051
    assert retained_gain(drift, "tokens_per_s_tail") == pytest.approx(1.334, abs=1e-3)  # raw: 1.181
    assert gain_ceiling(drift) == pytest.approx(1.20, abs=0.005)
    # equal clusters: the retained gain is the raw gain
    same = {**drift, "with": {**drift["with"], "tokens_per_s_before": 33.396}}
    assert retained_gain(same) == pytest.approx(23.384 / 22.246, abs=1e-3)
    assert retained_gain({}) is None and gain_ceiling({}) is None


def test_quota_use_says_whether_a_nodes_quota_binds() -> None:
    from llnode.bench.balance import quota_use

    # over 10 s: a node at 0.6 of a core that used 6 s is held to its quota; one that used 3 s is not;
    # a node at 0.3 that used 3 s is; a gone process (None) has no figure
    use = quota_use([1.0, 2.0, 0.5, None], [7.0, 5.0, 3.5, 4.0], 10.0, [0.6, 0.6, 0.3, 0.6])
    assert use == [1.0, 0.5, 1.0, None]
    assert quota_use([0.0], [1.0], 0.0, [0.6]) == [None]



def test_fresh_rounds_not_the_ones_that_chose_the_best_give_milp_over_best() -> None:
    """Three equal plans measured with noise: the largest median wins the selection and looks 6 % better
    than the MILP; in fresh rounds the same plans measure alike and the ratio is ~1."""
    _, alias = distinct_plans(_plans())
    selection = {"milp": [30.0, 29.0, 31.0], "even": [15.0, 15.5, 16.0], "milp_measured": [30.0, 29.5, 30.5],
                 "brute1": [28.0, 29.0, 30.0], "brute2": [31.0, 32.5, 32.0]}
    s = summarize_rounds(selection, alias)
    assert s["best"] == "brute2" and s["milp_over_best"] == pytest.approx(30.0 / 32.0)
    labels = confirmation_labels(alias, s["best"])
    assert labels == ["milp_measured", "milp", "brute2"]
    fresh = {"milp_measured": [30.5, 29.0, 31.0], "milp": [29.0, 30.0, 28.0], "brute2": [30.0, 30.0, 30.5]}
    r = confirm_ratios(fresh, alias, s["best"])
    assert r["milp_over_best_rounds"] == [round(30.5 / 30.0, 3), round(29.0 / 30.0, 3), round(31.0 / 30.5, 3)]
    assert r["milp_over_best"] == pytest.approx(31.0 / 30.5)  # the median round
    assert r["milp_startup_over_best"] == pytest.approx(29.0 / 30.0)


def test_a_milp_plan_that_is_the_best_plan_scores_one_without_fresh_rounds() -> None:
    _, alias = distinct_plans(_plans())
    assert confirmation_labels(alias, "brute0") == ["milp_measured", "milp"]
    r = confirm_ratios({"milp_measured": [], "milp": [20.0]}, alias, "brute0")
    assert r["milp_over_best"] == 1.0 and r["milp_over_best_rounds"] == []
    assert r["milp_startup_over_best"] is None  # no fresh rounds measured: no figure, not a guess
