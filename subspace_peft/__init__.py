"""subspace-peft: subspace fine-tuning methods (PiSSA, SVFit, Effort, FLoRA, ...) as first-class peft methods.

Importing this package registers every method with peft (idempotent), so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` handle our adapter types. Each method is one record
in ``subspace_peft.methods``.
"""

from ._quiet import install_offline_kernel_filters

install_offline_kernel_filters()  # before peft (and so bitsandbytes) is imported

from . import merging  # noqa: E402
from .callbacks import RegulariserCallback, add_regulariser_callback  # noqa: E402
from .export import export_lora  # noqa: E402
from .hub import model_card, push_adapter  # noqa: E402
from .methods import METHODS  # noqa: E402
from .offline_init import init_adapter  # noqa: E402
from .registry import Method, register  # noqa: E402
from .spectrum import LayerSpectrum, Spectrum, spectrum  # noqa: E402
from .tuners.effort import EffortConfig, EffortModel  # noqa: E402
from .tuners.flora import FLoRAConfig, FLoRAModel  # noqa: E402
from .tuners.pissa import PiSSAConfig, PiSSAModel  # noqa: E402
from .tuners.svfit import SVFitConfig, SVFitModel  # noqa: E402

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
