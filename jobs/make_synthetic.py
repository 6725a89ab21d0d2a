"""Write a generated labelled data set in MVTec AD's layout.

``<class>/test/good/NNN.png`` and ``<class>/test/<defect>/NNN.png`` with masks
in ``<class>/ground_truth/<defect>/NNN_mask.png``; one class per texture.
Used to fit and check models where no public data set can be downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .cli import Parser, positive_int, run, seed_int, side_int

EXAMPLE = """example:
  python -m jobs.make_synthetic --root synth/train --textures metal leather --per-class 40
"""


def write_mvtec_tree(root: Path, textures: Sequence[str], per_class: int, size: int = 256, seed: int = 0) -> int:
    """Write ``per_class`` images per texture (half with a defect); returns the image count."""
    import numpy as np
    from PIL import Image

    from headclip.data.synthetic import make_sample

    count = 0
    for t, texture in enumerate(textures):
        for i in range(per_class):
            sample = make_sample(seed * 1_000_003 + t * 10_007 + i, size=size, texture_kind=texture,
                                 defect="random" if i % 2 else None)
            defect = sample.defect or "good"
            image_path = root / texture / "test" / defect / f"{i:03d}.png"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(sample.image).save(image_path)
            if sample.defect is not None:
                mask_path = root / texture / "ground_truth" / defect / f"{i:03d}_mask.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((sample.mask * 255).astype(np.uint8)).save(mask_path)
            count += 1
    return count


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.make_synthetic", description=__doc__, epilog=EXAMPLE)
    p.add_argument("--root", required=True, help="folder to write")
    p.add_argument("--textures", nargs="+", required=True, help="one class per texture")
    p.add_argument("--per-class", type=positive_int, default=40)
    p.add_argument("--size", type=side_int, default=256)
    p.add_argument("--seed", type=seed_int, default=0)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    n = write_mvtec_tree(Path(args.root), args.textures, args.per_class, args.size, args.seed)
    print(f"wrote {n} images to {args.root}")
    return 0


if __name__ == "__main__":
    run(main, "jobs.make_synthetic")
