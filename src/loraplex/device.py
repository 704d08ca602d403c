"""Where a command computes: `--device auto|cpu|cuda|cuda:N|mps`, one parser and one resolver for all commands.

    auto    cuda (the current CUDA device) when torch sees one, else cpu; mps is never picked implicitly
    cpu     the CPU
    cuda    the current CUDA device (cuda:0 unless torch.cuda.set_device chose another)
    cuda:N  CUDA device N
    mps     Apple's Metal device (where torch has it)

A device that is spelled right but absent raises DeviceError when resolved, naming the devices present.
"""

from __future__ import annotations

import re

import torch

from .errors import DeviceError

DEVICE_HELP = "auto (cuda when present, else cpu), cpu, cuda, cuda:N or mps"
_SPEC = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def parse_device(text: str) -> str:
    """The --device value, normalized (lower case, no spaces); DeviceError unless it is one of DEVICE_HELP."""
    spec = text.strip().lower()
    if not _SPEC.fullmatch(spec):
        raise DeviceError(f"--device: expected {DEVICE_HELP}, got {text!r}")
    return spec


def present() -> list[str]:
    """The devices torch can use here, e.g. ['cpu', 'cuda:0', 'cuda:1']."""
    out = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    return out + (["mps"] if mps is not None and mps.is_available() else [])


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch.device for a --device value (see the module doc); DeviceError if it is not present."""
    spec = parse_device(spec)
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    device = torch.device(spec)
    name = spec if device.index is not None or device.type != "cuda" else "cuda:0"
    if name not in present():
        raise DeviceError(f"--device {spec}: torch sees no such device here (present: {', '.join(present())}); "
                          "pick one of those, or 'auto'")
    return device
