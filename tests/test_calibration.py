"""Calibrated thresholds: the order-statistic statistics against independent references, the
thresholds file, per-row thresholds in the scorer, and secrets kept out of the recorded command."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import optimize, stats
from sklearn.metrics import precision_recall_curve

from headclip.errors import ThresholdsError
from headclip.evaluation import calibration as cal
from headclip.evaluation.metrics import MetricsByClass, ranking_metrics, score_bins
from headclip.evaluation.thresholds import Thresholds, calibrate
from headclip.reporting.groups import Grouping
from headclip.reporting.html import threshold_figure
from headclip.scoring.runner import JobConfig
from headclip.scoring.scorer import ScoringOptions
from jobs.cli import redacted_command

ONE_BIN = np.r_[1000, np.zeros(9, np.int64)]  # a normal-pixel histogram for tests about image thresholds


def _invert_binomial(n: int, k: int, q: float) -> float:
    """p with P(FPR <= p) = P(Binomial(n, 1 - p) <= k - 1) = q, by root finding on the binomial cdf."""
    return optimize.brentq(lambda p: stats.binom.cdf(k - 1, n, 1.0 - p) - q, 0.0, 1.0, xtol=1e-14)


@pytest.mark.parametrize("n,k,confidence", [(20, 19, 0.95), (100, 99, 0.9), (299, 299, 0.95), (1000, 990, 0.99),
                                            (7, 1, 0.8)])
def test_fpr_interval_matches_binomial_inversion(n, k, confidence):
    low, high = cal.fpr_interval(n, k, confidence)
    assert low == pytest.approx(_invert_binomial(n, k, (1 - confidence) / 2), abs=1e-9)
    assert high == pytest.approx(_invert_binomial(n, k, (1 + confidence) / 2), abs=1e-9)
    assert cal.fpr_upper_bound(n, k, confidence) == pytest.approx(_invert_binomial(n, k, confidence), abs=1e-9)


@pytest.mark.parametrize("n,k,m", [(20, 19, 20), (60, 55, 40), (10, 10, 100)])
def test_held_out_interval_matches_exact_counting(n, k, m):
    """Of n + m exchangeable scores, j of the m new ones lie above the k-th smallest of the n old ones
    with probability C(n - k + j, j) C(k - 1 + m - j, m - j) / C(n + m, m) (ranks counted directly)."""
    pmf = [Fraction(math.comb(n - k + j, j) * math.comb(k - 1 + m - j, m - j), math.comb(n + m, m))
           for j in range(m + 1)]
    assert sum(pmf) == 1
    cdf = np.cumsum([float(p) for p in pmf])
    for confidence in (0.8, 0.95):
        expected = (int(np.searchsorted(cdf, (1 - confidence) / 2 - 1e-12)),
                    int(np.searchsorted(cdf, (1 + confidence) / 2 - 1e-12)))
        assert cal.held_out_interval(n, k, m, confidence) == expected


def test_held_out_counting_by_simulation():
    rng = np.random.default_rng(3)
    n, k, m = 30, 28, 30
    counts = []
    for _ in range(4000):
        scores = rng.random(n + m)
        threshold = np.sort(scores[:n])[k - 1]
        counts.append(int((scores[n:] > threshold).sum()))
    low, high = cal.held_out_interval(n, k, m, 0.9)
    inside = np.mean([(low <= c <= high) for c in counts])
    assert 0.9 <= inside <= 0.97
    assert np.mean(counts) / m == pytest.approx((n - k + 1) / (n + 1), abs=0.01)


def test_ranks_and_the_smallest_sample():
    for n in (1, 9, 10, 50, 99, 100, 1000):
        for target in (0.01, 0.05, 0.1):
            k = cal.quantile_rank(n, target)
            if (n + 1) * target >= 1:  # the smallest rank whose expected FPR is at most the target
                assert (n - k + 1) / (n + 1) <= target + 1e-12
                assert k == 1 or (n - k + 2) / (n + 1) > target
            else:
                assert k == n
            k = cal.bound_rank(n, target, 0.95)
            reached = stats.beta.cdf(target, n - k + 1, k) >= 0.95
            assert reached == (n >= cal.min_good_images(target, 0.95))
            if reached and k > 1:
                assert stats.beta.cdf(target, n - k + 2, k - 1) < 0.95
    assert cal.min_good_images(0.01, 0.95) == 299 and cal.min_good_images(0.05, 0.95) == 59
    for target, conf in ((0.01, 0.95), (0.05, 0.9), (0.001, 0.99)):
        n = cal.min_good_images(target, conf)
        assert 1 - (1 - target) ** n >= conf > 1 - (1 - target) ** (n - 1)


def _draw(rng, n):
    """Good-image scores from a skewed two-part distribution, with its exact survival function."""
    mix = rng.random(n) < 0.3
    return np.where(mix, rng.beta(8, 2, n), rng.beta(2, 5, n))


def _survival(t):
    return 0.3 * stats.beta.sf(t, 8, 2) + 0.7 * stats.beta.sf(t, 2, 5)


@pytest.mark.parametrize("rule", ["quantile", "bound"])
def test_realised_fpr_covered_over_seeds(rule):
    """Fit on n scores, then the true FPR (exact survival function) lies in the stated interval as
    often as claimed, and on a held-out half of the same size the false alarms stay in theirs."""
    n, target, confidence = 400, 0.02, 0.9
    inside, held, realised = [], [], []
    for seed in range(300):
        rng = np.random.default_rng(seed)
        fit = cal.fit_group(_draw(rng, n), ONE_BIN, target, 0.01, confidence, rule)
        fpr = _survival(fit.threshold)
        realised.append(fpr)
        inside.append(fit.fpr_interval[0] <= fpr <= fit.fpr_interval[1])
        low, high = cal.held_out_interval(n, fit.rank, n, confidence)
        held.append(low <= int((_draw(rng, n) > fit.threshold).sum()) <= high)
    # 300 seeds: a 90% interval covers 270 +- 5.2 times
    assert 0.85 <= np.mean(inside) <= 0.95, np.mean(inside)
    assert np.mean(held) >= 0.86, np.mean(held)
    if rule == "quantile":
        assert np.mean(realised) == pytest.approx((n - fit.rank + 1) / (n + 1), abs=0.002)
        assert np.mean(realised) <= target + 0.002
    else:
        assert np.mean(np.array(realised) <= target) >= 0.9 - 0.05


def test_groups_with_different_scores_get_their_own_thresholds():
    rng = np.random.default_rng(0)
    good, defects = MetricsByClass(100), MetricsByClass(100)
    low, high = rng.beta(2, 8, 300), rng.beta(8, 2, 200)
    good.update("line-1", low, np.zeros(300))
    good.update("line-2", high, np.zeros(200))
    good["line-1"].pixel_neg[:20] = 1000
    good["line-2"].pixel_neg[50:] = 10
    defects.update("line-1", rng.beta(5, 3, 40), np.ones(40))
    result = calibrate(good, defects, "c" * 64, "line", target_fpr=0.05, target_pixel_fpr=0.01)
    one, two = result.groups["line-1"], result.groups["line-2"]
    assert one.threshold == np.sort(low)[cal.quantile_rank(300, 0.05) - 1]
    assert two.threshold == np.sort(high)[cal.quantile_rank(200, 0.05) - 1]
    pooled = np.sort(np.concatenate([low, high]))
    assert result.default.threshold == pooled[cal.quantile_rank(500, 0.05) - 1]
    assert one.threshold < two.threshold and len({one.threshold, two.threshold, result.default.threshold}) == 3
    assert one.mask_threshold < two.mask_threshold
    assert one.defects["detected"] == int((defects["line-1"].image_scores > one.threshold).sum())
    assert two.defects is None and result.default.defects["images"] == 40


def test_too_small_samples_warn():
    rng = np.random.default_rng(1)
    tiny = cal.fit_group(rng.random(50), ONE_BIN, 0.01, 0.01)
    assert tiny.rank == 50 and tiny.expected_fpr == pytest.approx(1 / 51)
    assert any("cannot set a threshold at a false-alarm rate of 0.01" in w and "needs at least 99" in w
               for w in tiny.warnings), tiny.warnings
    assert any("cannot show a false-alarm rate below 0.01" in w and "needs 299" in w for w in tiny.warnings)
    middle = cal.fit_group(rng.random(150), ONE_BIN, 0.01, 0.01)
    assert len(middle.warnings) == 1 and "needs 299" in middle.warnings[0]
    assert cal.fit_group(rng.random(299), ONE_BIN, 0.01, 0.01).warnings == []
    assert cal.fit_group(rng.random(299), ONE_BIN, 0.01, 0.01, rule="bound").rank == 299


def test_f1_rule_matches_scikit_learn():
    rng = np.random.default_rng(2)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        scores = np.round(np.concatenate([rng.beta(2, 5, 300), rng.beta(4, 2, 60)]), 2)  # with ties
        labels = np.r_[np.zeros(300), np.ones(60)]
        threshold, f1 = cal.f1_threshold(scores, labels)
        precision, recall, cuts = precision_recall_curve(labels, scores)
        f1s = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                        where=precision + recall > 0)
        best = int(np.argmax(f1s[:-1]))
        assert f1 == pytest.approx(f1s[best]) == pytest.approx(ranking_metrics(scores, labels)["f1_max"])
        assert np.array_equal(scores > threshold, scores >= cuts[best])
        fit = cal.fit_group(scores[:300], ONE_BIN, 0.05, 0.01, rule="f1", defect_scores=scores[300:])
        assert fit.threshold == threshold and fit.defects["f1"] == pytest.approx(f1)
        assert any("optimistic" in w for w in fit.warnings)
    with pytest.raises(ValueError, match="needs labelled defects"):
        cal.fit_group(scores[:300], ONE_BIN, 0.05, 0.01, rule="f1")


def test_pixel_threshold_against_raw_pixels():
    rng = np.random.default_rng(4)
    pixels = np.clip(rng.normal(0.4, 0.12, 200_000), 0, 1)
    bins = 1000
    hist = np.bincount(score_bins(pixels, bins), minlength=bins)
    for target in (0.0, 0.001, 0.01, 0.2, 1.0):
        threshold, above = cal.pixel_threshold(hist, target)
        b = round(threshold * bins)
        expected = next(c for c in range(bins + 1) if hist[c:].sum() <= target * hist.sum())  # a plain loop
        assert b == expected and above == hist[b:].sum()
        assert np.mean(pixels > threshold) <= target
        if b > 0:  # one bin lower would exceed the target
            assert hist[b - 1:].sum() > target * hist.sum()


def test_detection_interval_is_clopper_pearson():
    for k, n in ((0, 10), (3, 10), (10, 10), (17, 40)):
        reference = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
        assert cal.clopper_pearson(k, n, 0.95) == pytest.approx((reference.low, reference.high), abs=1e-9)


def _thresholds() -> Thresholds:
    good = MetricsByClass(50)
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        good.update(name, rng.random(120), np.zeros(120))
        good[name].pixel_neg += rng.integers(0, 100, 50)
    return calibrate(good, None, "ab" * 32, "line", target_fpr=0.05, command="python -m jobs.calibrate ...")


def test_thresholds_file_round_trip_and_refusals():
    thresholds = _thresholds()
    text = thresholds.to_json()
    again = Thresholds.from_json(text, "t.json")
    assert again == thresholds and again.to_json() == text
    assert again.for_group("a") == thresholds.groups["a"] and again.for_group("zzz") == thresholds.default
    assert again.for_group(None) == thresholds.default
    fields = again.scoring_fields()
    assert fields["group_column"] == "line" and fields["threshold"] == thresholds.default.threshold
    assert fields["group_thresholds"]["b"] == (thresholds.groups["b"].threshold, thresholds.groups["b"].mask_threshold)
    again.check_checkpoint("ab" * 32)
    with pytest.raises(ThresholdsError, match="calibrated with checkpoint ababababab"):
        again.check_checkpoint("ff" * 32, "other.safetensors")
    data = json.loads(text)
    broken = [
        ("{", "not valid JSON"),
        (json.dumps({**data, "format": "x"}), "not a thresholds file"),
        (json.dumps({**data, "groups": {"a": {**data["groups"]["a"], "threshold": 1.5}}}), "threshold must be"),
        (json.dumps({**data, "default": {k: v for k, v in data["default"].items() if k != "rank"}}), "lacks 'rank'"),
        (json.dumps({**data, "rule": "magic"}), "unknown rule"),
        (json.dumps({**data, "group_column": None}), "groups without a group_column"),
    ]
    for bad, message in broken:
        with pytest.raises(ThresholdsError, match=message) as info:
            Thresholds.from_json(bad, "t.json")
        assert "\n" not in str(info.value) and str(info.value).startswith("t.json: ")


def test_scoring_options_pick_each_rows_thresholds():
    options = ScoringOptions(threshold=0.5, mask_threshold=0.4, group_column="camera",
                             group_thresholds={"1": (0.7, 0.6), "b": (0.2, 0.1)})
    assert options.thresholds_for({"camera": 1}) == (0.7, 0.6)
    assert options.thresholds_for({"camera": "b"}) == (0.2, 0.1)
    assert options.thresholds_for({"camera": "c"}) == (0.5, 0.4)
    assert options.thresholds_for({"camera": None}) == (0.5, 0.4) == options.thresholds_for({})
    plain = JobConfig(input="x", output="y")
    calibrated = JobConfig(input="x", output="y", scoring=options)
    assert "group_thresholds" not in plain.row_settings()  # runs without them keep their ids
    assert calibrated.row_settings()["group_thresholds"] == {"1": [0.7, 0.6], "b": [0.2, 0.1]}


def test_scorer_applies_each_groups_thresholds(tiny_checkpoint, tmp_path):
    from headclip.scoring.scorer import ImageScorer

    from .scoring_helpers import write_images

    paths = write_images(tmp_path, 6)
    table = pa.table({"image_id": [p.name for p in paths], "image_uri": [str(p) for p in paths],
                      "line": ["all", "none", "other"] * 2})
    options = ScoringOptions(threshold=0.5, mask_threshold=0.5, batch_size=4, io_threads=2, group_column="line",
                             group_thresholds={"all": (0.0, 0.0), "none": (1.0, 1.0)})
    with ImageScorer("r", tiny_checkpoint, options, extra_fields=[pa.field("line", pa.string())]) as scorer:
        rows = scorer.score_table(table).to_pandas()
    assert (rows["status"] == "ok").all()
    for line, (threshold, mask_threshold) in {"all": (0.0, 0.0), "none": (1.0, 1.0), "other": (0.5, 0.5)}.items():
        part = rows[rows["line"] == line]
        assert (part["threshold"] == threshold).all() and (part["mask_threshold"] == mask_threshold).all()
        assert (part["is_anomalous"] == (part["score"] > threshold)).all()
    assert rows[rows["line"] == "all"]["is_anomalous"].all()
    everything = rows[rows["line"] == "all"]
    assert (everything["mask_area"] == everything["width"] * everything["height"]).all()
    assert (rows[rows["line"] == "none"]["mask_area"] == 0).all() and not rows[rows["line"] == "none"]["is_anomalous"].any()


def test_recorded_command_hides_secrets():
    command = redacted_command("python -m jobs.calibrate", [
        "--input", "s3://AKIA123:s3cr3t@bucket/good/", "--storage-options", '{"key": "AKIA", "secret": "x"}',
        "--aws-secret-access-key=hunter2", "--api-token", "tok123",
        "--checkpoint", "https://host/m.safetensors?X-Amz-Signature=abc123&X-Amz-Credential=cred&v=1",
        "--group-column", "line"])
    for secret in ("AKIA", "s3cr3t", "hunter2", "tok123", "abc123", "cred"):
        assert secret not in command
    assert "--group-column line" in command and "bucket/good/" in command and "v=1" in command
    assert command.count("***") == 7  # user-info, two storage options, two flags, two query values


def test_report_line_names_the_thresholds():
    one = pd.DataFrame({"threshold": [0.5, 0.5], "mask_threshold": [0.5, 0.5], "is_anomalous": [True, False]})
    assert threshold_figure(Grouping.of(one)) == "image score > 0.5, mask pixels > 0.5"
    many = pd.DataFrame({"threshold": [0.61, 0.61, 0.734], "mask_threshold": [0.4, 0.4, 0.52],
                         "is_anomalous": [True, False, True], "line": ["a", "a", "b"]})
    assert threshold_figure(Grouping.of(many, "line")).replace("\u00a0", " ") == (
        "2 groups by line (image score / mask pixels): a > 0.61 / > 0.4; b > 0.734 / > 0.52")
    assert threshold_figure(Grouping.of(many)).replace("\u00a0", " ") == (
        "2 groups by threshold pair (image score / mask pixels): > 0.61 / > 0.4; > 0.734 / > 0.52")
