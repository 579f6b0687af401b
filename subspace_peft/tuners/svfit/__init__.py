from .config import SVFitConfig
from .layer import SVFitLayer
from .model import SVFitModel

__all__ = ["SVFitConfig", "SVFitLayer", "SVFitModel"]
