"""Model merging: task vectors from fine-tuned models or adapters; task arithmetic, TIES, DARE; AdaMerging
(task- and layer-wise); Concrete Task Arithmetic and Concrete AdaMerging. ``MERGE_METHODS`` names each with its
parameter schema; ``merge`` runs one by name."""

from .adaptation import Plateau, prediction_entropy
from .adaptive_merging import AdaMergingResult, adamerging
from .baselines import choose_scaling, dare_merging, merge_task_vectors, task_arithmetic, ties_merging
from .concrete import ConcreteMergeResult, concrete_merge
from .registry import MERGE_METHODS, Merged, MergeMethod, Parameter, merge, merge_method
from .task_vectors import TaskVector, adapter_task_vector, task_vector

__all__ = [
    "MERGE_METHODS",
    "AdaMergingResult",
    "ConcreteMergeResult",
    "MergeMethod",
    "Merged",
    "Parameter",
    "Plateau",
    "TaskVector",
    "adamerging",
    "adapter_task_vector",
    "choose_scaling",
    "concrete_merge",
    "dare_merging",
    "merge",
    "merge_method",
    "merge_task_vectors",
    "prediction_entropy",
    "task_arithmetic",
    "task_vector",
    "ties_merging",
]
