"""What recipes/finetune.py and recipes/merge.py are built from, kept out of the recipes as torchtune keeps its config
and checkpointing in ``torchtune.config`` and ``torchtune.training`` (needs the ``train`` extra: PyYAML):

- :mod:`.config`: the YAML loader (:class:`RecipeLoader`, ``1e-4`` a number), the recipe dataclass built from the file
  and the flags (:func:`build_recipe`), the checks, and :class:`RecipeError`, the one-line error every bad input
  gets, located (``file:line`` or ``--flag``) in one place;
- :mod:`.arguments`: :class:`RecipeArgumentParser`, the recipes' one command line (HfArgumentParser over the recipe's
  dataclass and TrainingArguments, over the YAML file);
- :mod:`.checkpoints`: :func:`last_complete_checkpoint`, the newest ``checkpoint-N`` Trainer can resume from exactly
  (transformers' ``get_last_checkpoint`` takes the newest, complete or not), checked without unpickling anything.
"""

from .arguments import RecipeArgumentParser
from .checkpoints import checkpoint_problem, last_complete_checkpoint
from .config import RecipeError, RecipeLoader, build_recipe, located

__all__ = [
    "RecipeArgumentParser",
    "RecipeError",
    "RecipeLoader",
    "build_recipe",
    "checkpoint_problem",
    "last_complete_checkpoint",
    "located",
]
