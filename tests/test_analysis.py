"""The paired statistics of benchmarks/analysis.py on made-up numbers with known answers."""

import math

import pytest

from analysis import paired, relative, spread


def test_the_paired_interval_is_students_t_on_the_differences():
    result = paired([11.0, 12.0, 13.0, 14.0, 15.0], [10.0] * 5)  # differences 1 … 5
    assert result.diffs == (1.0, 2.0, 3.0, 4.0, 5.0) and result.mean == 3.0
    # sd 1.5811, se 0.7071, t(0.975, 4) = 2.7764: 3 ± 1.9632
    assert result.half_width == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-4)
    assert result.interval == pytest.approx((1.036757, 4.963243), rel=1e-4)
    assert (result.below, result.above) == (0, 5)
    assert result.excludes_zero() and result.verdict() == "worse" and result.verdict(lower_is_better=False) == "better"
    assert result.shown() == "+3 [+1.04, +4.96], 0 of 5 lower"


def test_an_interval_that_straddles_zero_is_not_significant():
    result = paired([-10.0, 5.0, -3.0], [0.0, 0.0, 0.0])
    assert result.mean == pytest.approx(-8 / 3) and result.below == 2 and result.above == 1
    # variance 56.333 (sd 7.5056), se 4.3333, t(0.975, 2) = 4.3027: -2.667 ± 18.645
    assert result.interval == pytest.approx((-21.3117, 15.9783), rel=1e-4)
    assert result.verdict() == "not significant"


def test_one_seed_has_no_interval_and_pairs_must_match():
    assert paired([2.0], [1.0]).half_width == math.inf and paired([2.0], [1.0]).shown() == "1 (1 seed)"
    with pytest.raises(ValueError, match="pair them seed by seed"):
        paired([1.0, 2.0], [1.0])


def test_the_t_quantile_beyond_the_table_meets_it():
    from analysis import T_975, t_975

    assert t_975(4) == 2.7764 and abs(t_975(31) - 2.0395) < 1e-3 and abs(t_975(120) - 1.9799) < 1e-3
    assert t_975(30) == T_975[-1]


def test_relative_differences_and_spread():
    assert relative([90.0, 45.0], [100.0, 50.0]).diffs == pytest.approx((-0.1, -0.1))
    assert spread([1.0, 3.0]) == "2 ± 1.4" and spread([5.0]) == "5"


def test_a_trend_is_the_least_squares_slope_with_its_t_interval():
    from analysis import trend

    line = trend([0.0, 1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0, 4.0])
    # Sxy 8, Sxx 10: slope 0.8; residuals −0.4, 0.8, −1, 1.2, −0.6 (sum of squares 3.6), s² = 1.2,
    # se = √(1.2 / 10) = 0.34641, t(0.975, 3) = 3.1824: 0.8 ± 1.10241
    assert line.slope == pytest.approx(0.8)
    assert line.interval == pytest.approx((-0.30241, 1.90241), rel=1e-4)
    exact = trend([1.0, 2.0, 3.0], [3.0, 5.0, 7.0])
    assert exact.slope == pytest.approx(2.0) and exact.interval == pytest.approx((2.0, 2.0))
    assert trend([1.0, 2.0], [0.0, 1.0]).interval == (-math.inf, math.inf)  # two points: no interval
    with pytest.raises(ValueError, match="two distinct x values"):
        trend([1.0, 1.0, 1.0], [0.0, 1.0, 2.0])


def test_students_t_p_values_match_the_closed_forms_and_the_interval():
    from analysis import t_two_sided_p

    # df 1 is Cauchy: P(|T| ≥ 2) = 1 − (2/π) atan 2; df 2: P(|T| ≥ t) = 1 − t / √(t² + 2)
    assert t_two_sided_p(2.0, 1) == pytest.approx(1 - 2 / math.pi * math.atan(2.0), abs=1e-12)
    assert t_two_sided_p(1.0, 2) == pytest.approx(1 - 1 / math.sqrt(3), abs=1e-12)
    assert t_two_sided_p(2.0, 3) == pytest.approx(0.139326, abs=1e-6)  # tables: t(3) two-sided at 2.0
    # the 97.5% quantiles of the interval's table give p = 0.05, odd and even degrees of freedom alike
    for df in (4, 7, 10, 29):
        from analysis import t_975

        assert t_two_sided_p(t_975(df), df) == pytest.approx(0.05, abs=2e-5)
    result = paired([11.0, 12.0, 13.0, 14.0, 15.0], [10.0] * 5)  # t = 3 / 0.7071 = 4.2426, df 4
    assert result.p_value == pytest.approx(0.013236, abs=1e-5)
    assert paired([1.0, 1.0], [0.0, 0.0]).p_value == 0.0 and paired([2.0], [1.0]).p_value == 1.0


def test_the_sign_and_wilcoxon_tests_are_exact():
    # five of six lower: 2 · (1 + 6) / 64; Wilcoxon: the one positive difference has rank 1, W+ = 1,
    # and W+ ≤ 1 in 2 of the 64 sign patterns, so 2 · 2/64
    result = paired([-1.5, -2.0, -3.0, -4.0, -5.0, 1.0], [0.0] * 6)
    assert result.sign_p == pytest.approx(14 / 64) and result.wilcoxon_p == pytest.approx(4 / 64)
    # all eight the same way: 2 / 2^8 for both
    all_up = paired([float(i) for i in range(1, 9)], [0.0] * 8)
    assert all_up.sign_p == pytest.approx(2 / 256) and all_up.wilcoxon_p == pytest.approx(2 / 256)
    # zeros are dropped; tied sizes share a rank (1 and −1 get 1.5 each, 2 gets 3): W+ = 1.5 + 3 = 4.5; the
    # 8 sign patterns give W+ 0, 1.5, 1.5, 3, 3, 4.5, 4.5, 6, so P(W+ ≥ 4.5) = 3/8 and p = 2 · 3/8
    tied = paired([1.0, -1.0, 2.0, 0.0], [0.0] * 4)
    assert tied.sign_p == 1.0 and tied.wilcoxon_p == pytest.approx(6 / 8)
    assert paired([0.0, 0.0], [0.0, 0.0]).wilcoxon_p == 1.0 and paired([0.0], [0.0]).sign_p == 1.0


def test_holm_adjusts_step_down_and_keeps_the_order():
    from analysis import holm

    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 → monotone 0.06 for the last
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0]) and holm([]) == [] and holm([0.2]) == [0.2]
