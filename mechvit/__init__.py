"""mechvit: mechanistic interpretability for Vision Transformers."""

from transformer_lens.ActivationCache import ActivationCache

from .model import HookedViT, HookedViTConfig
from .runtime import keep_freed_memory

__version__ = "0.1.0"


def corrupt(images, name, severity, *, seed=None, generator=None):
    """Corrupt a float NCHW batch in [0, 1]; see :func:`mechvit.corruptions.corrupt`."""
    from .corruptions import corrupt as _corrupt

    return _corrupt(images, name, severity, seed=seed, generator=generator)


__all__ = ["ActivationCache", "HookedViT", "HookedViTConfig", "corrupt", "keep_freed_memory", "__version__"]
