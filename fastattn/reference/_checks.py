"""Input checks shared by the reference modules (and, later, the fast modules).

Every error names the module, the argument, what was expected and what was given,
so a user who wires a module into the wrong place learns why from one message.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(module: str, name: str, x, *, dim: int | None = None, shape_hint: str = "") -> None:
    """Type, float dtype and (optionally) rank of one tensor argument."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{module}: argument '{name}' must be a torch.Tensor, got {type(x).__name__}")
    if dim is not None and x.dim() != dim:
        hint = f" {shape_hint}" if shape_hint else ""
        raise ValueError(
            f"{module}: argument '{name}' must be {dim}-D{hint}, got {x.dim()}-D tensor of shape {tuple(x.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{module}: argument '{name}' must be a floating-point tensor "
            f"(float32, float16, bfloat16 or float64), got {x.dtype}"
        )


def check_feature_map(module: str, x, *, channels: int | None = None, name: str = "x") -> None:
    """A (B, C, H, W) float feature map, with C == channels when given."""
    check_tensor(module, name, x, dim=4, shape_hint="(B, C, H, W)")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{module}: argument '{name}' must have {channels} channels (dim 1), "
            f"got {x.shape[1]} (shape {tuple(x.shape)})"
        )


def check_same_shape(module: str, name: str, y: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if y.shape != ref.shape:
        raise ValueError(
            f"{module}: argument '{name}' must have the shape of '{ref_name}' {tuple(ref.shape)}, got {tuple(y.shape)}"
        )


def check_config(module: str, name: str, ok: bool, expected: str, given) -> None:
    """A constructor argument that the module cannot take."""
    if not ok:
        raise ValueError(f"{module}: argument '{name}' must be {expected}, got {given!r}")


def like_input(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Give a 4-D output the memory format of the input (channels_last stays channels_last).

    Reshapes and permutes inside some modules (SGE, SA-Net, Triplet) drop the format.
    """
    if out.dim() == 4 and x.dim() == 4 and is_channels_last(x) and not is_channels_last(out):
        return out.contiguous(memory_format=torch.channels_last)
    return out


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a channels_last tensor that is not also plain contiguous (C == 1 or H == W == 1 are both)."""
    return (
        x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    )
