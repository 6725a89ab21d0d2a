"""The thresholds file: calibrated alarm thresholds per group, as JSON (never pickle).

Written by ``jobs.calibrate``, read by ``jobs.score``, ``jobs.audit`` and ``jobs.evaluate``
(``--thresholds``). It holds, for the checkpoint it was calibrated with, one
:class:`~headclip.evaluation.calibration.GroupThreshold` per value of ``group_column`` and a
``default`` one over all good images pooled, used for images without a group value or with one
that was not calibrated. Calibration and scoring read a group value alike
(:func:`group_key`): None, NaN, and empty or blank strings are no value::

    {"format": "headclip.thresholds/1", "checkpoint_id": "<sha256>", "group_column": "line",
     "rule": "quantile", "target_fpr": 0.01, "target_pixel_fpr": 0.001, "confidence": 0.95,
     "default": {"threshold": 0.73, "mask_threshold": 0.61, "good_images": 900, ...},
     "groups": {"line-1": {...}, "line-2": {...}}, "command": "...", "checkpoint": "...",
     "created_at": "...", "reference": {"bank": "bank.safetensors", "fingerprint": "<sha256>", ...}}

``reference`` (absent without one) names the reference bank whose combined scores were
calibrated: the thresholds are refused without that bank, or with another
(:meth:`Thresholds.check_reference`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import ThresholdsError
from ..storage.fs import read_bytes, write_bytes_atomic
from .calibration import RULES, UNGROUPED, GroupThreshold

FORMAT = "headclip.thresholds/1"
_REQUIRED = ("threshold", "mask_threshold", "good_images", "rank", "calibration_fpr", "expected_fpr",
             "fpr_interval", "fpr_bound", "min_good_images", "normal_pixels", "calibration_pixel_fpr", "pixel_bins")


def group_key(value: Any) -> Optional[str]:
    """The group a group-column value names, as calibration and scoring both read it.

    None for no value (None, NaN, a string that is empty or only whitespace):
    such an image counts in the pooled default and is given it. Otherwise
    the value as a string, without surrounding whitespace.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    key = str(value).strip()
    return key or None


@dataclass
class Thresholds:
    """Calibrated thresholds of one checkpoint: per group, and a pooled default."""

    checkpoint_id: str
    default: GroupThreshold
    groups: dict[str, GroupThreshold] = field(default_factory=dict)
    group_column: Optional[str] = None
    rule: str = "quantile"
    target_fpr: float = 0.01
    target_pixel_fpr: float = 0.001
    confidence: float = 0.95
    checkpoint: str = ""  # where the checkpoint was read (credentials removed)
    command: str = ""  # the command that calibrated (secrets removed)
    created_at: str = ""
    reference: Optional[dict] = None  # the bank calibrated with: bank (its URI, redacted), fingerprint, ...

    def for_group(self, value: Any) -> GroupThreshold:
        """The thresholds of a group value (no value, or a value not calibrated: the default)."""
        key = group_key(value)
        return self.default if key is None else self.groups.get(key, self.default)

    def scoring_fields(self) -> dict[str, Any]:
        """The :class:`~headclip.scoring.scorer.ScoringOptions` fields that apply these thresholds."""
        return {"threshold": self.default.threshold, "mask_threshold": self.default.mask_threshold,
                "group_column": self.group_column if self.groups else None,
                "group_thresholds": {name: (g.threshold, g.mask_threshold) for name, g in sorted(self.groups.items())}}

    def check_checkpoint(self, checkpoint_id: str, checkpoint: str = "") -> None:
        """Refuse a checkpoint other than the one calibrated (ThresholdsError, one line)."""
        if checkpoint_id != self.checkpoint_id:
            raise ThresholdsError(
                f"the thresholds were calibrated with checkpoint {self.checkpoint_id[:12]}, not with "
                f"{checkpoint or 'the checkpoint given'} ({checkpoint_id[:12]}); run jobs.calibrate for it")

    def check_reference(self, fingerprint: Optional[str], bank: str = "") -> Optional[str]:
        """Refuse a bank other than the one calibrated with, or none when one was (ThresholdsError, one
        line). ``fingerprint``: :func:`~headclip.reference.fingerprint.bank_fingerprint` of the bank given,
        None without one. Returns a warning when a bank is given to thresholds calibrated without one."""
        if self.reference is None:
            if fingerprint is not None:
                return (f"the thresholds were calibrated on zero-shot scores, but {bank or 'the bank given'} "
                        "combines them with a reference: run jobs.calibrate with this bank (--reference) for "
                        "thresholds of the combined scores")
            return None
        calibrated = f"{self.reference.get('bank', '')} ({str(self.reference['fingerprint'])[:12]})"
        if fingerprint is None:
            raise ThresholdsError(f"the thresholds were calibrated on scores combined with reference bank "
                                  f"{calibrated}: give it with --reference")
        if fingerprint != self.reference["fingerprint"]:
            raise ThresholdsError(f"the thresholds were calibrated with reference bank {calibrated}, not with "
                                  f"{bank or 'the bank given'} ({fingerprint[:12]}); run jobs.calibrate with it")
        return None

    def summary(self) -> str:
        """One line: rule, target and the thresholds per group."""
        parts = [f"{name} {g.threshold:.4g}" for name, g in sorted(self.groups.items())]
        groups = f" by {self.group_column}: {', '.join(parts)}; default {self.default.threshold:.4g}" if parts \
            else f" {self.default.threshold:.4g}"
        return (f"calibrated ({self.rule} rule, target false-alarm rate {self.target_fpr:g}, checkpoint "
                f"{self.checkpoint_id[:12]}): score >{groups}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "checkpoint_id": self.checkpoint_id, "checkpoint": self.checkpoint,
                "group_column": self.group_column, "rule": self.rule, "target_fpr": self.target_fpr,
                "target_pixel_fpr": self.target_pixel_fpr, "confidence": self.confidence,
                "default": self.default.to_dict(),
                "groups": {name: g.to_dict() for name, g in sorted(self.groups.items())},
                "command": self.command, "created_at": self.created_at,
                **({"reference": self.reference} if self.reference is not None else {})}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Any, source: str = "thresholds") -> "Thresholds":
        """Validate and rebuild; any problem is a one-line ThresholdsError naming ``source``."""
        def fail(message: str):
            raise ThresholdsError(f"{source}: {message}")

        if not isinstance(data, dict):
            fail("not a JSON object")
        if data.get("format") != FORMAT:
            fail(f"not a thresholds file (format {data.get('format')!r}, expected {FORMAT!r})")
        checkpoint_id = data.get("checkpoint_id")
        if not isinstance(checkpoint_id, str) or not checkpoint_id:
            fail("no checkpoint_id")
        if data.get("rule") not in RULES:
            fail(f"unknown rule {data.get('rule')!r}")
        for name in ("target_fpr", "target_pixel_fpr", "confidence"):
            _unit(data.get(name), name, fail)
        groups = data.get("groups") or {}
        if not isinstance(groups, dict):
            fail("groups must be an object")
        column = data.get("group_column")
        if groups and not isinstance(column, str):
            fail("groups without a group_column")
        reference = data.get("reference")
        if reference is not None and not (isinstance(reference, dict) and isinstance(reference.get("fingerprint"), str)
                                          and reference["fingerprint"]):
            fail("reference must be an object with the bank's fingerprint")
        return cls(checkpoint_id=checkpoint_id, default=_group(data.get("default"), "default", fail),
                   groups={str(k): _group(v, f"group {k!r}", fail) for k, v in groups.items()
                           if group_key(k) is not None},
                   group_column=column, rule=data["rule"], target_fpr=float(data["target_fpr"]),
                   target_pixel_fpr=float(data["target_pixel_fpr"]), confidence=float(data["confidence"]),
                   checkpoint=str(data.get("checkpoint", "")), command=str(data.get("command", "")),
                   created_at=str(data.get("created_at", "")), reference=reference)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "thresholds") -> "Thresholds":
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as err:
            raise ThresholdsError(f"{source}: not valid JSON: {err}") from None
        except RecursionError:
            raise ThresholdsError(f"{source}: not a thresholds file (JSON nested too deeply)") from None
        return cls.from_dict(data, source)


def _unit(value: Any, name: str, fail) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        fail(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _group(data: Any, what: str, fail) -> GroupThreshold:
    if not isinstance(data, dict):
        fail(f"{what} is missing or not an object")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        fail(f"{what} lacks {missing[0]!r}")
    threshold = data["threshold"]  # scores lie in [0, 1]; the f1 rule may sit just below 0
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1e-6 <= threshold <= 1.0:
        fail(f"{what} threshold must be a score in [0, 1], got {threshold!r}")
    for name in ("mask_threshold", "calibration_fpr", "expected_fpr", "fpr_bound", "calibration_pixel_fpr"):
        _unit(data[name], f"{what} {name}", fail)
    for name in ("good_images", "rank", "min_good_images", "normal_pixels", "pixel_bins"):
        if isinstance(data[name], bool) or not isinstance(data[name], int) or data[name] < 0:
            fail(f"{what} {name} must be a non-negative integer, got {data[name]!r}")
    if data["good_images"] < 1:
        fail(f"{what} has no good images")
    interval = data["fpr_interval"]
    if not isinstance(interval, list) or len(interval) != 2:
        fail(f"{what} fpr_interval must be [low, high]")
    low, high = (_unit(v, f"{what} fpr_interval", fail) for v in interval)
    warnings = data.get("warnings", [])
    if not isinstance(warnings, list):
        fail(f"{what} warnings must be a list")
    defects = data.get("defects")
    if defects is not None and not isinstance(defects, dict):
        fail(f"{what} defects must be an object")
    return GroupThreshold(
        threshold=float(data["threshold"]), mask_threshold=float(data["mask_threshold"]),
        good_images=data["good_images"], rank=data["rank"], calibration_fpr=float(data["calibration_fpr"]),
        expected_fpr=float(data["expected_fpr"]), fpr_interval=(low, high), fpr_bound=float(data["fpr_bound"]),
        min_good_images=data["min_good_images"], normal_pixels=data["normal_pixels"],
        calibration_pixel_fpr=float(data["calibration_pixel_fpr"]), pixel_bins=data["pixel_bins"],
        defects=defects, warnings=[str(w) for w in warnings])


def read_thresholds(uri: str, storage_options: Optional[dict] = None) -> Thresholds:
    """Read and validate a thresholds file (local path or fsspec URL); ThresholdsError on any problem."""
    try:
        data = read_bytes(uri, storage_options)
    except FileNotFoundError:
        raise ThresholdsError(f"thresholds file not found: {uri}") from None
    except (OSError, ValueError) as err:
        raise ThresholdsError(f"cannot read thresholds file {uri}: {' '.join(str(err).split())}") from None
    return Thresholds.from_json(data, uri)


def write_thresholds(thresholds: Thresholds, uri: str, storage_options: Optional[dict] = None) -> None:
    write_bytes_atomic(uri, thresholds.to_json().encode(), storage_options)


def calibrate(good, defects, checkpoint_id: str, group_column: Optional[str] = None, rule: str = "quantile",
              target_fpr: float = 0.01, target_pixel_fpr: float = 0.001, confidence: float = 0.95,
              checkpoint: str = "", command: str = "") -> Thresholds:
    """Thresholds from the merged metric state of good images (and of labelled defects, or None).

    ``good``/``defects``: :class:`~headclip.evaluation.metrics.MetricsByClass` with one class per
    group (see :func:`~headclip.evaluation.calibration.fit_states`); groups are fitted only with a
    ``group_column``, the pooled default always.
    """
    from datetime import datetime, timezone

    from .calibration import fit_states

    default, groups = fit_states(good, defects, grouped=group_column is not None, target_fpr=target_fpr,
                                 target_pixel_fpr=target_pixel_fpr, confidence=confidence, rule=rule)
    return Thresholds(checkpoint_id=checkpoint_id, default=default, groups=groups, group_column=group_column,
                      rule=rule, target_fpr=target_fpr, target_pixel_fpr=target_pixel_fpr, confidence=confidence,
                      checkpoint=checkpoint, command=command,
                      created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
