"""Known-good images' map-layer patch features on Ray, gathered per group into a BankBuilder.

The scoring job's stages, read top to bottom::

    from_arrow(listing, one block per shard)  image rows, each with its row number and patch cap
      -> map_batches(decode_images)           CPU tasks, any node: read, decode, resize (headclip.ray)
      -> map_batches(PatchFeatures)           actor pool pinning GPUs: the model once per actor
      -> the driver                           one row per image: row number, error, features

:class:`PatchFeatures` is :class:`~headclip.ray.HeadCLIPScorer`'s model stage
returning, instead of result rows, each image's patch features of the bank's
layers as a float32 Arrow tensor column ``(patches, layers * embed_dim)``. An
unreadable image is a row with its error and no features.

:func:`collect_features` is the same model step in this process (a loaded
:class:`~headclip.scoring.scorer.ImageScorer`, no Ray), for a bank built
where the model already is.

Pre-selection, to bound what travels: a group whose images hold more patches
than ``PRESELECT_FACTOR`` x budget has each image beyond its first
``SCALE_IMAGES`` (which set the group's distance scale, and travel whole) send
at most ``ceil(PRESELECT_FACTOR x budget / images of the group)`` patches,
chosen in the image by the bank's own method (greedy k-centre or random, seeded
by the bank's seed plus the image's row number). Groups below that send every
patch, and their bank is the one every patch gives.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from ..ray import DECODED_COLUMNS, IMAGE_COLUMNS, HeadCLIPScorer, _arrow, _identified, _numpy, _table, decode_images
from .build import SCALE_IMAGES, BankBuilder, BankSettings
from .coreset import subsample

log = logging.getLogger(__name__)

PRESELECT_FACTOR = 4  # a group sends at most this many times its budget (besides its first SCALE_IMAGES images)
ROW, CAP = "_row", "_cap"  # the row's number in the listing; patches it may send (0: all)
FEATURES, ERROR = "features", "error"


def patch_caps(groups: Sequence, budget: int, patches_per_image: Optional[int] = None,
               factor: int = PRESELECT_FACTOR) -> list[int]:
    """Per image (in listing order, ``groups`` its group values): how many of its patches travel, 0 for all.

    A group of n images gets a cap of ``ceil(factor * budget / n)`` on its images after its first
    :data:`SCALE_IMAGES`; 0 (all) where that cap is not below ``patches_per_image`` (when known).
    """
    sizes: dict = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    seen: dict = {}
    caps = []
    for g in groups:
        seen[g] = seen.get(g, 0) + 1
        cap = max(1, math.ceil(factor * budget / sizes[g]))
        whole = seen[g] <= SCALE_IMAGES or (patches_per_image is not None and cap >= patches_per_image)
        caps.append(0 if whole else cap)
    return caps


class PatchFeatures(HeadCLIPScorer):
    """Model stage: image rows (decoded by :func:`~headclip.ray.decode_images`, or read here) -> one row per
    image: ``_row``, ``error`` (None when scored) and ``features`` (k, len(layers) * embed_dim) float32.

    ``layers``: the bank's map layers (block numbers); ``method``/``seed``: how an image whose ``_cap``
    is below its patch count picks that many (:func:`~headclip.reference.coreset.subsample`);
    ``input_size``: the side images are read and batched at (the bank's reference size; None: the model's).
    """

    def __init__(self, checkpoint: Optional[str] = None, *, layers: Sequence[int], method: str = "greedy",
                 seed: int = 0, input_size: Optional[int] = None, **kwargs):
        super().__init__(checkpoint, **kwargs)
        if input_size:
            self.scorer.read_at(input_size)
        map_layers = tuple(self.scorer.model.vision.map_layers)
        self.index = [map_layers.index(l) for l in layers]
        self.method, self.seed = method, seed

    def __call__(self, batch) -> pa.Table:
        table = _identified(_table(batch))
        consumed = [c for c in (*DECODED_COLUMNS, *IMAGE_COLUMNS) if c in table.column_names]
        records = table.drop_columns(consumed).to_pylist()
        loaded = self._loaded(table, records)
        features, errors = patch_features(self.scorer, records, loaded, self.index, [r.get(CAP) for r in records],
                                          self.method, self.seed, [int(r[ROW]) for r in records])
        width = next((f.shape[1] for f in features if f is not None), 0)
        empty = np.zeros((0, width), np.float32)
        arrays = [empty if f is None else f for f in features]
        if len({a.shape for a in arrays}) == 1:
            stacked = np.stack(arrays)
        else:  # images that sent fewer patches, or none: one array per row
            stacked = np.empty(len(arrays), dtype=object)
            stacked[:] = arrays
        return pa.table({ROW: pa.array([int(r[ROW]) for r in records], pa.int64()),
                         ERROR: pa.array(errors, pa.string()), FEATURES: _arrow(stacked)})


def patch_features(scorer, records: list[dict], loaded, index: Sequence[int], caps: Optional[Sequence] = None,
                   method: str = "greedy", seed: int = 0, rows: Optional[Sequence[int]] = None
                   ) -> tuple[list[Optional[np.ndarray]], list[Optional[str]]]:
    """Each record's patch features (N or cap, len(index) * embed_dim) float32 of the map layers at positions
    ``index``, or its error: read and decoded by ``scorer`` (an :class:`~headclip.scoring.scorer.ImageScorer`)
    unless ``loaded`` (their LoadedImages) is given, batched by its feeder at the side it reads at
    (:meth:`~headclip.scoring.scorer.ImageScorer.read_at`), run by its model's ``patch_features``. An image whose
    cap (``caps``, None or 0: all) is below its patch count keeps ``subsample(features, cap, method, seed + row)``,
    ``row`` its number in ``rows`` (so random picks differ between images and not between runs)."""
    if loaded is None:
        loaded = scorer.loader.iterate(records)
    errors: list[Optional[str]] = [None] * len(records)
    features: list[Optional[np.ndarray]] = [None] * len(records)
    pending: list[tuple[int, object]] = []

    def flush() -> None:
        pixels, failed = scorer.feeder.batch([image for _, image in pending])
        good = []
        for (i, _), error in zip(pending, failed):
            if error is None:
                good.append(i)
            else:
                errors[i] = error
        pending.clear()
        if good:
            chosen = scorer.model.patch_features(pixels)[:, :, list(index)].flatten(2).to("cpu").float()
            for i, image in zip(good, chosen):
                cap = int((caps[i] if caps is not None else 0) or 0)
                if 0 < cap < image.shape[0]:
                    image = image[subsample(image, cap, method, seed + (rows[i] if rows is not None else i))]
                features[i] = image.numpy()

    for i, image in enumerate(loaded):
        if image.error is not None:
            errors[i] = image.error
            continue
        pending.append((i, image))
        if len(pending) == scorer.options.batch_size:
            flush()
    if pending:
        flush()
    return features, errors


def collect_features(scorer, records: list[dict], builder: BankBuilder, group_column: Optional[str] = None
                     ) -> tuple[int, list[tuple[str, str]]]:
    """In this process: ``records``' patch features (:func:`patch_features`, every patch, every map layer)
    into ``builder`` under their ``group_column`` values. Returns (images added, [(image_id, error)])."""
    import torch

    layers = len(scorer.model.vision.map_layers)
    features, errors = patch_features(scorer, records, None, range(layers))
    added = 0
    for record, array in zip(records, features):
        if array is not None:
            builder.add(torch.from_numpy(array).reshape(1, array.shape[0], layers, -1),
                        [record.get(group_column) if group_column else None])
            added += 1
    failed = [(str(r.get("image_id")), e) for r, e in zip(records, errors) if e is not None]
    for image_id, error in failed[:5]:
        log.warning("known-good image %s left out: %s", image_id, error)
    return added, failed


@dataclass
class Collected:
    """What the actors sent back: features (k_i, layers * embed_dim) float32 per scored row, and the
    unreadable rows' errors."""

    features: dict[int, np.ndarray] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    sent_bytes: int = 0
    seconds: float = 0.0


def collect_on_ray(listing: pa.Table, config, image_size: int, layers: Sequence[int], settings: BankSettings,
                     caps: Sequence[int]) -> Collected:
    """Run ``listing`` (image_uri, image_id, extras) through the decode stage and a pool of
    :class:`PatchFeatures` actors sized from ``config`` (a :class:`~headclip.scoring.config.JobConfig`:
    checkpoint, shard size, actors, GPUs, scoring options); ``image_size``: the side the images are
    resized to (the bank's reference size); ``caps``: per row, see :func:`patch_caps`. Ray must be running."""
    import ray
    from ray.data import DataContext

    from ..scoring.pipeline import _one_line, actor_size
    from ..scoring.placement import check_placement, describe_need, pool_bounds, wait_for_stage_nodes

    n, shard = listing.num_rows, config.shard_size
    rows = listing.append_column(ROW, pa.array(np.arange(n), pa.int64())).append_column(
        CAP, pa.array(list(caps), pa.int64()))
    blocks = max(1, math.ceil(n / shard))
    size = actor_size(config, blocks)
    check_placement(size.cpus, size.gpus, size.resources, config.placement_timeout)
    wait_for_stage_nodes(config)
    low, high = pool_bounds(config, size, blocks)
    DataContext.get_current().wait_for_min_actors_s = max(1, int(config.placement_timeout))
    log.info("%d known-good images in %d blocks; feature actors of %s, %d to %d of them", n, blocks,
             describe_need(size.need()), low, high)
    stage = dict(num_cpus=config.stage_cpus, resources=dict(config.stage_resources) or None, batch_format="pyarrow")
    threads = config.scoring.io_threads or max(4, 4 * int(max(1.0, config.stage_cpus)))
    actor = dict(checkpoint=config.checkpoint_uri, layers=tuple(layers), method=settings.coreset, seed=settings.seed,
                 input_size=image_size, options=replace(config.scoring, reference=None, reference_size=None),
                 storage_options=config.storage_options,
                 run_id="reference", model_overrides=config.model_overrides, torch_threads=max(1, int(size.cpus)))
    ds = ray.data.from_arrow([rows.slice(i, shard) for i in range(0, n, shard)])
    ds = ds.map_batches(decode_images, fn_args=(image_size, config.scoring, config.storage_options, threads),
                        batch_size=shard, **stage)
    ds = ds.map_batches(PatchFeatures, fn_constructor_kwargs=actor, batch_size=shard,
                        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
                        num_cpus=size.cpus, num_gpus=size.gpus or None, resources=dict(size.resources) or None,
                        batch_format="pyarrow")
    out, started = Collected(), time.monotonic()
    batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    try:
        for batch in batches:
            out.sent_bytes += batch.nbytes
            arrays = _numpy(batch[FEATURES])
            for row, error, array in zip(batch[ROW].to_pylist(), batch[ERROR].to_pylist(), arrays):
                if error is not None:
                    out.errors[row] = error
                else:
                    out.features[row] = np.array(array, np.float32)  # a writable copy of the block's
    except Exception as err:  # noqa: BLE001 - a step failed for good: one line
        raise _one_line(err, size, config, time.monotonic() - started) from None
    finally:
        close = getattr(batches, "close", None)
        if close is not None:  # the executor stops now, so its last log lines come before the job's own
            close()
    out.seconds = time.monotonic() - started
    return out


def add_collected(builder: BankBuilder, collected: Collected, groups: Sequence, layers: Sequence[int]) -> int:
    """Add each scored row's features to ``builder`` in listing order (``groups``: each row's group value,
    None pooled); ``builder`` takes the bank's ``layers`` as its map layers. Returns the rows added."""
    import torch

    for row in sorted(collected.features):
        array = collected.features[row]
        builder.add(torch.from_numpy(array).reshape(1, array.shape[0], len(layers), -1), [groups[row]])
    return len(collected.features)


def bank_layers(checkpoint, settings: BankSettings) -> tuple[int, ...]:
    """The bank's layers for a checkpoint (:class:`~headclip.model.checkpoint.Checkpoint`) and settings;
    ValueError (one line) for layers that are not map layers of the model. Needs no model."""
    map_layers = checkpoint.config.map_layers
    if not map_layers:
        raise ValueError("the checkpoint does not record its map layers: save it again with this version")
    return BankBuilder(map_layers, settings).layers


def build_bank(listing: pa.Table, groups: Sequence, config, settings: BankSettings,
               group_column: Optional[str] = None, command: str = ""):
    """(bank, :class:`Collected`) of the known-good images of ``listing`` (``groups``: each row's group
    value, None for one pooled bank), their features collected on Ray (:func:`collect_on_ray`).
    ValueError when no image could be read."""
    from ..model.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(config.checkpoint_uri, config.storage_options)
    model_config = checkpoint.config.replace(**config.model_overrides) if config.model_overrides else checkpoint.config
    layers = bank_layers(checkpoint, settings)
    side = settings.input_size or model_config.image_size
    collected = collect_on_ray(listing, config, side, layers, settings, patch_caps(groups, settings.budget))
    for row, error in sorted(collected.errors.items())[:5]:
        log.warning("known-good image %s left out: %s", listing["image_id"][row].as_py(), error)
    if not collected.features:
        raise ValueError(f"none of the {listing.num_rows} known-good images could be read")
    builder = BankBuilder(layers, replace(settings, layers=None))  # the features hold the bank's layers only
    add_collected(builder, collected, groups, layers)
    width = next(iter(collected.features.values())).shape[1]
    bank = builder.build(checkpoint.checkpoint_id, model_config.backbone, model_config.image_size,
                         width // len(layers), group_column, command, reference_size=side)
    return bank, collected
