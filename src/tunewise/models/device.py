"""Where a model runs and in what precision, chosen once for training, evaluation and serving.

- CUDA when present: bf16 where the GPU really computes in it (Ampere and newer), else fp16 with
  loss scaling (T4, V100); models load straight onto the GPU(s) in that dtype (`device_map`, one
  shard at a time), never as a full fp32 copy in host memory first.
- Apple `mps` when present: fp32 (bf16/fp16 autocast coverage on mps is partial in torch 2.x).
- Else the CPU: bf16 where it has native bf16 matrix products (about 2.4x over fp32), else fp32.

Out-of-memory errors while loading or training become TunewiseErrors that name the memory needed,
what was free, and the setting to change (exit 2).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from tunewise.errors import TunewiseError


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # compute dtype
    loss_scaling: bool  # fp16 training needs a GradScaler

    @property
    def name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)})"
        return self.device.type

    def device_map(self, *, spread: bool = False):
        """`from_pretrained`'s device_map: the device itself, or "auto" to spread a model larger than
        one GPU over every visible GPU (evaluation and serving; training keeps one device)."""
        if self.device.type == "cpu":
            return None
        if spread and self.device.type == "cuda" and torch.cuda.device_count() > 1:
            return "auto"
        return {"": self.device}


def bf16_on_cpu() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def placement(precision: str = "auto", device: torch.device | None = None) -> Placement:
    """The device and compute dtype to use (`precision`: auto, bf16, fp16, fp32)."""
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        elif torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    if precision == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        elif device.type == "mps":
            dtype = torch.float32
        else:
            dtype = torch.bfloat16 if bf16_on_cpu() else torch.float32
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return Placement(device, dtype, loss_scaling=dtype == torch.float16 and device.type == "cuda")


def weights_bytes(path: Path) -> int:
    """Bytes of a model folder's safetensors files (what loading it needs at its stored dtype)."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


@contextlib.contextmanager
def out_of_memory(what: str, *, device: torch.device, needed: float | None, setting: str, fix: str):
    """Turn a CUDA/MPS out-of-memory error inside the block into a TunewiseError (exit 2)."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        free = free_bytes(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        first = str(err).splitlines()[0][:200]
        need = f"about {needed / 2**30:.1f} GiB needed" if needed else "more memory needed"
        have = f"{free / 2**30:.1f} GiB free on {device}" if free is not None else f"{device} is full"
        raise TunewiseError(f"out of memory {what}: {need}, {have} ({first})", field=setting, fix=fix) from None
