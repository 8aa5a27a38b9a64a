"""Model definitions shipped with smchainer (the built-in trainer's network)."""
from smchainer.models.vgg import VGG

__all__ = ["VGG"]
