"""torch.library custom ops of fastattn (`torch.ops.fastattn.*`).

Each op has a schema, a fake implementation (for torch.compile / export), an autograd formula
and per-device implementations. The public functions here are the functional API.
"""
from .pool import channel_mean

__all__ = ["channel_mean"]
