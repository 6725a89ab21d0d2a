"""Convert AnomalyCLIP's released prompt-learner checkpoint into a HeadCLIP checkpoint.

AnomalyCLIP's files are torch pickles; they are read with
``torch.load(weights_only=True)``, which refuses code. The result has head
weights 1, so it scores as AnomalyCLIP does, and is a safetensors file.
"""

from __future__ import annotations

from typing import Optional, Sequence

from .cli import Parser, UsageError, layer_int, run, side_int, storage_options_arg

EXAMPLE = """example:
  python -m jobs.import_anomalyclip --source checkpoints/9_12_4_multiscale/epoch_15.pth \\
      --output s3://bucket/models/anomalyclip.safetensors
"""


def build_parser() -> Parser:
    parser = Parser(prog="python -m jobs.import_anomalyclip", description=__doc__, epilog=EXAMPLE)
    parser.add_argument("--source", required=True, help="AnomalyCLIP checkpoint (path or fsspec URL)")
    parser.add_argument("--output", required=True, help="HeadCLIP checkpoint to write (.safetensors)")
    parser.add_argument("--backbone", default="ViT-L-14-336", help="open_clip model name (default: %(default)s)")
    parser.add_argument("--pretrained", default="openai",
                        help="backbone weights: open_clip tag, path or URL (default: %(default)s)")
    parser.add_argument("--image-size", type=side_int, default=518, help="input side in pixels (default: %(default)s)")
    parser.add_argument("--map-layers", type=layer_int, nargs="+", default=None,
                        help="vision layers averaged into the anomaly map (default: the quarter points, 6 12 18 24 of 24)")
    parser.add_argument("--storage-options", type=storage_options_arg, default=None,
                        help="fsspec options as JSON, e.g. '{\"client_kwargs\": {\"endpoint_url\": \"...\"}}'")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from headclip import HeadCLIPConfig, import_anomalyclip

    try:
        config = HeadCLIPConfig(backbone=args.backbone, pretrained=args.pretrained, image_size=args.image_size,
                                map_layers=tuple(args.map_layers) if args.map_layers else None)
    except ValueError as err:
        raise UsageError(str(err)) from None
    ckpt_id = import_anomalyclip(args.source, args.output, config, storage_options=args.storage_options)
    print(f"wrote {args.output} (checkpoint id {ckpt_id})")
    return 0


if __name__ == "__main__":
    run(main, "jobs.import_anomalyclip")
