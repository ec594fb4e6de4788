"""Pure-PyTorch reference modules: the correctness oracle of fastattn.

Each class follows its authors' official code (see MODULES.md in the design notes and each
class docstring); parameters and buffers are registered in the official order so official
checkpoints load by position.
"""
from . import channel, hybrid, other, spatial
from .channel import *  # noqa: F401,F403
from .hybrid import *  # noqa: F401,F403
from .other import *  # noqa: F401,F403
from .spatial import *  # noqa: F401,F403

__all__ = [*channel.__all__, *spatial.__all__, *hybrid.__all__, *other.__all__]
