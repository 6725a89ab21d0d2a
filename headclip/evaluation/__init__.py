"""Detection metrics: image and pixel AUROC, AP, F1-max, AUPRO, mAD; mergeable per-class state.

``ranking`` (exact and histogram metrics with error bounds), ``metrics``
(per-class state that shards merge), ``aupro`` (per-region overlap),
``calibration`` (alarm thresholds from known-good images, exact intervals) and
``thresholds`` (the thresholds file).
"""
