"""Measure the scoring actor's host pipeline against a bare PIL decode of the same files.

For generated images of natural content (1/f colour noise) in three kinds,
1024x1024 JPEG, 1024x1024 PNG and 4000x3000 JPEG, in one run on one machine:

* the per-stage cost in ms per core per image (read, decode, resize, model,
  encode, write), one thread each;
* the rate of a bare PIL decode of the files on all CPUs (the reference);
* the host pipeline's rate with the model replaced by a stub that returns
  maps of the right shape (what the actor can feed a GPU);
* the scoring job's steady rate (one actor with all CPUs; Ray, or the
  actor's own code in this process with ``--no-ray``) and its ratio to the
  bare decode; the actor's peak memory for two shard and batch sizes;
* how much reduced-scale JPEG decoding moves the scores;
* with ``--device-decode both``, the job with JPEG decoding on the device.
"""

from __future__ import annotations

import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from .cli import Parser, batch_int, positive_int, run, side_int

EXAMPLE = """examples:
  python -m jobs.benchmark_host                                  # the demo model on this machine's CPUs
  python -m jobs.benchmark_host --kinds jpeg1024 --backbone ViT-L-14-336 --image-size 518 \\
      --device cuda --batch-size 32 --images 512 --no-ray --device-decode both
"""

KINDS = {"jpeg1024": (1024, 1024, "JPEG"), "png1024": (1024, 1024, "PNG"), "jpeg4000x3000": (3000, 4000, "JPEG")}

log = logging.getLogger("jobs.benchmark_host")


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.benchmark_host", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated image kinds (default: %(default)s)")
    p.add_argument("--images", type=positive_int, default=64, help="images of each 1024 px kind (default 64)")
    p.add_argument("--large-images", type=positive_int, default=16, help="4000x3000 images (default 16)")
    p.add_argument("--checkpoint", default=None, help="checkpoint to score with (default: the packaged demo model)")
    p.add_argument("--backbone", default=None,
                   help="score with this open_clip model and random weights instead of a checkpoint")
    p.add_argument("--image-size", type=side_int, default=224, help="input side with --backbone (default 224)")
    p.add_argument("--batch-size", type=batch_int, default=16, help="images per forward call (default 16)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available)")
    p.add_argument("--no-ray", action="store_true", help="run the actor's code in this process instead of on Ray")
    p.add_argument("--device-decode", choices=("off", "on", "both"), default="off",
                   help="decode JPEGs on the model's device in the job (default: off)")
    p.add_argument("--workdir", default=None, help="folder for generated images and output (default: a temp dir)")
    return p


def generate(folder: Path, kind: str, count: int) -> list[Path]:
    """``count`` files of ``kind``: natural-looking colour noise, each one different."""
    import numpy as np
    from PIL import Image

    from headclip.data.synthetic import natural_image

    height, width, fmt = KINDS[kind]
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.{'jpg' if fmt == 'JPEG' else 'png'}" for i in range(count)]
    bases = [natural_image(height, width, seed=s) for s in range(min(4, count))]
    for i, path in enumerate(paths):
        if path.exists():
            continue
        base = bases[i % len(bases)]
        image = np.roll(base, shift=(37 * i, 91 * i), axis=(0, 1))
        image = image[:, ::-1] if i % 2 else image
        Image.fromarray(np.ascontiguousarray(image)).save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return paths


def bare_decode_rate(paths: list[Path], threads: int) -> float:
    """Images per second of ``Image.open(path).convert("RGB")`` on ``threads`` threads."""
    from PIL import Image

    def decode(path):
        with Image.open(path) as image:
            return image.convert("RGB").size

    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(decode, paths))
        return len(paths) / (time.perf_counter() - start)


def stage_costs(paths: list[Path], model, batch_size: int, options) -> dict[str, float]:
    """ms per image of each stage on one thread (one core)."""
    import numpy as np
    import pyarrow as pa
    import torch

    from headclip.data.decode import decode_scaled
    from headclip.data.transforms import resize_square
    from headclip.scoring.masks import encode_maps
    from headclip.storage.schema import table_to_parquet_bytes

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sample = paths[:min(len(paths), 8)]
    size = model.image_size
    clock = {}
    start = time.perf_counter()
    blobs = [p.read_bytes() for p in sample]
    clock["read"] = time.perf_counter() - start
    start = time.perf_counter()
    decoded = [decode_scaled(b, options.max_pixels, size if options.reduced_decode else None) for b in blobs]
    clock["decode"] = time.perf_counter() - start
    start = time.perf_counter()
    pixels = [resize_square(image, size) for image, _ in decoded]
    clock["resize"] = time.perf_counter() - start
    batch = torch.from_numpy(np.stack([pixels[i % len(pixels)] for i in range(batch_size)])).permute(0, 3, 1, 2)
    batch = batch.contiguous().to(model.image_mean.device)
    model.score(batch)
    _sync(batch.device)
    repeats = 3 if batch.device.type == "cpu" else 10
    start = time.perf_counter()
    for _ in range(repeats):
        out = model.score(batch)
    _sync(batch.device)
    clock["model"] = (time.perf_counter() - start) / repeats * len(sample) / batch_size
    sizes = [full for _, full in decoded]
    start = time.perf_counter()
    maps = encode_maps(out.anomaly_map[:len(sample)], sizes, options.mask_threshold, options.mask_max_side,
                       options.heatmap_side)
    encoded = [maps.encoded(j) for j in range(len(sample))]
    clock["encode"] = time.perf_counter() - start
    start = time.perf_counter()
    table = pa.table({"mask": [e.mask_rle["counts"] for e in encoded],
                      "heatmap": [e.anomaly_map_bytes for e in encoded]})
    table_to_parquet_bytes(table)
    clock["write"] = time.perf_counter() - start
    torch.set_num_threads(threads)
    return {name: 1000 * seconds / len(sample) for name, seconds in clock.items()}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


class StubModel:
    """Stands in for the model: maps of the right shape (a smooth blob each), no forward pass."""

    def __init__(self, model):
        self.image_size, self.checkpoint_id = model.image_size, model.checkpoint_id

    def score(self, images):
        import torch

        from headclip.model.headclip import ScoreOutput

        n, size = images.shape[0], self.image_size
        axis = torch.linspace(-1.0, 1.0, size, device=images.device)
        centre = torch.rand(n, 2, 1, 1, device=images.device) * 1.6 - 0.8
        maps = torch.exp(-((axis.view(1, 1, -1) - centre[:, 0]) ** 2 + (axis.view(1, -1, 1) - centre[:, 1]) ** 2) / 0.05)
        return ScoreOutput(maps.amax((1, 2)), maps[:, 0, 0], maps)


def pipeline_rate(paths, scorer_kwargs, stub: bool) -> tuple[float, "object"]:
    """(images per second, table) of the actor's code scoring ``paths`` in this process."""
    import pyarrow as pa

    from headclip.scoring.scorer import ImageScorer

    images = pa.table({"image_id": [p.name for p in paths], "image_uri": [str(p) for p in paths]})
    with ImageScorer(**scorer_kwargs) as scorer:
        if stub:
            scorer.model = StubModel(scorer.model)
        scorer.score_table(images.slice(0, min(8, len(paths))))  # warm-up
        start = time.perf_counter()
        table = scorer.score_table(images)
        return len(paths) / (time.perf_counter() - start), table


def job_rate(folder: Path, output: Path, checkpoint: str, options, cpus: int, shard_size: int,
             device) -> tuple[float, int]:
    """(steady images per second, peak actor RSS bytes) of the scoring job with one actor on Ray."""
    from headclip.scoring.runner import JobConfig, execute, prepare

    config = JobConfig(input=str(folder), output=str(output), checkpoint=checkpoint, run_id=f"bench-{time.time_ns()}",
                       shard_size=shard_size, actors=1, cpus_per_actor=cpus,
                       gpus_per_actor=1.0 if device.type == "cuda" else 0.0, scoring=options)
    done = []
    summary = execute(prepare(config), config, on_event=lambda name, value: done.append(
        (time.perf_counter(), value.images)) if name == "shard_done" else None)
    steady = sum(n for _, n in done[1:]) / (done[-1][0] - done[0][0]) if len(done) > 1 else summary.images_per_second
    return steady, summary.peak_actor_rss_bytes


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import os
    from dataclasses import replace

    import numpy as np
    import torch

    import headclip
    from headclip.model.assets import DEMO_CHECKPOINT
    from headclip.model.factory import resolve_device
    from headclip.scoring.scorer import ScoringOptions

    device = resolve_device(args.device)
    cpus = len(os.sched_getaffinity(0))
    torch.set_num_threads(cpus)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="headclip-bench-host-"))
    checkpoint = args.checkpoint or str(DEMO_CHECKPOINT)
    if args.backbone:
        checkpoint = str(workdir / "bench.safetensors")
        headclip.save_checkpoint(headclip.create_model(backbone=args.backbone, pretrained=None,
                                                       image_size=args.image_size), checkpoint)
    model = headclip.create_model(checkpoint=checkpoint, device=device)
    options = ScoringOptions(batch_size=args.batch_size, device=str(device))
    kwargs = dict(run_id="bench", checkpoint=checkpoint, options=options, torch_threads=cpus, model=model)
    decode_modes = {"off": [False], "on": [True], "both": [False, True]}[args.device_decode]
    if not args.no_ray:
        import ray

        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"\nhost pipeline: {model.config.backbone} at {model.image_size} px, batch {args.batch_size}, device "
          f"{device}, {cpus} CPUs, torch {torch.__version__}" + (", no Ray" if args.no_ray else ""))
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        count = args.large_images if kind == "jpeg4000x3000" else args.images
        paths = generate(workdir / kind, kind, count)
        costs = stage_costs(paths, model, args.batch_size, options)
        bare = bare_decode_rate(paths, cpus)
        stub, _ = pipeline_rate(paths, kwargs, stub=True)
        print(f"\n{kind} ({count} files, {np.mean([p.stat().st_size for p in paths]) / 1e6:.2f} MB each)")
        print("  ms per core per image: " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items())
              + f", total {sum(costs.values()):.1f}")
        print(f"  bare PIL decode, {cpus} threads     : {bare:8.1f} images/s")
        if device.type == "cuda":
            forward = 1000 / costs["model"]
            print(f"  model forward, pre-decoded tensors : {forward:8.1f} images/s")
        print(f"  host pipeline, stub model          : {stub:8.1f} images/s  ({stub / bare:.2f} of bare decode)")
        for device_decode in decode_modes:
            opts = replace(options, device_decode=device_decode)
            if args.no_ray:
                rate, _ = pipeline_rate(paths, {**kwargs, "options": opts}, stub=False)
                memory = ""
            else:
                rate, rss = job_rate(workdir / kind, workdir / "out", checkpoint, opts, cpus, 16, device)
                _, rss_large = job_rate(workdir / kind, workdir / "out", checkpoint, replace(opts, batch_size=
                                        2 * args.batch_size), cpus, 64, device)
                memory = (f"; peak actor memory {rss / 2**20:.0f} MiB (shards of 16, batch {args.batch_size}), "
                          f"{rss_large / 2**20:.0f} MiB (shards of 64, batch {2 * args.batch_size})")
            label = "scoring job" + (", device decode" if device_decode else "")
            versus = f", {rate / forward:.2f} of the bare forward" if device.type == "cuda" else ""
            print(f"  {label:<35}: {rate:8.1f} images/s  ({rate / bare:.2f} of bare decode{versus}){memory}")
        if kind.startswith("jpeg"):
            _, full = pipeline_rate(paths, {**kwargs, "options": replace(options, reduced_decode=False)}, False)
            _, reduced = pipeline_rate(paths, kwargs, stub=False)
            delta = np.abs(np.asarray(full["score"].to_pylist()) - np.asarray(reduced["score"].to_pylist()))
            print(f"  reduced-scale decode moves scores by at most {delta.max():.4f} (mean {delta.mean():.4f})")
    return 0


if __name__ == "__main__":
    run(main, "jobs.benchmark_host")
