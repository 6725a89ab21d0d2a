"""Measure each forward-pass rewrite in one process: images/s, TFLOP/s and % of the card's bf16 peak.

The model is built with the architecture of the named pretrained weights
(QuickGELU for OpenAI's) and random values. Starting from the original
forward, the rewrites are switched on one at a time (split SDPA, class token
only in the last layer, folded head weights, bf16 tower, cuDNN attention,
torch.compile); each step is timed in interleaved rounds (best round kept,
so a busy machine hurts every step alike), its FLOPs counted, and its scores
and maps compared with the original forward's on the same images. Then the
last eager step with a reference bank of ``--bank-patches`` random unit
features at the model's width (headclip.reference): images/s of the forward
with the bank's search and combination, indexed (the default for such a bank)
and exact, against the same forward without a bank, in interleaved rounds.
``--smoke`` runs the same steps on the tiny test backbone on the CPU.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import Optional, Sequence

from .cli import Parser, UsageError, positive_int, run

EXAMPLE = """examples:
  python -m jobs.gpu_check                       # ViT-L-14-336, 518 px, batch 32, bf16 steps, on the GPU
  python -m jobs.gpu_check --smoke               # the tiny backbone at 64 px on the CPU (a minute)
  python -m jobs.gpu_check --output gpu_check.json
"""

log = logging.getLogger("jobs.gpu_check")

SMOKE = dict(backbone="HeadCLIP-Tiny", image_size=64, batch_size=2, device="cpu", rounds=2, repeats=2,
             bank_patches=20_000)


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.gpu_check", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--backbone", default="ViT-L-14-336", help="open_clip model (default ViT-L-14-336)")
    p.add_argument("--pretrained-arch", default="openai",
                   help="architecture of these weights (QuickGELU for openai); values are random")
    p.add_argument("--image-size", type=positive_int, default=518, help="input side (default 518)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="batch size (default 32)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available)")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--repeats", type=positive_int, default=10, help="batches per round and step (default 10)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="leave out the torch.compile step")
    p.add_argument("--bank-patches", type=positive_int, default=100_000,
                   help="patches of the reference bank timed after the steps (default 100000)")
    p.add_argument("--cpu-time", action="store_true",
                   help="on a shared CPU: one thread, timed by this process's CPU seconds instead of wall time")
    p.add_argument("--smoke", action="store_true", help="the tiny backbone at 64 px, batch 2, on the CPU")
    p.add_argument("--output", default=None, help="also write the table as JSON to this file")
    return p


def steps():
    """(name, ForwardOptions, precision, compile) of each step; every step keeps the ones before it."""
    from headclip.model.vision import ForwardOptions

    off = ForwardOptions.reference()
    split = replace(off, split_sdpa=True)
    last = replace(split, class_token_last=True)
    fold = replace(last, fold_head_weights=True)
    cudnn = replace(fold, cudnn_attention=True)
    return [
        ("original forward", off, "auto", False),
        ("+ split SDPA (no cat copies)", split, "auto", False),
        ("+ class token only in the last layer", last, "auto", False),
        ("+ head weights folded into out-proj", fold, "auto", False),
        ("+ bf16 tower, no autocast", fold, "bf16", False),
        ("+ cuDNN attention preferred", cudnn, "bf16", False),
        ("+ torch.compile", cudnn, "bf16", True),
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    import torch

    from headclip.model.factory import create_model, resolve_device
    from headclip.model.inference import compile_model, set_precision
    from headclip.model.profile import architecture_config, device_name, flops_per_image, images_per_second, \
        peak_bf16_tflops

    device = resolve_device(args.device)
    clock = time.perf_counter
    if args.cpu_time:
        if device.type != "cpu":
            raise UsageError("--cpu-time times CPU forwards; give --device cpu")
        torch.set_num_threads(1)
        clock = time.process_time
    config = architecture_config(args.backbone, args.pretrained_arch, args.image_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           generator=generator).to(device)
    # one model per precision, so that interleaved rounds need no re-casting; equal random weights
    models = {precision: set_precision(create_model(config, device=device), precision) for precision in ("auto", "bf16")}
    with torch.no_grad():
        head_weights = torch.rand(models["auto"].vision.head_weights.shape, generator=generator) * 2
        for model in models.values():
            model.vision.head_weights.copy_(head_weights)
    plan = [s for s in steps() if args.compile or not s[3]]
    compiled_model = None
    if any(s[3] for s in plan):  # a third model: compiling changes its forward for good
        name, options, precision, _ = plan[-1]
        compiled_model = set_precision(create_model(config, device=device), precision)
        with torch.no_grad():
            compiled_model.vision.head_weights.copy_(head_weights)
        compiled_model.vision.options = options
        compile_seconds = compile_model(compiled_model, args.batch_size)
        print(f"torch.compile: {'failed, eager' if compile_seconds is None else f'{compile_seconds:.1f} s'}")

    def model_for(step):
        name, options, precision, compiled = step
        model = compiled_model if compiled else models[precision]
        model.vision.options = options
        return model

    reference = None
    results = []
    for step in plan:
        model = model_for(step)
        out = model.score(images)
        if reference is None:
            reference = out
        flops = flops_per_image(model, images) if not step[3] else results[-1]["flops_per_image"]
        results.append(dict(step=step[0], flops_per_image=flops, best_images_per_second=0.0,
                            max_abs_diff_score=float((out.joint_score - reference.joint_score).abs().max()),
                            max_abs_diff_map=float((out.anomaly_map - reference.anomaly_map).abs().max())))
    for round_ in range(args.rounds):
        for step, result in zip(plan, results):
            rate = images_per_second(model_for(step), images, args.repeats, warmup=int(round_ == 0), clock=clock)
            result["best_images_per_second"] = max(result["best_images_per_second"], rate)

    name = device_name(device)
    peak = peak_bf16_tflops(name)
    base_rate = results[0]["best_images_per_second"]
    print(f"\ngpu_check: {args.backbone} (architecture of {args.pretrained_arch} weights, "
          f"quick_gelu={models['auto'].config.quick_gelu}) at {args.image_size} px, batch {args.batch_size}, "
          f"{name}, torch {torch.__version__}, best of {args.rounds} rounds of {args.repeats} batches"
          f"{', CPU time of one thread' if args.cpu_time else ''}")
    print(f"{'step':40s} {'GFLOP/img':>9s} {'images/s':>9s} {'x orig':>6s} {'TFLOP/s':>8s} {'% peak':>6s} "
          f"{'|d score|':>9s} {'|d map|':>8s}")
    for result in results:
        tflops = result["flops_per_image"] * result["best_images_per_second"] / 1e12
        result.update(tflops=tflops, percent_of_peak=None if peak is None else 100 * tflops / peak,
                      speedup=result["best_images_per_second"] / base_rate)
        percent = "-" if peak is None else f"{result['percent_of_peak']:.1f}"
        print(f"{result['step']:40s} {result['flops_per_image'] / 1e9:9.3f} {result['best_images_per_second']:9.2f} "
              f"{result['speedup']:6.2f} {tflops:8.3f} {percent:>6s} {result['max_abs_diff_score']:9.2e} "
              f"{result['max_abs_diff_map']:8.2e}")
    eager = [s for s in plan if not s[3]][-1]
    bank = bank_rates(model_for(eager), images, args.bank_patches, args.rounds, args.repeats, clock)
    print(f"\nwith a reference bank of {args.bank_patches:,} patches (random unit features, {bank['width']} wide), "
          f"step '{eager[0]}':")
    for key in ("without", "indexed", "exact"):
        rate = bank[key]
        print(f"  {key:<8} {rate:9.2f} images/s  ({rate / bank['without']:.2f} of the rate without a bank)")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(dict(device=name, peak_tflops=peak, cpu_time=args.cpu_time, backbone=args.backbone, image_size=args.image_size,
                           batch_size=args.batch_size, torch=torch.__version__, time=time.time(), steps=results,
                           reference_bank=bank), handle, indent=1)
    return 0


def bank_rates(model, images, patches: int, rounds: int, repeats: int, clock) -> dict:
    """Images/s of ``model.score`` without a bank and with a ``patches``-row bank searched through its index
    and exactly (the best of ``rounds`` interleaved rounds of ``repeats`` batches), and the bank's width."""
    import torch

    from headclip.model.profile import synchronize
    from headclip.reference import IndexSettings, ReferenceBank, ReferenceScorer, build_index

    device = images.device
    layers, dim = len(model.vision.map_layers), model.clip.visual.output_dim
    generator = torch.Generator().manual_seed(1)
    features = torch.nn.functional.normalize(torch.randn(patches, layers, dim, generator=generator), dim=-1).flatten(1)
    settings = IndexSettings()
    order, index = build_index(features.to(device), settings)
    bank = lambda f, indexes: ReferenceBank(  # noqa: E731
        {"*": f}, {"*": 1.0}, "gpu-check", model.config.backbone, model.image_size, tuple(model.vision.map_layers),
        dim, settings={"index": settings.to_dict()}, indexes=indexes)
    scorers = {"indexed": ReferenceScorer(bank(features[order.cpu()].contiguous(), {"*": index}), model),
               "exact": ReferenceScorer(bank(features, {}), model)}

    def run(name: str) -> None:
        if name == "without":
            model.score(images)
        else:
            scorers[name].apply(model.score(images, patch_features=True), [None] * images.shape[0])

    rates = {"without": 0.0, "indexed": 0.0, "exact": 0.0}
    for round_ in range(rounds):
        for name in rates:
            for _ in range(int(round_ == 0)):
                run(name)
            synchronize(device)
            start = clock()
            for _ in range(repeats):
                run(name)
            synchronize(device)
            rates[name] = max(rates[name], repeats * images.shape[0] / (clock() - start))
    return {**rates, "patches": patches, "width": layers * dim, "nprobe": settings.nprobe, "lists": index.nlist}


if __name__ == "__main__":
    run(main, "jobs.gpu_check")
