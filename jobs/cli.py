"""What the entry points share: one-line argument errors, flag groups, planning and Ray start-up.

No job imports another job; what two jobs need lives here.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
from typing import Callable, Optional, Sequence

from headclip.errors import UsageError

from .flags import (  # noqa: F401 - the jobs import the flag types from here
    storage_options_arg, Number, MAX_COUNT, MAX_SECONDS, MAX_DAYS, MAX_BINS, positive_int, top_int, side_int,
    batch_int, layer_int, non_negative_int, seed_int, days_int, bins_int, positive_float, non_negative_float,
    seconds_float, cpus_float, unit_float, open_unit_float, rate_float, resources_arg)

EXIT_FAILED = 1  # a run that could not finish (JobError)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")

    def parse_args(self, args=None, namespace=None):
        """Parse, naming an unknown flag first (argparse names a missing required one before it)."""
        args = sys.argv[1:] if args is None else list(args)
        required = [a for a in self._actions if a.required] + [g for g in self._mutually_exclusive_groups
                                                                 if g.required]
        for item in required:
            item.required = False
        try:
            _, unknown = super().parse_known_args(args, argparse.Namespace())
        finally:
            for item in required:
                item.required = True
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return super().parse_args(args, namespace)


def pool_settings(args) -> dict:
    """The JobConfig fields of the flags of :func:`add_cluster_flags` that size the actor pool."""
    if args.max_actors is not None and args.max_actors < args.min_actors:
        raise UsageError(f"--max-actors {args.max_actors} is below --min-actors {args.min_actors}")
    return dict(actors=args.actors, min_actors=args.min_actors, max_actors=args.max_actors,
                actor_resources=args.actor_resources or {}, gpus_per_actor=args.gpus_per_actor,
                stage_cpus=args.stage_cpus, stage_resources=args.stage_resources or {},
                shards_per_actor=args.shards_per_actor)


class Removed(argparse.Action):
    """A flag that went: using it is a one-line error naming what replaced it."""

    def __init__(self, option_strings, dest, replaced_by: str = "", **kwargs):
        kwargs.update(nargs="?", help=argparse.SUPPRESS, default=None)
        super().__init__(option_strings, dest, **kwargs)
        self.replaced_by = replaced_by

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was removed: {self.replaced_by}")


REMOVED_FLAGS = {
    "--engine": "every job runs on Ray Data's streaming executor; there is no other engine",
    "--cpu-stages": "images are always read and decoded, and shards published, by Ray Data tasks on any node with "
                    "--stage-cpus/--stage-resources free (CPU-only nodes too), and the actors only run the model; "
                    "--device-decode decodes JPEGs in the actor instead",
}


def add_storage_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-options", type=storage_options_arg, default=None,
                   help="fsspec options as JSON, e.g. '{\"client_kwargs\": {\"endpoint_url\": \"http://minio:9000\"}}'")


def add_cluster_flags(p: argparse.ArgumentParser, batch_size: int = 16, shard_size: int = 256) -> None:
    """Flags of every job that scores on the actor pool, plus --storage-options and --ray-address."""
    p.add_argument("--batch-size", type=batch_int, default=batch_size,
                   help=f"images per forward call (default: {batch_size})")
    p.add_argument("--shard-size", type=positive_int, default=shard_size,
                   help=f"images per shard and output file (default: {shard_size})")
    p.add_argument("--actors", type=positive_int, default=None,
                   help="a fixed number of scoring actors (default: the pool follows the cluster, between "
                        "--min-actors and --max-actors)")
    p.add_argument("--min-actors", type=positive_int, default=1,
                   help="scoring actors to keep even before the cluster can hold them (default 1); pending ones "
                        "are resource demand that an autoscaler acts on")
    p.add_argument("--max-actors", type=positive_int, default=None,
                   help="the most scoring actors (default: as many as the live nodes hold, or the autoscaler's "
                        "node types can hold; a node that joins mid-run gets one)")
    p.add_argument("--actor-resources", type=resources_arg, default=None,
                   help="custom Ray resources each actor reserves, as JSON, e.g. '{\"accelerator_type:A10G\": "
                        "0.001}' to pin actors to a node type")
    p.add_argument("--gpus-per-actor", type=non_negative_float, default=None,
                   help="GPUs each actor reserves (default: 1 if the cluster has GPUs, else CPU actors); "
                        "a value given is requested even before an autoscaler adds GPU nodes; fractions share a GPU")
    p.add_argument("--stage-cpus", type=cpus_float, default=1.0,
                   help="CPUs each read/decode or publish task reserves (default 1); these tasks run on any node "
                        "with them free, CPU-only nodes too, while the actors run only the model")
    p.add_argument("--stage-resources", type=resources_arg, default=None,
                   help="custom Ray resources each read/decode or publish task reserves, as JSON, e.g. "
                        "'{\"cpu_stage\": 0.01}' to keep them on the nodes that offer it")
    p.add_argument("--shards-per-actor", type=positive_int, default=2,
                   help="shards queued on each scoring actor, so that its model never waits for the next (default 2)")
    for flag, replaced_by in REMOVED_FLAGS.items():
        p.add_argument(flag, action=Removed, replaced_by=replaced_by)
    add_storage_flag(p)
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join: host:port, or 'auto' for the one `ray start` runs on this machine "
                        "(default: RAY_ADDRESS, else a private local Ray is started, even if one is running)")
    p.add_argument("--placement-timeout", type=seconds_float, default=300.0,
                   help="seconds to wait for a node that can hold a scoring actor before giving up (default 300)")


def add_scoring_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``jobs.score`` (input, output, checkpoint, row shaping, cluster)."""
    from headclip.data.decode import IMAGE_EXTENSIONS

    p.add_argument("--input", required=True,
                   help="prefix, glob or manifest (CSV/Parquet with image_uri) on any fsspec filesystem")
    p.add_argument("--output", required=True, help="where results go (local path, file:// or s3://)")
    p.add_argument("--checkpoint", default=None, help="HeadCLIP checkpoint (default: the packaged demo model)")
    p.add_argument("--run-id", default=None,
                   help="run id (default: derived from input, listing, checkpoint and settings, so a rerun resumes)")
    p.add_argument("--cpus-per-actor", type=cpus_float, default=None, help="CPUs each actor reserves")
    p.add_argument("--threshold", type=unit_float, default=None, help="image label: score > threshold (default 0.5)")
    p.add_argument("--mask-threshold", type=unit_float, default=None,
                   help="mask pixels: anomaly map > this (default 0.5)")
    add_thresholds_flags(p)
    p.add_argument("--mask-max-side", type=side_int, default=2048,
                   help="masks of larger images are stored scaled to this long side (default 2048)")
    p.add_argument("--max-pixels", type=positive_int, default=None,
                   help="images with more pixels are refused as decompression bombs")
    p.add_argument("--limit", type=positive_int, default=None, help="score only the first N images of the listing")
    p.add_argument("--extensions", default=",".join(IMAGE_EXTENSIONS),
                   help="comma-separated file extensions to take (default: %(default)s)")
    p.add_argument("--device", default="auto", help="torch device in each actor (default: cuda if available)")
    p.add_argument("--no-reduced-decode", dest="reduced_decode", action="store_false",
                   help="decode every JPEG at full size (default: JPEGs at least twice the model's input on both "
                        "sides decode at a reduced DCT scale, still at least the input size)")
    p.add_argument("--device-decode", action="store_true",
                   help="decode JPEGs on the model's device (nvjpeg on a GPU); images it cannot decode are "
                        "decoded on the host")
    p.add_argument("--precision", choices=("auto", "bf16"), default="auto",
                   help="vision tower precision: auto (fp32 weights, bf16 autocast on a GPU) or bf16 (bf16 weights)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward in each actor (compile time is logged; eager if it fails)")
    p.add_argument("--progress-interval", type=seconds_float, default=5.0, help="seconds between progress lines (images counted as forward batches finish)")
    p.add_argument("--read-timeout", type=seconds_float, default=300.0,
                   help="seconds one image may take to read before it becomes an error row (default 300)")
    add_cluster_flags(p)


def job_config(args):
    """The scoring job's config from the flags of :func:`add_scoring_flags`."""
    from headclip.scoring.runner import JobConfig
    from headclip.scoring.scorer import ScoringOptions

    scoring = ScoringOptions(threshold=_or_default(args.threshold), mask_threshold=_or_default(args.mask_threshold),
                             mask_max_side=args.mask_max_side, batch_size=args.batch_size, device=args.device,
                             reduced_decode=args.reduced_decode, device_decode=args.device_decode,
                             read_timeout=args.read_timeout, precision=args.precision, compile=args.compile)
    if args.max_pixels:
        scoring.max_pixels = args.max_pixels
    extensions = tuple(e.strip() for e in args.extensions.split(",") if e.strip())
    if not extensions:
        raise UsageError("--extensions is empty")
    return JobConfig(input=args.input, output=args.output, checkpoint=args.checkpoint, run_id=args.run_id,
                     shard_size=args.shard_size, **pool_settings(args),
                     cpus_per_actor=args.cpus_per_actor, limit=args.limit, extensions=extensions,
                     storage_options=args.storage_options, scoring=scoring,
                     progress_interval=args.progress_interval, placement_timeout=args.placement_timeout)


def check_storage_options(options: Optional[dict], *uris: Optional[str]) -> None:
    """Refuse ``--storage-options`` that the filesystem of any of ``uris`` cannot take, in one line."""
    if not options:
        return
    from headclip.storage.fs import filesystem

    for uri in filter(None, uris):
        try:
            fs, _ = filesystem(uri, options)
            connect = getattr(fs, "connect", None)  # s3fs builds its client from the options here
            if callable(connect):
                connect()
        except (TypeError, AttributeError, ValueError, KeyError) as err:
            raise UsageError(f"--storage-options do not suit {uri.split('://')[0] if '://' in uri else 'local'} "
                             f"storage: {type(err).__name__}: {' '.join(str(err).split())[:200]}") from None


def _or_default(value: Optional[float], default: float = 0.5) -> float:
    return default if value is None else value


def prepare_or_exit(config, images=None):
    """Plan the run; every input or output problem becomes a UsageError (one line, exit 2)."""
    from headclip.errors import InputError, OutputError
    from headclip.scoring.runner import prepare

    check_storage_options(config.storage_options, config.input, config.output, config.checkpoint)
    try:
        return prepare(config, images)
    except (InputError, OutputError) as err:
        raise UsageError(str(err)) from None


def init_ray(address: Optional[str]) -> None:
    """Join ``address`` (or RAY_ADDRESS), else start a private local Ray; nothing if Ray is up.

    Without an address Ray's own default would join a cluster that ``ray start``
    runs on this machine; ``address="local"`` starts a fresh one instead.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True)


def add_dataset_flags(p: argparse.ArgumentParser, split_help: str) -> None:
    """--data, --layout, --split and --classes of the jobs that read a labelled data set."""
    p.add_argument("--data", required=True, help="labelled data set root or manifest (local or s3://)")
    p.add_argument("--layout", default="auto", help="mvtec, visa, meta, manifest or auto (default)")
    p.add_argument("--split", default="test", help=split_help)
    p.add_argument("--classes", default=None, help="comma-separated classes to use (default: all)")


def load_dataset_arg(args):
    """The data set the flags of :func:`add_dataset_flags` name; errors become one line."""
    from headclip.data.datasets import DatasetError, load_dataset

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    check_storage_options(args.storage_options, args.data)
    try:
        return load_dataset(args.data, args.layout, args.split, classes, args.storage_options)
    except DatasetError as err:
        raise UsageError(str(err)) from None


def read_run_arg(args):
    """The rows of the run ``--run`` names, as pandas; a missing run becomes one line."""
    from headclip import results

    check_storage_options(args.storage_options, args.run)
    try:
        return results.read_run(args.run, args.storage_options)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None


def run(main: Callable[[Optional[Sequence[str]]], int], prog: str, argv: Optional[Sequence[str]] = None) -> None:
    """Run ``main`` and exit with its code.

    Bad input is one line and exit 2; a run that cannot finish, one line and
    exit 1; Ctrl-C, one line and exit 130. Printed lines, log lines and
    tracebacks hold no credentials (:mod:`headclip.redact`, by shape and by
    the values the command line gave).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from headclip.errors import HeadCLIPError, JobError
    from headclip.redact import RedactingFilter, redact_text, redacting_excepthook, remember_secrets

    remember_secrets(sys.argv[1:] if argv is None else list(argv))
    for handler in logging.getLogger().handlers:  # log lines of every library, third parties' included
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    sys.excepthook = redacting_excepthook  # a traceback, if one escapes, holds no secret either

    def say(message: str) -> None:
        print(f"{prog}: {redact_text(' '.join(message.split()))}", file=sys.stderr)

    try:
        code = main(argv)
    except KeyboardInterrupt:
        _quiet_ray_console()  # Ray Data's threads report the executor they lose as Ray stops
        _stop_ray()
        say("interrupted; run the same command to resume")
        code = EXIT_INTERRUPTED
    except JobError as err:
        _stop_ray()  # the workers' last log lines are printed before the error, not after it
        _quiet_ray_console()
        say(f"error: {err}")
        code = EXIT_FAILED
    except (HeadCLIPError, FileNotFoundError, PermissionError) as err:
        say(f"error: {err}")
        code = EXIT_USAGE
    sys.exit(code)


def _stop_ray() -> None:
    """Shut a Ray this process started or joined down (a failed run has nothing left to do with it).

    Ray Data's scheduling threads and iterators can outlive the run for a moment (its executor waits 2 s
    for its thread; iterators stop when collected). Once Ray is down, a Ray call of theirs would start a
    new local Ray (Ray's auto-init, with its start-up lines), and their destructors raise. Neither is
    kept: auto-init is off for the rest of this process, and exceptions that Ray's destructors raise are
    dropped (any other is reported as before).
    """
    global _UNRAISABLE
    ray = sys.modules.get("ray")
    if ray is None:
        return
    hook = sys.modules.get("ray._private.auto_init_hook")
    if hook is not None and hasattr(hook, "enable_auto_connect"):
        hook.enable_auto_connect = False  # read on every call; RAY_ENABLE_AUTO_CONNECT only at import
    if sys.unraisablehook is not _drop_ray_unraisable:
        _UNRAISABLE, sys.unraisablehook = sys.unraisablehook, _drop_ray_unraisable
    if ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - the run has failed already; say why, not this
            pass


_UNRAISABLE = sys.unraisablehook


def _drop_ray_unraisable(unraisable) -> None:
    """``sys.unraisablehook`` once Ray is stopped: drop an exception raised in Ray's code where nothing can
    catch it (a destructor of Ray Data's iterators or executor); report any other as before."""
    owner = unraisable.object
    modules = [getattr(owner, "__module__", None) or type(owner).__module__]
    if unraisable.exc_traceback is not None:  # the frame it was raised from: the destructor, or a generator's
        modules.append(unraisable.exc_traceback.tb_frame.f_globals.get("__name__"))
    if any(m and (m == "ray" or m.startswith("ray.")) for m in modules):
        return
    _UNRAISABLE(unraisable)


def _quiet_ray_console() -> None:
    """From now on, Ray's loggers print nothing (their files under the session's logs still get it all).

    A run that ends early ends with its own line, last: what Ray Data's threads log as the driver stops
    Ray (metric updates that fail, with stack traces) is about Ray's own teardown.
    """
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if (name == "ray" or name.startswith("ray.")) and isinstance(logger, logging.Logger):
            for handler in logger.handlers:
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                    handler.addFilter(_drop_record)


def _drop_record(record: logging.LogRecord) -> bool:
    return False


# -- calibrated thresholds and secrets ---------------------------------------------------

log = logging.getLogger("jobs.cli")


def redacted_command(prog: str, argv: Sequence[str]) -> str:
    """``prog`` and its arguments as recorded: every secret hidden by :func:`headclip.redact.redact_command`."""
    from headclip.redact import redact_command

    return " ".join([prog, shlex.join(redact_command(argv))]).strip()


def add_thresholds_flags(p: argparse.ArgumentParser) -> None:
    """--thresholds (a file from jobs.calibrate) and --threshold-group."""
    p.add_argument("--thresholds", default=None,
                   help="calibrated thresholds from jobs.calibrate (JSON, local or s3://): each image gets its "
                        "group's image and mask thresholds (group column as calibrated, else the pooled default); "
                        "must come from the same checkpoint; instead of --threshold/--mask-threshold")
    p.add_argument("--threshold-group", default=None,
                   help="with --thresholds: give every image this group's thresholds (e.g. the line an audit covers)")


def load_thresholds_arg(args, checkpoint_uri: str):
    """The thresholds file of --thresholds, checked against the checkpoint; None without one.

    Every problem (unreadable file, another checkpoint, an unknown --threshold-group, a
    --threshold given too) is a UsageError: one line, exit 2, before Ray starts.
    """
    if not getattr(args, "thresholds", None):
        if getattr(args, "threshold_group", None):
            raise UsageError("--threshold-group needs --thresholds")
        return None
    for flag in ("threshold", "mask_threshold"):
        if getattr(args, flag, None) is not None:
            raise UsageError(f"give --{flag.replace('_', '-')} or --thresholds, not both")
    from headclip.errors import ThresholdsError
    from headclip.evaluation.thresholds import read_thresholds
    from headclip.model.checkpoint import read_checkpoint
    from headclip.redact import redact_text

    try:
        thresholds = read_thresholds(args.thresholds, args.storage_options)
        thresholds.check_checkpoint(read_checkpoint(checkpoint_uri, args.storage_options).checkpoint_id,
                                    redact_text(checkpoint_uri))
    except ThresholdsError as err:
        raise UsageError(str(err)) from None
    check_thresholds_bank(thresholds, getattr(args, "reference", None), args.storage_options)
    group = getattr(args, "threshold_group", None)
    if group is not None:
        if group not in thresholds.groups:
            raise UsageError(f"--threshold-group {group!r} is not in {args.thresholds} "
                             f"(groups: {', '.join(sorted(thresholds.groups)) or 'none'})")
        thresholds = dataclasses.replace(thresholds, default=thresholds.groups[group], groups={})
    return thresholds


def apply_thresholds(config, thresholds) -> None:
    """Give ``config`` (a JobConfig) the thresholds' per-group values; nothing for None."""
    if thresholds is not None:
        config.scoring = dataclasses.replace(config.scoring, **thresholds.scoring_fields())


def warn_uncalibrated(plan, thresholds, storage_options=None) -> None:
    """Log the images of ``plan`` (read piece by piece) that will get the pooled default threshold."""
    if thresholds is None or not thresholds.groups:
        return
    column = thresholds.group_column
    if column not in plan.schema.names:
        log.warning("the input has no %r column: every image gets the default threshold %.4g (all groups pooled)",
                    column, thresholds.default.threshold)
        return
    from headclip.evaluation.thresholds import group_key

    counts: dict = {}
    for table in plan.iter_images(storage_options, [column]):
        for value in table[column].to_pylist():
            key = group_key(value)  # as the scoring actors read it
            if key not in thresholds.groups:
                counts[key] = counts.get(key, 0) + 1
    missing = counts.pop(None, 0)
    if missing:
        log.warning("%d images have no %s value (empty, blank or missing): they get the default threshold %.4g (all "
                    "groups pooled), which their rows' threshold column shows", missing, column,
                    thresholds.default.threshold)
    if counts:
        other = sorted(counts)
        log.warning("%d images of %s %s were not calibrated: they get the default threshold %.4g (all groups "
                    "pooled), which their rows' threshold column shows", sum(counts.values()), column,
                    ", ".join(other[:5]) + (" ..." if len(other) > 5 else ""), thresholds.default.threshold)


def add_reference_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", default=None,
                   help="a reference bank from jobs.reference (safetensors, local or s3://): each image is also "
                        "compared with its group's known-good patches and its score, map and mask combine both "
                        "(rows keep zero_shot_score and reference_score); must come from the same checkpoint")


def check_thresholds_bank(thresholds, reference: Optional[str], storage_options: Optional[dict]) -> None:
    """Refuse thresholds calibrated with a reference bank when ``reference`` is not that bank (one line,
    before Ray starts); warn when a bank is given to thresholds calibrated without one."""
    from headclip.errors import ThresholdsError
    from headclip.redact import redact_text
    from headclip.reference.bank import BankError
    from headclip.reference.fingerprint import bank_fingerprint

    fingerprint = None
    if reference and thresholds.reference is not None:
        try:
            fingerprint = bank_fingerprint(read_bank_once(reference, storage_options))
        except BankError as err:
            raise UsageError(str(err)) from None
    elif reference:
        fingerprint = "given"  # any bank: only its presence matters for thresholds calibrated without one
    try:
        warning = thresholds.check_reference(fingerprint, redact_text(reference or ""))
    except ThresholdsError as err:
        raise UsageError(str(err)) from None
    if warning:
        log.warning("%s", warning)


_BANK_READ: dict = {}


def read_bank_once(uri: str, storage_options: Optional[dict]):
    """read_bank, the last bank kept: the thresholds check and --reference read a bank once between them."""
    import json

    from headclip.reference.bank import read_bank

    key = (uri, json.dumps(storage_options, sort_keys=True, default=str))
    if key not in _BANK_READ:
        _BANK_READ.clear()
        _BANK_READ[key] = read_bank(uri, storage_options)
    return _BANK_READ[key]


def add_bank_flags(p: argparse.ArgumentParser) -> None:
    """--budget, --coreset, --layers, --aggregate and --reference-size: how a reference bank is built
    (jobs.reference and jobs.calibrate --build-reference)."""
    from headclip.reference.build import BankSettings
    from headclip.reference.coreset import METHODS

    defaults = BankSettings()
    p.add_argument("--budget", type=positive_int, default=defaults.budget,
                   help="bank patches kept per group (default: %(default)s)")
    p.add_argument("--coreset", choices=METHODS, default=defaults.coreset,
                   help="how bank patches are kept: greedy k-centre (PatchCore) or random (default: %(default)s)")
    p.add_argument("--layers", type=layers_arg, default=None,
                   help="comma-separated map layers (block numbers) whose features the bank uses (default: all)")
    p.add_argument("--aggregate", choices=("max", "top1"), default=defaults.aggregate,
                   help="image reference score: the largest patch value or the mean of the top 1%% "
                        "(default: %(default)s)")
    p.add_argument("--reference-size", type=side_int, default=defaults.input_size, metavar="PIXELS",
                   help="side the known-good and scored images are resized to for the bank's features; a side "
                        "other than the model's costs a second forward per image when scoring "
                        "(default: the model's input size)")


def bank_settings(args):
    """The :class:`~headclip.reference.build.BankSettings` of :func:`add_bank_flags`' flags."""
    from headclip.reference.build import BankSettings

    return BankSettings(budget=args.budget, coreset=args.coreset, layers=args.layers, aggregate=args.aggregate,
                        input_size=args.reference_size)


def check_bank_settings(checkpoint, settings, overrides: Optional[dict] = None) -> Optional[int]:
    """UsageError (one line) unless a bank of ``settings`` can be built with ``checkpoint`` (its layers
    are map layers; its reference size fits the backbone's patches). Returns the reference size where it
    differs from the model's input size (the decode stage then sends that side too), else None."""
    from headclip.errors import CheckpointError
    from headclip.model.validate import check_checkpoint
    from headclip.reference.collect import bank_layers

    try:
        bank_layers(checkpoint, settings)
        size = (overrides or {}).get("image_size", checkpoint.config.image_size)
        side = settings.input_size
        if side is None or side == size:
            return None
        check_checkpoint(checkpoint, {**(overrides or {}), "image_size": side})
    except CheckpointError as err:
        raise UsageError(f"--reference-size {side}: {str(err).split(': ', 1)[-1]}") from None
    except ValueError as err:
        raise UsageError(str(err)) from None
    return side


def layers_arg(text: str) -> tuple[int, ...]:
    """Comma-separated block numbers, each 1 to 1000 (a tower's depth is far below)."""
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated block numbers, got {text[:40]!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("is empty")
    if any(not 1 <= layer <= 1000 for layer in layers):
        raise argparse.ArgumentTypeError(f"takes block numbers from 1 to 1000, got {text[:40]!r}")
    return layers


def apply_reference_arg(args, config) -> None:
    """Give ``config`` (a JobConfig) the bank of --reference, checked against its checkpoint and image
    size; any problem is a UsageError (one line, exit 2) before Ray starts. Nothing without --reference."""
    if not getattr(args, "reference", None):
        return
    from headclip.errors import CheckpointError
    from headclip.model.checkpoint import read_checkpoint
    from headclip.reference.bank import BankError
    from headclip.redact import redact_text

    try:
        bank = read_bank_once(args.reference, config.storage_options)
        checkpoint = read_checkpoint(config.checkpoint_uri, config.storage_options)
        size = config.model_overrides.get("image_size", checkpoint.config.image_size)
        bank.check(checkpoint.checkpoint_id, size, f"reference bank {redact_text(args.reference)}")
    except (BankError, CheckpointError) as err:
        raise UsageError(str(err)) from None
    # the decode stage sends each image at the bank's own side too (the bank fits this image size: checked above)
    config.scoring = dataclasses.replace(config.scoring, reference=args.reference, reference_size=bank.own_size)
