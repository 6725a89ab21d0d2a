"""Measure scoring speed, in one run on one machine, model and batch size:

(a) the bare model forward rate on pre-decoded tensors (the ceiling),
(b) the whole job's rate from image files to Parquet (local Ray, one actor), with
    images read and decoded by Ray Data tasks beside the actor (b), and read and
    decoded in the actor itself (b', --device-decode),
(c) a reference loop scoring one image at a time in fp32 with CPU (scipy)
    smoothing, as research code does,

and print (b)/(a), (b)/(c), output bytes per image, the actor's peak memory,
and the cost of the V-V path over the plain CLIP forward.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from .cli import Parser, batch_int, positive_int, run, side_int

EXAMPLE = """examples:
  python -m jobs.benchmark                                   # ViT-B-16 at 224 px on this machine
  python -m jobs.benchmark --backbone ViT-L-14-336 --image-size 518 --device cuda --images 2048 --batch-size 32
  python -m jobs.benchmark --profile --backbone ViT-L-14-336 --image-size 518 --batch-size 32 --precision bf16
"""

log = logging.getLogger("jobs.benchmark")


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.benchmark", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--backbone", default="ViT-B-16", help="open_clip model (random weights; default ViT-B-16)")
    p.add_argument("--image-size", type=side_int, default=224, help="input side (default 224)")
    p.add_argument("--batch-size", type=batch_int, default=16, help="batch size for (a) and (b) (default 16)")
    p.add_argument("--images", type=positive_int, default=192, help="images in the job (default 192)")
    p.add_argument("--reference-images", type=positive_int, default=32, help="images for (c) (default 32)")
    p.add_argument("--shard-size", type=positive_int, default=32, help="images per shard (default 32)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available)")
    p.add_argument("--workdir", default=None, help="folder for generated images and output (default: a temp dir)")
    p.add_argument("--profile", action="store_true",
                   help="only profile the forward: GFLOP/image, images/s, TFLOP/s, %% of peak, top kernels")
    p.add_argument("--pretrained-arch", default="openai",
                   help="with --profile: the architecture of these weights (QuickGELU for openai); values random")
    p.add_argument("--precision", choices=("auto", "bf16"), default="auto", help="with --profile: tower precision")
    p.add_argument("--compile", action="store_true", help="with --profile: torch.compile the forward")
    return p


def forward_rate(model, batch, device, repeats: int) -> float:
    """Images per second of model.score on a uint8 batch already on the device (one sync after the loop)."""
    from headclip.model.profile import synchronize

    batch = batch.to(device)
    model.score(batch)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        model.score(batch)
    synchronize(device)
    return repeats * batch.shape[0] / (time.perf_counter() - start)


def vv_overhead(model, batch, device, repeats: int) -> float:
    """Time of the dual-path vision forward over open_clip's plain encode_image."""
    from headclip.model.profile import synchronize

    import torch

    images = model.normalize(batch.to(device))
    with torch.inference_mode(), model._autocast(images):
        model.vision(images)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            model.vision(images)
        synchronize(device)
        dual = time.perf_counter() - start
        x = model.vision.embed(images)
        start = time.perf_counter()
        for _ in range(repeats):
            h = x
            for block in model.clip.visual.transformer.resblocks:
                h, _ = model.vision.block_forward(block, h, None, None)
        synchronize(device)
        plain = time.perf_counter() - start
    return dual / plain


def reference_loop(model, paths: list[Path], sigma: float) -> float:
    """Images per second scoring one file at a time, fp32, smoothing with scipy on the CPU."""
    import numpy as np
    import torch
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    import headclip

    start = time.perf_counter()
    for path in paths:
        image = Image.open(path).convert("RGB")
        batch = headclip.preprocess([image], model.image_size).to(model.image_mean.device)
        with torch.inference_mode():
            logits = model(model.normalize(batch))
            glob = logits.global_logits.float().softmax(-1)[0, 1].item()
            prob = torch.stack([l.float().softmax(1)[:, 1] for l in logits.patch_logits]).mean(0)
            up = torch.nn.functional.interpolate(prob[:, None], size=(model.image_size,) * 2, mode="bilinear")
        anomaly_map = gaussian_filter(up[0, 0].cpu().numpy(), sigma=sigma)
        _ = 0.5 * glob + 0.5 * float(np.max(anomaly_map))
    return len(paths) / (time.perf_counter() - start)


def ray_cpus() -> float:
    """The CPUs a local Ray would see on this machine."""
    import os

    return float(len(os.sched_getaffinity(0)))


def job_rates(config, execute, prepare) -> tuple[float, float, object]:
    """(steady images/s after the first shard, images/s overall, summary) of one scoring job."""
    done_at = []
    plan = prepare(config)
    summary = execute(plan, config, on_event=lambda name, value: done_at.append(
        (time.perf_counter(), value.images)) if name == "shard_done" else None)
    steady_images = sum(n for _, n in done_at[1:])
    steady = steady_images / (done_at[-1][0] - done_at[0][0]) if len(done_at) > 1 else summary.images_per_second
    return steady, summary.images_per_second, summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.profile:
        from headclip.model.factory import resolve_device
        from headclip.model.profile import profile_report

        print("\n".join(profile_report(args.backbone, args.pretrained_arch, args.image_size, args.batch_size,
                                       resolve_device(args.device), args.precision, args.compile)))
        return 0
    import numpy as np
    import ray
    import torch
    from PIL import Image

    import headclip
    from headclip.scoring.runner import JobConfig, execute, prepare
    from headclip.model.factory import resolve_device
    from headclip.scoring.scorer import ScoringOptions
    from headclip.data.synthetic import make_sample

    device = resolve_device(args.device)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="headclip-bench-"))
    images_dir = workdir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(args.images):
        path = images_dir / f"{i:05d}.png"
        if not path.exists():
            Image.fromarray(make_sample(i, size=256).image).save(path)
        paths.append(path)

    model = headclip.create_model(backbone=args.backbone, pretrained=None, image_size=args.image_size,
                                  device=device)
    checkpoint = str(workdir / "bench.safetensors")
    headclip.save_checkpoint(model, checkpoint)
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((args.image_size,) * 2, Image.Resampling.BICUBIC))
              for p in paths[:args.batch_size]]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    repeats = max(2, 64 // args.batch_size) if device.type == "cpu" else 20
    rate_a = forward_rate(model, batch, device, repeats)
    overhead = vv_overhead(model, batch, device, repeats)

    cpus = int(ray_cpus())
    # two more logical CPUs, so that the actor keeps every core's thread and the read/decode and publish tasks
    # run beside it, as on a node whose CPUs the actor does not hold
    ray.init(num_cpus=cpus + 2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rates = {}
    for name, device_decode in (("tasks", False), ("actor", True)):
        config = JobConfig(input=str(images_dir), output=str(workdir / "out"), checkpoint=checkpoint,
                           run_id=f"bench-{name}-{time.time_ns()}", shard_size=args.shard_size,
                           actors=1, cpus_per_actor=cpus, gpus_per_actor=1.0 if device.type == "cuda" else 0.0,
                           scoring=ScoringOptions(batch_size=args.batch_size, device=str(device),
                                                  device_decode=device_decode))
        rates[name] = job_rates(config, execute, prepare)
    ray.shutdown()
    (rate_b, rate_b_total, summary), (rate_t, rate_t_total, _) = rates["tasks"], rates["actor"]

    torch.set_num_threads(int(cpus))
    reference_model = headclip.create_model(backbone=args.backbone, pretrained=None, image_size=args.image_size,
                                            device=device)
    rate_c = reference_loop(reference_model, paths[:args.reference_images], reference_model.config.sigma)

    print(f"\nbenchmark: {args.backbone} at {args.image_size} px, batch {args.batch_size}, device {device}, "
          f"{int(cpus)} CPUs, torch {torch.__version__}")
    print(f"(a) model forward on pre-decoded tensors : {rate_a:8.2f} images/s")
    print(f"(b) whole job, files -> Parquet (steady) : {rate_b:8.2f} images/s "
          f"({rate_b_total:.2f} images/s including actor start and model load)")
    print(f"(b') the same, --device-decode (decoding in the actor): {rate_t:8.2f} images/s "
          f"({rate_t_total:.2f} images/s including actor start and model load)")
    print(f"(c) reference loop, 1 image, fp32, scipy : {rate_c:8.2f} images/s")
    print(f"(b)/(a) = {rate_b / rate_a:.2f}   (b)/(c) = {rate_b / rate_c:.2f}")
    print(f"output bytes per image: {summary.output_bytes / max(1, summary.images):.0f}")
    print(f"peak memory per actor: {summary.peak_actor_rss_bytes / 2**20:.0f} MiB")
    print(f"dual-path vision forward / plain CLIP vision forward: {overhead:.2f}")
    return 0


if __name__ == "__main__":
    run(main, "jobs.benchmark")
