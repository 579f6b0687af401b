"""No lines the user did not ask for on CPUs with AVX512-BF16 when the Hub is off.

bitsandbytes >= 0.50, when imported (``import peft`` imports it), asks the Hub for a CPU kernel
(``kernels-community/quantization-bitsandbytes``, through the ``kernels`` package) on CPUs with AVX512-BF16. With
``HF_HUB_OFFLINE=1`` no request is made: the kernel comes from the local Hub cache or not at all, and two lines say
so (``kernels``: "Skipping publisher trust check for '<that repo>' because Hugging Face Hub is in offline mode";
bitsandbytes: "Failed to load CPU gemm_4bit_forward from kernels-community: ..." when it is not cached, after which it
uses its built-in kernel). The filters below drop those two lines, for that repository, when the Hub is off, and only
then: online, the request and every line are bitsandbytes' and kernels' own. ``import subspace_peft`` installs them
before it imports peft.
"""

from __future__ import annotations

import logging
import os
import sys

BITSANDBYTES_KERNEL_REPO = "kernels-community/quantization-bitsandbytes"
# (logger, start of the message) of each line the offline import of bitsandbytes prints
OFFLINE_IMPORT_LINES = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    ("kernels._internals.hf_hub", f"Skipping publisher trust check for '{BITSANDBYTES_KERNEL_REPO}'"),
)


def hub_offline() -> bool:
    """huggingface_hub's offline flag (its variable while huggingface_hub is not imported)."""
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        return bool(constants.HF_HUB_OFFLINE)
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


class OfflineKernelLineFilter(logging.Filter):
    """Drops one logger's line about bitsandbytes' CPU kernel while the Hub is off (HF_HUB_OFFLINE=1)."""

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith(self.start) and hub_offline())


def install_offline_kernel_filters() -> None:
    for logger_name, start in OFFLINE_IMPORT_LINES:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, OfflineKernelLineFilter) for f in logger.filters):
            logger.addFilter(OfflineKernelLineFilter(start))
