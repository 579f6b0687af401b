"""subspace-peft: subspace fine-tuning methods (PiSSA, SVFit, Effort, FLoRA, ...) as first-class peft methods.

Importing this package registers every method with peft (idempotent), so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` handle our adapter types. Each method is one record
in ``subspace_peft.methods``.
"""

from . import merging
from .callbacks import RegulariserCallback, add_regulariser_callback
from .export import export_lora
from .hub import model_card, push_adapter
from .methods import METHODS
from .offline_init import init_adapter
from .registry import Method, register
from .spectrum import LayerSpectrum, Spectrum, spectrum
from .tuners.effort import EffortConfig, EffortModel
from .tuners.flora import FLoRAConfig, FLoRAModel
from .tuners.pissa import PiSSAConfig, PiSSAModel
from .tuners.svfit import SVFitConfig, SVFitModel

for _method in METHODS:
    register(_method)

from importlib.metadata import PackageNotFoundError, version  # noqa: E402

try:
    __version__ = version("subspace-peft")  # the one version, pyproject.toml's
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.1.0.dev0"
__all__ = [
    "EffortConfig",
    "EffortModel",
    "FLoRAConfig",
    "FLoRAModel",
    "PiSSAConfig",
    "PiSSAModel",
    "SVFitConfig",
    "SVFitModel",
    "LayerSpectrum",
    "Method",
    "RegulariserCallback",
    "Spectrum",
    "add_regulariser_callback",
    "export_lora",
    "init_adapter",
    "merging",
    "model_card",
    "push_adapter",
    "register",
    "spectrum",
    "__version__",
]
