"""fastattn: fused kernels for the attention modules of convolutional networks.

- `fastattn.reference`: pure-PyTorch reference modules (the oracle), all 32 of the catalogue.
- `fastattn.ops`: torch.library custom ops (`torch.ops.fastattn.*`) with autograd.
- `python -m fastattn info | check`: what is built, and a parity check of the fast paths.
"""
from . import ops, reference
from ._ext import available as extension_available
from .ops import channel_mean

__version__ = "0.1.0"

__all__ = ["reference", "ops", "channel_mean", "extension_available", "__version__"]
