"""Fit HeadCLIP's prompts and head weights on a labelled auxiliary data set.

Runs on Ray Train (``--workers N``: a TorchTrainer with N data-parallel
workers) or in this process (``--workers 0``). Only the prompts and head
weights learn; the backbone is frozen. Every epoch reports its loss (and the
validation metrics, with ``--val-data``) with a checkpoint; starting the same
command again (same ``--name`` and ``--storage-path``) continues from the
latest checkpoint. The final checkpoint is written to ``--output``.
"""

from __future__ import annotations

import logging
import shlex
import sys
from typing import Optional, Sequence

from .cli import (Parser, UsageError, Number, add_dataset_flags, add_storage_flag, batch_int, init_ray, layer_int,
                  load_dataset_arg, non_negative_float, positive_float, positive_int, run, seed_int, side_int)

EXAMPLE = """examples:
  # the paper's protocol: fit on MVTec AD's test split on a GPU cluster
  ray job submit --working-dir . -- python -m jobs.train --data s3://bucket/mvtec_anomaly_detection \\
      --layout mvtec --workers 4 --gpu --name headclip-mvtec --storage-path s3://bucket/ray-results \\
      --output s3://bucket/models/headclip-mvtec.safetensors
  # in this process, on generated data (see `python -m jobs.make_synthetic --help`)
  python -m jobs.train --data synth/train --workers 0 --backbone HeadCLIP-Tiny \\
      --pretrained headclip:demo-backbone.safetensors --image-size 224 --epochs 3 --output fitted.safetensors
"""

log = logging.getLogger("jobs.train")


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.train", description=__doc__, epilog=EXAMPLE)
    add_dataset_flags(p, "split to fit on (default: test, as the paper)")
    p.add_argument("--val-data", default=None, help="labelled data set evaluated after every epoch")
    p.add_argument("--val-layout", default="auto", help="layout of --val-data (default: auto)")
    p.add_argument("--output", required=True, help="where the final checkpoint goes (.safetensors)")
    p.add_argument("--name", default="headclip", help="run name; the same name resumes (default: headclip)")
    p.add_argument("--storage-path", default="train-runs",
                   help="where runs keep their checkpoints (local or s3://; default: train-runs)")
    p.add_argument("--workers", type=Number(int, 0, 10_000, unit="workers"), default=0, help="Ray Train workers; 0 trains in this process")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--epochs", type=positive_int, default=15)
    p.add_argument("--batch-size", type=batch_int, default=8, help="global batch size (default: 8)")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--betas", type=Number(float, 0.0, 1.0, high_open=True), nargs=2, default=(0.5, 0.999))
    p.add_argument("--seed", type=seed_int, default=111)
    p.add_argument("--backbone", default="ViT-L-14-336", help="open_clip model (default: ViT-L-14-336)")
    p.add_argument("--pretrained", default="openai", help="backbone weights: tag, path or URL (default: openai)")
    p.add_argument("--image-size", type=side_int, default=518)
    p.add_argument("--map-layers", type=layer_int, nargs="+", default=None,
                   help="vision layers of the anomaly map (default: the quarter points, 6 12 18 24 of 24)")
    p.add_argument("--pixel-weight", type=non_negative_float, default=4.0,
                   help="weight of the pixel loss summed over map layers (default: 4, as AnomalyCLIP)")
    p.add_argument("--focal-gamma", type=non_negative_float, default=2.0)
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or local)")
    add_storage_flag(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 0:
        raise UsageError("--workers must be >= 0")
    from headclip.data.datasets import DatasetError, load_dataset

    train_table = load_dataset_arg(args)
    try:
        val_table = (load_dataset(args.val_data, args.val_layout, "test", None, args.storage_options)
                     if args.val_data else None)
    except DatasetError as err:
        raise UsageError(str(err)) from None

    from headclip.model.config import HeadCLIPConfig
    from headclip.storage.fs import write_bytes_atomic
    from headclip.training.launcher import fit
    from headclip.training.loop import TrainConfig

    from headclip.redact import redact_command

    # the provenance recorded in every checkpoint holds no credentials
    command = "python -m jobs.train " + shlex.join(redact_command(sys.argv[1:] if argv is None else list(argv)))
    try:
        model = HeadCLIPConfig(backbone=args.backbone, pretrained=args.pretrained, image_size=args.image_size,
                               map_layers=tuple(args.map_layers) if args.map_layers else None,
                               extra={"provenance": command})
    except ValueError as err:
        raise UsageError(str(err)) from None
    config = TrainConfig(model=model.to_dict(), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         betas=tuple(args.betas), seed=args.seed,
                         loss={"pixel_weight": args.pixel_weight, "focal_gamma": args.focal_gamma},
                         storage_options=args.storage_options)
    log.info("fitting on %d images (%d anomalous, classes: %s)", train_table.num_rows,
             sum(train_table["label"].to_pylist()), ", ".join(sorted(set(train_table["class_name"].to_pylist()))))
    if args.workers > 0:
        init_ray(args.ray_address)
    data, history = fit(config, train_table, val_table, name=args.name, storage_path=args.storage_path,
                        workers=args.workers, use_gpu=args.gpu)
    write_bytes_atomic(args.output, data, args.storage_options)
    from headclip.model.checkpoint import checkpoint_id

    for row in history:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if not k.startswith("_")})
    from headclip.redact import redact_text

    print(f"wrote {redact_text(args.output)} (checkpoint id {checkpoint_id(data)})")
    return 0


if __name__ == "__main__":
    run(main, "jobs.train")
