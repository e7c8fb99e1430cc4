"""The elbow test finds a planted elbow and reports none on power laws or steepening curves."""
import numpy as np
import pytest

from sparsekit.analysis.elbow import find_elbow, log_slopes


def rng():
    return np.random.default_rng(np.random.SeedSequence().entropy)


def test_elbow_found_where_a_broken_power_law_flattens():
    r = rng()
    for _ in range(20):
        x = 2.0 ** np.arange(9)
        knee = int(r.integers(2, 7))
        steep, flat = r.uniform(-2.5, -1.0), r.uniform(-0.3, 0.0)
        log_y = np.where(np.arange(9) <= knee, steep * np.log(x), steep * np.log(x[knee]) + flat * np.log(x / x[knee]))
        result = find_elbow(x, np.exp(log_y + r.normal(0, 0.01, 9)))
        assert result["elbow"] and result["at"] == x[knee], (knee, steep, flat, result)
        assert result["testable"] and result["points"] == 9


def test_no_elbow_on_a_noisy_power_law_or_a_steepening_curve():
    r = rng()
    for _ in range(20):
        # geometric spacing, as in the scans: 1% noise moves a slope change by ~0.06 (one sd); threshold 0.5
        x = r.uniform(1, 20) * np.cumprod(r.uniform(1.5, 4, 8))
        power_law = 0.7 * x ** r.uniform(-2.0, -0.2) * np.exp(r.normal(0, 0.01, 8))
        assert not find_elbow(x, power_law)["elbow"]
        steepening = np.exp(-x / 1000)  # slope on log-log axes gets ever steeper
        assert not find_elbow(x, steepening)["elbow"]


def test_elbow_needs_three_distinct_points_and_averages_repeats():
    result = find_elbow([1, 2], [0.5, 0.25])
    assert not result["elbow"] and not result["testable"] and result["slope_changes"] == []
    xs, ys, slopes = log_slopes([4, 1, 4, 2], [0.1, 1.0, 0.4, 0.5])
    assert xs.tolist() == [1, 2, 4] and ys[2] == pytest.approx(0.2)
    assert slopes[0] == pytest.approx(-1.0)


@pytest.mark.parametrize("x, y, kwargs, message", [
    ([1, 2, 3], [1, 0, 2], {}, "y must hold positive"),
    ([1, -2, 3], [1, 1, 2], {}, "x must hold positive"),
    ([1, 2, 3], [1, 2], {}, "x has 3 points but y has 2"),
    ([2, 2, 2], [1, 2, 3], {}, "at least 2 distinct"),
    ([1, 2, 3], [3, 2, 1], {"min_slope_change": 0}, "min_slope_change"),
    ([1, 2, 3], [3, 2, 1], {"flatten_ratio": 1.5}, "flatten_ratio"),
])
def test_elbow_bad_input_names_the_argument(x, y, kwargs, message):
    with pytest.raises(ValueError, match=message):
        find_elbow(x, y, **kwargs)
