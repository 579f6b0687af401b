from .config import FLoRAConfig
from .layer import FLoRALayer
from .model import FLoRAModel

__all__ = ["FLoRAConfig", "FLoRALayer", "FLoRAModel"]
