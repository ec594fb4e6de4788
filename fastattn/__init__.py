"""fastattn: fused kernels for the attention modules of convolutional networks.

- `fastattn.reference`: pure-PyTorch reference modules (the oracle), all 32 of the catalogue.
- `fastattn.ops`: torch.library custom ops (`torch.ops.fastattn.*`) with autograd.
- `python -m fastattn info | check`: what is built, and a parity check of the fast paths.
"""
from . import ops, reference
from ._ext import available as extension_available
from .modules import *  # noqa: F401,F403
from .modules import FAST_MODULES
from .ops import channel_mean
from .ops._dispatch import get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    *FAST_MODULES, "FAST_MODULES", "reference", "ops", "channel_mean", "extension_available",
    "set_backend", "get_backend", "use_backend", "__version__",
]
