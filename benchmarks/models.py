"""The packaged real models, shared with the recipes (recipes/packaged_models.py)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))

from packaged_models import smollm2_path  # noqa: E402

__all__ = ["smollm2_path"]
