"""The packaged real models, shared with the recipes (subspace_peft/packaged_models.py)."""

from subspace_peft.packaged_models import smollm2_path

__all__ = ["smollm2_path"]
