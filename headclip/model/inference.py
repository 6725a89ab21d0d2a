"""Running a built model for inference: the tower's precision and ``torch.compile``.

Precision "auto" keeps the frozen vision tower's weights in fp32; on CUDA it
runs under bf16 (or fp16) autocast, which runs every LayerNorm in fp32 with
casts in and out and re-casts every weight each forward. Precision "bf16"
stores the tower's weights in bf16 and runs it without autocast (LayerNorm
still accumulates in fp32 inside its kernel). The text features stay fp32
either way; scores and maps are float32.

``compile_model`` compiles the model's forward, compiles it at once on one
batch of zeros (logging how long that took) and falls back to the eager
forward, with one warning line, if compilation fails then or later.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch

from .headclip import HeadCLIP

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16")


def set_precision(model: HeadCLIP, precision: str) -> HeadCLIP:
    """Store the vision tower's weights for ``precision`` ("auto": fp32, "bf16": bf16); in place."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model.clip.visual.to(dtype)
    resized = model.vision._resized_pos_embedding
    if resized is not None:
        model.vision._resized_pos_embedding = resized.to(dtype)
    return model


class FallbackForward:
    """Calls ``compiled``; if it raises, warns once and calls ``eager`` from then on.

    An error that the eager forward raises too is raised as it is.
    """

    def __init__(self, eager: Callable, compiled: Callable):
        self.eager = eager
        self.compiled: Optional[Callable] = compiled

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # dynamo and inductor raise many types
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                log.warning("torch.compile failed, running eager: %s: %s", type(err).__name__, first[:300])
                self.compiled = None
        return self.eager(*args, **kwargs)


def compile_model(model: HeadCLIP, batch_size: int, **compile_kwargs) -> Optional[float]:
    """Compile ``model.forward`` with ``torch.compile`` and run it once on ``batch_size`` zero images.

    Returns the seconds the first call took (compilation), or None when
    compilation failed and the model runs eager. ``compile_kwargs`` go to
    ``torch.compile`` (e.g. ``mode="max-autotune"``).
    """
    eager = model.forward
    if isinstance(eager, FallbackForward):
        raise ValueError("the model is compiled already")
    wrapper = FallbackForward(eager, torch.compile(eager, **compile_kwargs))
    model.forward = wrapper
    size = model.image_size
    images = torch.zeros(batch_size, 3, size, size, dtype=torch.uint8, device=model.image_mean.device)
    start = time.perf_counter()
    model.score(images)
    if model.image_mean.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if wrapper.compiled is None:
        return None
    log.info("torch.compile: forward compiled in %.1f s (batch %d, %d px)", seconds, batch_size, size)
    return seconds


def prepare_for_inference(model: HeadCLIP, precision: str = "auto", compile: bool = False,
                          batch_size: int = 1) -> HeadCLIP:
    """Set the tower's precision and optionally compile the forward; returns ``model``."""
    set_precision(model, precision)
    if compile:
        compile_model(model, batch_size)
    return model
