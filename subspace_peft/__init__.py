"""subspace-peft: subspace fine-tuning methods (PiSSA, SVFit, Effort, FLoRA, ...) as first-class peft methods.

Importing this package registers every method with peft (idempotent), so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` handle our adapter types.
"""

from .registry import add_peft_type_member

# PeftType members must exist before the config classes below are used.
for _name in ("PISSA", "SVFIT", "EFFORT", "FLORA"):
    add_peft_type_member(_name)

from . import merging  # noqa: E402
from .callbacks import RegulariserCallback, add_regulariser_callback  # noqa: E402
from .export import export_lora  # noqa: E402
from .hub import model_card, push_adapter  # noqa: E402
from .registry import Method, register  # noqa: E402
from .spectrum import LayerSpectrum, Spectrum, spectrum  # noqa: E402
from .tuners.effort import EffortConfig, EffortModel  # noqa: E402
from .tuners.flora import FLoRAConfig, FLoRAModel  # noqa: E402
from .tuners.pissa import PiSSAConfig, PiSSAModel  # noqa: E402
from .tuners.svfit import SVFitConfig, SVFitModel  # noqa: E402

register(Method("pissa", PiSSAConfig, PiSSAModel))
register(Method("svfit", SVFitConfig, SVFitModel))
register(Method("effort", EffortConfig, EffortModel))
register(Method("flora", FLoRAConfig, FLoRAModel))

__version__ = "0.1.0"
__all__ = [
    "EffortConfig", "EffortModel", "FLoRAConfig", "FLoRAModel", "PiSSAConfig", "PiSSAModel", "SVFitConfig", "SVFitModel",
    "LayerSpectrum", "RegulariserCallback", "Spectrum", "add_regulariser_callback", "export_lora", "merging", "model_card", "push_adapter", "spectrum", "__version__",
]
