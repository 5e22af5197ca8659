"""The statistics of NTP-vs-NPP comparisons: paired differences over seeds, their intervals, the tables.

Two runs of the same seed share their initial weights and data order, so the difference of a metric
between them removes the seed's own luck; over n seeds the mean difference gets a 95% interval from
Student's t with n − 1 degrees of freedom (the differences assumed roughly normal; with 3–8 seeds a
bootstrap would be less honest, not more), and a sign count says how many seeds went each way.

Each comparison also has its p-values: Student's t (the interval's test), and two that assume no
normality, the exact sign test and the exact Wilcoxon signed-rank test. A page that reports many
comparisons controls its family-wise error with Holm's step-down adjustment (`holm`): only what
survives it is called better or worse.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass

# Student's t, 0.975 quantile, by degrees of freedom (the two-sided 95% interval); beyond 30 the
# Cornish-Fisher expansion around the normal quantile is exact to 1e-4.
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t_975(df: int) -> float:
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| ≥ |t|) for Student's t with a whole number of degrees of freedom, in closed form (Abramowitz
    and Stegun 26.7.3–4: a finite series in θ = atan(t / √df)), so no special-function library is needed."""
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/π)(θ + sin θ cos θ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + …)), df − 3 terms after the 1
        term, series = 1.0, 1.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            series += term
        inside = (2 / math.pi) * (theta + (math.sin(theta) * math.cos(theta) * series if df > 1 else 0.0))
    else:  # even: sin θ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + …)
        term, series = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            series += term
        inside = math.sin(theta) * series
    return min(1.0, max(0.0, 1.0 - inside))


def sign_test_p(diffs: tuple[float, ...]) -> float:
    """The exact two-sided sign test: how likely a split at least this uneven is when either sign has
    probability ½ (zero differences dropped)."""
    below, above = sum(d < 0 for d in diffs), sum(d > 0 for d in diffs)
    n = below + above
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(below, above) + 1)) / 2**n
    return min(1.0, 2 * tail)


def wilcoxon_p(diffs: tuple[float, ...]) -> float:
    """The exact two-sided Wilcoxon signed-rank test (zero differences dropped, tied sizes given their
    mean rank): every one of the 2^n sign patterns of the ranks is equally likely under no effect."""
    nonzero = [d for d in diffs if d != 0]
    n = len(nonzero)
    if n == 0:
        return 1.0
    order = sorted(range(n), key=lambda i: abs(nonzero[i]))
    ranks = [0.0] * n
    start = 0
    while start < n:  # equal sizes share the mean of the ranks they span
        end = start
        while end + 1 < n and abs(nonzero[order[end + 1]]) == abs(nonzero[order[start]]):
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    observed = sum(r for r, d in zip(ranks, nonzero) if d > 0)
    sums = [sum(r for r, positive in zip(ranks, signs) if positive)
            for signs in itertools.product((False, True), repeat=n)]
    low = sum(w <= observed + 1e-9 for w in sums) / len(sums)
    high = sum(w >= observed - 1e-9 for w in sums) / len(sums)
    return min(1.0, 2 * min(low, high))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment: the i-th smallest of m p-values times (m − i + 1), made monotone and
    capped at 1. An adjusted p below 0.05 keeps the chance of any false claim in the family under 5%."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


@dataclass(frozen=True)
class Paired:
    """Per-seed differences (run − its baseline) and what they say together."""

    diffs: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs)

    @property
    def half_width(self) -> float:
        """Half the 95% t-interval of the mean; infinite with one seed."""
        if self.n < 2:
            return math.inf
        return t_975(self.n - 1) * statistics.stdev(self.diffs) / math.sqrt(self.n)

    @property
    def interval(self) -> tuple[float, float]:
        return self.mean - self.half_width, self.mean + self.half_width

    @property
    def below(self) -> int:
        """Seeds with a negative difference (for FID: the run was better)."""
        return sum(d < 0 for d in self.diffs)

    @property
    def above(self) -> int:
        return sum(d > 0 for d in self.diffs)

    @property
    def p_value(self) -> float:
        """Student's t test of a zero mean difference, two-sided (the interval's own test); 1 with one seed."""
        if self.n < 2:
            return 1.0
        sd = statistics.stdev(self.diffs)
        if sd == 0:
            return 0.0 if self.mean else 1.0
        return t_two_sided_p(self.mean / (sd / math.sqrt(self.n)), self.n - 1)

    @property
    def sign_p(self) -> float:
        return sign_test_p(self.diffs)

    @property
    def wilcoxon_p(self) -> float:
        return wilcoxon_p(self.diffs)

    def excludes_zero(self) -> bool:
        low, high = self.interval
        return low > 0 or high < 0

    def verdict(self, lower_is_better: bool = True) -> str:
        """What the interval says: better, worse, or not significant at 95%."""
        if not self.excludes_zero():
            return "not significant"
        return "better" if (self.mean < 0) == lower_is_better else "worse"

    def shown(self, digits: int = 3) -> str:
        """'-15.4 [-36.1, 5.3], 6 of 8 lower' (one seed: the value alone)."""
        if self.n < 2:
            return f"{self.mean:.{digits}g} (1 seed)"
        low, high = self.interval
        return (f"{self.mean:+.{digits}g} [{low:+.{digits}g}, {high:+.{digits}g}], "
                f"{self.below} of {self.n} lower")

    def to_dict(self) -> dict:
        low, high = self.interval
        return {"diffs": list(self.diffs), "n": self.n, "mean": self.mean, "ci95": [low, high],
                "seeds_lower": self.below, "seeds_higher": self.above, "interval": "Student's t, 95%, two-sided",
                "p": self.p_value, "p_sign_test": self.sign_p, "p_wilcoxon": self.wilcoxon_p}


def paired(runs: list[float], baselines: list[float]) -> Paired:
    """The paired differences of a metric, run − baseline, seed by seed (the lists in seed order)."""
    if len(runs) != len(baselines):
        raise ValueError(f"{len(runs)} runs against {len(baselines)} baselines: pair them seed by seed")
    return Paired(tuple(r - b for r, b in zip(runs, baselines)))


def relative(runs: list[float], baselines: list[float]) -> Paired:
    """Paired differences as a fraction of the baseline's value (FID gains across model sizes)."""
    return Paired(tuple((r - b) / b for r, b in zip(runs, baselines)))


def spread(values: list[float]) -> str:
    """'mean ± standard deviation' over seeds (the value alone for one)."""
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.fmean(values):.3g} ± {statistics.stdev(values):.2g}"


@dataclass(frozen=True)
class Trend:
    """A least-squares line through (x, y) points, its slope's 95% Student-t interval (n − 2 degrees of
    freedom): does y move with x, and how sure is that."""

    xs: tuple[float, ...]
    ys: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.xs)

    @property
    def slope(self) -> float:
        mx, my = statistics.fmean(self.xs), statistics.fmean(self.ys)
        return sum((x - mx) * (y - my) for x, y in zip(self.xs, self.ys)) / self._sxx

    @property
    def _sxx(self) -> float:
        mx = statistics.fmean(self.xs)
        return sum((x - mx) ** 2 for x in self.xs)

    @property
    def interval(self) -> tuple[float, float]:
        if self.n < 3:
            return -math.inf, math.inf
        mx, my = statistics.fmean(self.xs), statistics.fmean(self.ys)
        residual = sum((y - my - self.slope * (x - mx)) ** 2 for x, y in zip(self.xs, self.ys))
        half = t_975(self.n - 2) * math.sqrt(residual / (self.n - 2) / self._sxx)
        return self.slope - half, self.slope + half

    def to_dict(self) -> dict:
        return {"points": self.n, "slope": self.slope, "ci95": list(self.interval),
                "interval": "Student's t, 95%, two-sided, n − 2 degrees of freedom"}


def trend(xs: list[float], ys: list[float]) -> Trend:
    """The line through every seed's point (not through the means, which would hide the seeds' spread)."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError(f"a trend needs as many x as y values ({len(xs)}, {len(ys)}) and two distinct x values")
    return Trend(tuple(xs), tuple(ys))
