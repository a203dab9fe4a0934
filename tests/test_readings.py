"""The debate's reading rules (pipeline.readings) on known inputs: each reading where its
numbers show it, and never a side for a recipe that did not produce the phenomenon."""

import math

import pytest

from pipeline import readings as R


def S(mean, lo, hi, n=3):
    return {"mean": mean, "lo": lo, "hi": hi, "n": n}


NONE = S(50.0, float("nan"), float("nan"), 1)


def test_a_set_reads_features_only_above_chance_and_every_control():
    xy = S(41.0, 38.5, 43.5)
    assert R.read_set("det", xy, 10.0, {"leak-det": S(35.0, 33.0, 37.0), "clean-det": S(20.0, 18.0, 22.0)})[0] \
        == R.FEATURES
    assert R.read_set("det", xy, 10.0)[0] == R.FEATURES  # no control in the run: said in the why
    assert "no control" in R.read_set("det", xy, 10.0)[1]
    # one control's difference reaches 0: neither, naming it
    reading, why = R.read_set("det", xy, 10.0, {"leak-det": S(35.0, 33.0, 37.0), "clean-det": S(2.0, -1.0, 5.0)})
    assert reading == R.NEITHER and "clean-det" in why and "leak-det" not in why
    assert R.read_set("rand", S(14.5, 8.1, 20.8), 10.0)[0] == R.NEITHER  # contains chance
    assert R.read_set("rand", NONE, 10.0)[0] == R.NEITHER  # no interval: nothing decided


def test_a_set_that_learned_the_relabelling_is_inconclusive_never_bugs():
    # the old debate's base recipe: det below chance with (X, Y+1) high; other below chance
    assert R.read_set("det", S(6.0, 5.7, 6.3), 10.0, xy1=S(63.2, 62.0, 64.0))[0] == R.WEAK
    assert R.read_set("other", S(4.4, 4.3, 4.5), 10.0)[0] == R.WEAK
    # at chance with (X, Y+1) learned: inconclusive; at chance without: neither
    assert R.read_set("det", S(10.0, 8.0, 12.0), 10.0, xy1=S(50.0, 48.0, 52.0))[0] == R.WEAK
    assert R.read_set("det", S(10.0, 8.0, 12.0), 10.0, xy1=S(10.0, 8.0, 12.0))[0] == R.NEITHER
    # above chance with (X, Y+1) also learned: the controls decide
    assert R.read_set("det", S(22.6, 21.0, 24.0), 10.0, {"clean-det": S(10.0, 8.0, 12.0)}, S(41.8, 40.0, 43.0))[0] \
        == R.FEATURES
    for xy in (S(6.0, 5.7, 6.3), S(10.0, 8.0, 12.0), S(4.4, 4.3, 4.5)):
        assert R.read_set("det", xy, 10.0, xy1=S(60.0, 58.0, 62.0))[0] not in R.SIDES


def test_errors_never_counts_for_a_side():
    assert R.read_errors(S(58.0, 57.2, 58.8), 10.0)[0] == R.NEITHER
    assert R.read_errors(S(9.0, 7.0, 11.0), 10.0)[0] == R.WEAK


def test_bugs_only_needs_the_same_attacks_det_to_teach():
    det = S(31.6, 30.0, 33.0)
    assert R.read_bugs_only(S(8.3, 5.1, 11.5), S(56.9, 50.0, 60.0), det, 10.0)[0] == R.BUGS
    assert R.read_bugs_only(S(8.3, 5.1, 11.5), S(56.9, 50.0, 60.0), S(9.0, 8.0, 10.5), 10.0)[0] == R.WEAK
    assert R.read_bugs_only(S(30.0, 28.0, 32.0), S(20.0, 18.0, 22.0), det, 10.0)[0] == R.NEITHER
    assert R.read_bugs_only(S(8.3, 5.1, 11.5), S(9.0, 7.0, 11.0), det, 10.0)[0] == R.NEITHER  # nothing learned


def test_a_trend_needs_its_slope_interval_over_sources():
    assert R.slope([0, 0.25, 0.5], [30.0, 36.0, 42.0]) == pytest.approx(24.0)
    assert R.read_trend(S(24.0, 20.0, 28.0), True, "det")[0] == R.FEATURES
    assert R.read_trend(S(-24.0, -28.0, -20.0), True, "det")[0] == R.FEATURES  # a falling trend is a trend
    one = R.read_trend(S(24.0, float("nan"), float("nan"), 1), True, "det")  # one source seed
    assert one[0] == R.NEITHER and "no interval over sources" in one[1]
    assert R.read_trend(S(3.0, -5.0, 11.0), True, "det")[0] == R.NEITHER  # no trend
    assert R.read_trend(S(24.0, 20.0, 28.0), False, "det")[0] == R.NEITHER  # a point at chance


def test_a_correlation_needs_five_architectures_and_its_interval_above_zero():
    lo, hi = R.correlation_interval(0.9, 7)  # Fisher z: tanh(atanh(0.9) +- 1.96 / 2)
    assert (lo, hi) == pytest.approx((math.tanh(math.atanh(0.9) - 0.979982), math.tanh(math.atanh(0.9) + 0.979982)))
    assert R.read_correlation(0.9, 7)[0] == R.FEATURES
    assert R.read_correlation(1.0, 3)[0] == R.NEITHER  # the committed r = 1.00 over 3 architectures
    assert R.correlation_interval(0.999, 4)[0] > 0.9 and R.read_correlation(0.999, 4)[0] == R.NEITHER  # 4 < 5
    assert R.read_correlation(0.5, 6)[0] == R.NEITHER  # interval reaches 0
    assert math.isnan(R.correlation_interval(0.9, 3)[0])


def test_robustness_of_d_r_must_beat_standard_training_too():
    dr = S(21.6, 21.3, 21.9, 2)
    assert R.read_robust_gain(dr, {"D_NR": S(5.3, 4.0, 6.5, 2)})[0] == R.FEATURES
    # the committed table: the standard source is more robust (28.9) than D_R's students
    reading, why = R.read_robust_gain(dr, {"D_NR": S(5.3, 4.0, 6.5, 2), "source": S(28.9, float("nan"), float("nan"), 1)})
    assert reading == R.NEITHER and "source" in why


def test_a_poison_reads_features_only_when_it_poisons_and_teaches_the_shift():
    drop, shifted = S(-40.0, -45.0, -35.0), S(30.0, 25.0, 35.0)
    assert R.read_poison(drop, shifted, 10.0)[0] == R.FEATURES
    assert R.read_poison(drop, S(10.5, 9.0, 12.0), 10.0)[0] == R.NEITHER  # a fall without the shifted mapping
    assert R.read_poison(S(-2.0, -5.0, 1.0), shifted, 10.0)[0] == R.WEAK  # did not poison: inconclusive, no side
    assert R.read_poison(S(3.0, 1.0, 5.0), shifted, 10.0)[0] == R.WEAK
    assert R.read_poison(drop, shifted, 10.0, fowl=False)[0] == R.NEITHER  # not Fowl's recipe: no side
    assert R.read_poison(S(-40.0, math.nan, math.nan, 1), shifted, 10.0)[0] == R.NEITHER  # no interval
    assert "did not poison" in R.read_poison(S(-2.0, -5.0, 1.0), shifted, 10.0)[1]


def test_a_spectrum_reads_only_fooling_matched_and_beside_its_probe():
    up = S(24.0, 20.0, 28.0)
    assert R.read_spectrum(up, True, "det", matched=True, probe_rise=2.0)[0] == R.FEATURES
    assert R.read_spectrum(up, True, "det", matched=False, probe_rise=2.0)[0] == R.WEAK  # not matched: no reading
    reading, why = R.read_spectrum(up, True, "det", matched=True, probe_rise=R.PROBE_RISE + 5)
    assert reading == R.NEITHER and "probe" in why  # robust features would give the trend too
    assert R.read_spectrum(up, True, "det", matched=True, probe_rise=None)[0] == R.FEATURES  # no probe in the run
    assert R.read_spectrum(S(3.0, -5.0, 11.0), True, "det", matched=True, probe_rise=0.0)[0] == R.NEITHER
    # a trend with a point whose interval reaches chance: neither, and the probe's reason still said
    reading, why = R.read_spectrum(up, False, "det", matched=True, probe_rise=R.PROBE_RISE + 5,
                                   at_chance="source eps 0.1 [9.0, 53.7]")
    assert reading == R.NEITHER and "probe" in why and "source eps 0.1 [9.0, 53.7]" in why
    assert "probe" not in R.read_spectrum(S(3.0, -5.0, 11.0), True, "det", matched=True,
                                          probe_rise=R.PROBE_RISE + 5)[1]  # no trend: nothing to explain
