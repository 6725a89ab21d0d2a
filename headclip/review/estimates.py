"""What a review measures: precision of the flagged images and the defect rate among unflagged ones.

Precision is exact over the flagged images reviewed (a Clopper-Pearson
interval for the flagged set they come from; the top N by score are not a
random sample of it, which the figure says). The unflagged defect rate is the
stratified estimate ``sum_g M_g * d_g / n_g / sum_g M_g`` over the sample's
groups (``M_g`` unflagged images, ``n_g`` sampled and reviewed, ``d_g`` found
defective); its interval combines per-group Clopper-Pearson intervals at
confidence ``1 - (1 - c) / G`` (Bonferroni), so it holds with confidence at
least ``c``. With every flagged image reviewed, the share of defects the model
misses follows: ``missed / (missed + confirmed)``, ``missed = rate * sum_g M_g``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pandas as pd

from ..evaluation.calibration import clopper_pearson
from .selection import Sampling


@dataclass
class Estimate:
    value: float
    low: float
    high: float
    detail: str

    def line(self, name: str, confidence: float, percent: bool = True) -> str:
        if self.value != self.value:
            return f"{name}: n/a ({self.detail})"
        fmt = (lambda v: f"{100 * v:.1f} %") if percent else (lambda v: f"{v:.1f}")
        return (f"{name}: {fmt(self.value)} ({confidence:.0%} interval {fmt(self.low)} to {fmt(self.high)}; "
                f"{self.detail})")


NAN = float("nan")


def flagged_precision(reviewed: pd.DataFrame, sampling: Sampling, confidence: float) -> Estimate:
    """Share of reviewed flagged images that the review confirms (``model_flagged``, ``label`` columns)."""
    flagged = reviewed[reviewed["model_flagged"]]
    n, confirmed = len(flagged), int(flagged["label"].sum())
    if n == 0:
        return Estimate(NAN, NAN, NAN, "no flagged image was reviewed")
    low, high = clopper_pearson(confirmed, n, confidence)
    scope = ("every flagged image of the run" if n == sampling.flagged_images
             else f"{n} of the run's {sampling.flagged_images} flagged images, the highest scores first, not a "
                  "random sample of them")
    return Estimate(confirmed / n, low, high, f"{confirmed} of {n} confirmed; {scope}")


def unflagged_defect_rate(reviewed: pd.DataFrame, sampling: Sampling, confidence: float) -> tuple[Estimate, dict]:
    """The stratified defect rate among the run's unflagged images, and its per-group figures."""
    sample = reviewed[reviewed["in_sample"]]
    groups = {g: spec for g, spec in sampling.groups.items() if spec["drawn"]}
    if sample.empty or not groups:
        return Estimate(NAN, NAN, NAN, "no sampled unflagged image was reviewed"), {}
    level = 1.0 - (1.0 - confidence) / len(groups)
    total = sum(spec["population"] for spec in groups.values())
    value = low = high = 0.0
    per_group = {}
    for name, spec in sorted(groups.items()):
        rows = sample[sample["review_group"] == name]
        n, d = len(rows), int(rows["label"].sum())
        if n == 0:
            return Estimate(NAN, NAN, NAN, f"no sampled image of group {name} was reviewed"), {}
        g_low, g_high = clopper_pearson(d, n, level)
        weight = spec["population"] / total
        value, low, high = value + weight * d / n, low + weight * g_low, high + weight * g_high
        per_group[name] = {"population": spec["population"], "reviewed": n, "defects": d, "rate": d / n,
                           "low": g_low, "high": g_high}
    found = sum(g["defects"] for g in per_group.values())
    reviewed_n = sum(g["reviewed"] for g in per_group.values())
    detail = (f"{found} defects in {reviewed_n} sampled of {total} unflagged images, {len(groups)} group"
              f"{'s' if len(groups) > 1 else ''}")
    return Estimate(value, low, high, detail), per_group


def miss_rate(reviewed: pd.DataFrame, sampling: Sampling, rate: Estimate) -> Optional[Estimate]:
    """Share of the run's defects that were not flagged; None unless every flagged image was reviewed."""
    flagged = reviewed[reviewed["model_flagged"]]
    if len(flagged) != sampling.flagged_images or rate.value != rate.value:
        return None
    confirmed = int(flagged["label"].sum())
    unflagged = sum(spec["population"] for spec in sampling.groups.values() if spec["drawn"])

    def share(r: float) -> float:
        missed = r * unflagged
        return missed / (missed + confirmed) if missed + confirmed else 0.0

    return Estimate(share(rate.value), share(rate.low), share(rate.high),
                    f"estimated {rate.value * unflagged:.1f} missed defects against {confirmed} confirmed flagged")


def summary_lines(reviewed: pd.DataFrame, sampling: Sampling, confidence: float = 0.95) -> list[str]:
    """The review's figures, one line each."""
    lines = [flagged_precision(reviewed, sampling, confidence).line("precision of the flagged images", confidence)]
    rate, per_group = unflagged_defect_rate(reviewed, sampling, confidence)
    lines.append(rate.line("defect rate among unflagged images", confidence))
    for name, g in per_group.items():
        lines.append(f"  {name}: {g['defects']} of {g['reviewed']} sampled ({g['population']} unflagged), "
                     f"{100 * g['rate']:.1f} % ({100 * g['low']:.1f} to {100 * g['high']:.1f} %)")
    missed = miss_rate(reviewed, sampling, rate)
    if missed is not None:
        lines.append(missed.line("share of defects not flagged", confidence))
    elif rate.value == rate.value:
        lines.append("share of defects not flagged: needs every flagged image reviewed (export with --flagged)")
    return lines
