from .config import PiSSAConfig
from .layer import PiSSALayer
from .model import PiSSAModel

__all__ = ["PiSSAConfig", "PiSSALayer", "PiSSAModel"]
