"""HookedViT: timm Vision Transformers with TransformerLens hook points."""

from .config import HookedViTConfig
from .hooked_vit import HookedViT

__all__ = ["HookedViT", "HookedViTConfig"]
