"""Pre-train the tiny demo backbone (HeadCLIP-Tiny) CLIP-style on generated surfaces.

Trains every weight of the tiny open_clip model with an image-text
contrastive loss on generated, captioned surfaces, plus two losses that
HeadCLIP reads (the class token without ln_post, and the V-V path's patch
tokens against flawless/defect captions); see
``headclip.training.pretrain``. With ``--patch-weight 0 --raw-cls-weight 0``
it is plain CLIP pre-training. The result is an fp16 safetensors state
dict, the format of ``headclip/assets/demo-backbone.safetensors``; HeadCLIP
keeps it frozen and fits only prompts and head weights on top. About 8
minutes on 2 idle CPU cores with the defaults.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from .cli import (Number, Parser, UsageError, batch_int, non_negative_float, non_negative_int, positive_float, positive_int,
                  run, seed_int, unit_float)

EXAMPLE = """examples:
  python -m jobs.pretrain_demo_backbone --output /tmp/demo-backbone-candidate.safetensors
  python -m jobs.pretrain_demo_backbone --epochs 2 --images-per-epoch 512 --output /tmp/quick.safetensors
  # then build HeadCLIP over it:
  #   headclip.create_model(backbone="HeadCLIP-Tiny", pretrained="/tmp/quick.safetensors", image_size=224)
"""

DEFAULT_OUTPUT = "headclip/assets/demo-backbone.safetensors"

log = logging.getLogger("jobs.pretrain_demo_backbone")


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.pretrain_demo_backbone", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="weights file to write (default: %(default)s)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the initial weights and of the data (default: 0)")
    p.add_argument("--epochs", type=positive_int, default=16, help="epochs (default: %(default)s)")
    p.add_argument("--images-per-epoch", type=positive_int, default=2048,
                   help="freshly generated images per epoch (default: %(default)s)")
    p.add_argument("--batch-size", type=batch_int, default=64, help="images per step (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.1, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--warmup-steps", type=non_negative_int, default=50, help="linear warm-up steps (default: %(default)s)")
    p.add_argument("--min-crop", type=Number(float, 0.0, 1.0, low_open=True), default=0.35,
                   help="smallest crop, as a fraction of the image side (default: %(default)s; 1 = no crops)")
    p.add_argument("--generic-captions", type=unit_float, default=0.25,
                   help="share of captions that name no texture (default: %(default)s)")
    p.add_argument("--patch-weight", type=non_negative_float, default=2.0,
                   help="weight of the patch-level caption loss, 0 = plain CLIP (default: %(default)s)")
    p.add_argument("--raw-cls-weight", type=non_negative_float, default=1.0,
                   help="weight of the same loss on the class token projected without ln_post, as HeadCLIP "
                        "reads it (default: %(default)s)")
    p.add_argument("--textures", default=None,
                   help="comma-separated textures to train on (default: all of headclip.data.synthetic.ALL_TEXTURES)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default: %(default)s)")
    return p


def pretrain_config(args):
    """The :class:`PretrainConfig` of the flags; bad values become one line."""
    from headclip.training.pretrain import PretrainConfig, check_textures

    try:
        textures = check_textures(args.textures)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return PretrainConfig(seed=args.seed, epochs=args.epochs, images_per_epoch=args.images_per_epoch,
                          batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          warmup_steps=args.warmup_steps, min_crop=args.min_crop,
                          generic_captions=args.generic_captions, patch_weight=args.patch_weight,
                          raw_cls_weight=args.raw_cls_weight, textures=textures, threads=args.threads)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    config = pretrain_config(args)
    from headclip.training.pretrain import pretrain, save_weights

    path = save_weights(pretrain(config), args.output)
    log.info("wrote %s", path)
    print(path)
    return 0


if __name__ == "__main__":
    run(main, "jobs.pretrain_demo_backbone")
