"""What a forward pass costs: FLOPs per image, images/s, achieved TFLOP/s and % of the card's peak.

FLOPs are counted by ``torch.utils.flop_counter`` (matrix products,
convolutions and attention; elementwise work is not counted) on one scored
batch. Peaks are the cards' dense (no sparsity) bf16 tensor-core figures from
NVIDIA's datasheets; on a card not in the table only TFLOP/s is reported.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .backbone import needs_quick_gelu, register_model_configs
from .config import HeadCLIPConfig
from .headclip import HeadCLIP

# Dense bf16 tensor-core peak in TFLOP/s, by the model token of the card's name
# ("NVIDIA H100 80GB HBM3" -> "H100"). H100 is the SXM figure; H100 PCIe and NVL
# cards have lower peaks and are reported as unknown.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0}
_OTHER_H100S = {"PCIe", "NVL"}


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    """The card's dense bf16 peak in TFLOP/s, or None for a card not in the table (or a CPU)."""
    tokens = set(device_name.replace("-", " ").split())
    if "H100" in tokens and tokens & _OTHER_H100S:
        return None
    for model, peak in PEAK_BF16_TFLOPS.items():
        if model in tokens:
            return peak
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def architecture_config(backbone: str, pretrained_arch: Optional[str], image_size: int,
                        **changes) -> HeadCLIPConfig:
    """A random-weight config with the architecture the named pretrained weights use.

    OpenAI's weights ("openai") need QuickGELU; random weights alone would
    build the tower with nn.GELU. Nothing is downloaded.
    """
    register_model_configs()
    quick_gelu = needs_quick_gelu(backbone, pretrained_arch)
    return HeadCLIPConfig(backbone=backbone, pretrained=None, image_size=image_size, quick_gelu=quick_gelu,
                          **changes)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_image(model: HeadCLIP, images: torch.Tensor) -> float:
    """FLOPs of ``model.score`` per image, counted on ``images`` (uint8 or normalised, on the model's device)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.score(images)  # fills the text-feature cache, which scoring reuses
    counter = FlopCounterMode(display=False)
    with counter:
        model.score(images)
    return counter.get_total_flops() / images.shape[0]


def images_per_second(model: HeadCLIP, images: torch.Tensor, repeats: int, warmup: int = 2,
                      clock=time.perf_counter) -> float:
    """Images/s of ``model.score`` on a batch already on the device; one sync after the timed loop.

    ``clock``: wall time by default; ``time.process_time`` (this process's CPU
    seconds) compares CPU forwards on a shared machine.
    """
    device = images.device
    for _ in range(warmup):
        model.score(images)
    synchronize(device)
    start = clock()
    for _ in range(repeats):
        model.score(images)
    synchronize(device)
    return repeats * images.shape[0] / (clock() - start)


def top_kernels(model: HeadCLIP, images: torch.Tensor, rows: int = 12) -> str:
    """A ``torch.profiler`` table of one scored batch's operators, by their own device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = images.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    model.score(images)
    synchronize(images.device)
    with profile(activities=activities) as prof:
        model.score(images)
        synchronize(images.device)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)


@dataclass
class ForwardProfile:
    """One measured configuration of the forward."""

    device: str
    batch_size: int
    image_size: int
    flops_per_image: float
    images_per_second: float
    peak_tflops: Optional[float]

    @property
    def tflops(self) -> float:
        """Achieved TFLOP/s: counted FLOPs per image times images/s."""
        return self.flops_per_image * self.images_per_second / 1e12

    @property
    def percent_of_peak(self) -> Optional[float]:
        return None if self.peak_tflops is None else 100.0 * self.tflops / self.peak_tflops

    def summary(self) -> str:
        peak = (f"{self.percent_of_peak:.1f} % of the {self.peak_tflops:.0f} TFLOP/s bf16 peak"
                if self.peak_tflops is not None else "peak unknown for this device")
        return (f"{self.flops_per_image / 1e9:.1f} GFLOP/image, {self.images_per_second:.2f} images/s, "
                f"{self.tflops:.3f} TFLOP/s ({peak})")


def profile_forward(model: HeadCLIP, batch_size: int, repeats: int, compile: bool = False,
                    seed: int = 0) -> tuple[ForwardProfile, str]:
    """Measure ``model.score`` on one random uint8 batch on the model's device.

    FLOPs are counted on the eager forward; with ``compile`` the forward is
    then compiled (see :func:`headclip.model.inference.compile_model`) before
    it is timed. Returns the profile and the top-kernel table of one batch.
    """
    device = model.image_mean.device
    size = model.image_size
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator).to(device)
    flops = flops_per_image(model, images)
    if compile:
        from .inference import compile_model

        compile_model(model, batch_size)
    rate = images_per_second(model, images, repeats)
    name = device_name(device)
    table = top_kernels(model, images)
    return ForwardProfile(name, batch_size, size, flops, rate, peak_bf16_tflops(name)), table


def profile_report(backbone: str, pretrained_arch: Optional[str], image_size: int, batch_size: int,
                   device: torch.device, precision: str = "auto", compile: bool = False,
                   repeats: Optional[int] = None) -> list[str]:
    """Build ``backbone`` with the architecture of ``pretrained_arch``'s weights (random values), profile
    its forward and return the report's lines."""
    from .factory import create_model
    from .inference import set_precision

    config = architecture_config(backbone, pretrained_arch, image_size)
    model = set_precision(create_model(config, device=device), precision)
    repeats = repeats or (max(2, 32 // batch_size) if device.type == "cpu" else 20)
    result, table = profile_forward(model, batch_size, repeats, compile=compile)
    return [
        f"profile: {backbone} (architecture of {pretrained_arch or 'random'} weights, "
        f"quick_gelu={model.config.quick_gelu}) at {image_size} px, batch {batch_size}, precision {precision}, "
        f"compile={compile}, {result.device}, torch {torch.__version__}",
        result.summary(),
        "top operators of one batch:",
        table,
    ]
