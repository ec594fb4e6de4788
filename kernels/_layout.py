"""Layout helpers shared by the Triton launchers.

A (B, C, H, W) tensor is addressed as (B, C, HW) with strides (sb, sc, shw) whenever its H and W
dimensions can be flattened (NCHW and channels_last both can); kernels then tile a
[BLOCK_C, BLOCK_HW] block and Triton vectorises along whichever of c or hw has stride 1.
"""
from __future__ import annotations

import torch


def flat_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(sb, sc, shw) of a 4-D tensor whose H and W flatten into one strided axis, else None."""
    _, _, H, W = t.shape
    sb, sc, sh, sw = t.stride()
    if H == 1:
        return sb, sc, sw
    if W == 1:
        return sb, sc, sh
    if sh == W * sw:
        return sb, sc, sw
    return None


def flattenable(t: torch.Tensor) -> torch.Tensor:
    """t itself when its H x W flattens (no copy for NCHW or channels_last), else a contiguous copy."""
    return t if flat_strides(t) is not None else t.contiguous()


def tile_sizes(t: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW): wide along the axis that is contiguous in memory."""
    _, sc, shw = flat_strides(t)
    if sc == 1 and shw != 1:        # channels_last: rows of channels are contiguous
        return 64, 16
    return 1, 1024                  # NCHW: planes are contiguous


def num_programs_hint(t: torch.Tensor) -> int:
    """How many programs keep the device busy (a few waves of SMs); 8 on CPU (interpreter)."""
    if t.device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(t.device).multi_processor_count
    return 8


def plane_tile_sizes(t: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) for kernels that walk whole H x W planes per channel: tile_sizes(t), except
    that an NCHW plane of fewer than 1024 positions gets a power-of-two width (at least 16) and the
    1024-element tile holds several channels (a 7 x 7 plane: 16 channels x 64 positions)."""
    BLOCK_C, BLOCK_HW = tile_sizes(t)
    HW = t.shape[2] * t.shape[3]
    if BLOCK_C == 1 and HW < BLOCK_HW:
        BLOCK_HW = max(16, 1 << max(HW - 1, 0).bit_length())
        BLOCK_C = 1024 // BLOCK_HW
    return BLOCK_C, BLOCK_HW
