from .config import EffortConfig
from .layer import EffortLayer
from .model import EffortModel

__all__ = ["EffortConfig", "EffortLayer", "EffortModel"]
