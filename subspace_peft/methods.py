"""Every method's record, in one list: ``import subspace_peft`` registers each of ours with peft from it, and the
model card (``hub``), the fine-tuning recipe and the README's method table read it. Adding a method is its folder
under ``tuners/`` and one record here.

The tuners' configs read their ``PeftType`` member only when a config is made (``__post_init__``), so importing them
before :func:`subspace_peft.registry.register` adds the members is safe.
"""

from __future__ import annotations

from peft import LoraConfig, LoraModel

from .registry import Method, Paper
from .tuners.effort import EffortConfig, EffortModel
from .tuners.flora import FLoRAConfig, FLoRAModel
from .tuners.pissa import PiSSAConfig, PiSSAModel
from .tuners.svfit import SVFitConfig, SVFitModel

# recipe_learning_rate: the best rate of `python benchmarks/bench_quality.py` for the record's recipe_defaults
# (SmolLM2-135M, all linear layers, 80 steps of batch 8; each with a worse rate on both sides, benchmarks/README.md)
QLORA_RATE = 1e-3  # QLoRA: nf4 base
QPISSA_RATE = 3e-4  # QPiSSA: nf4 residual, 5 quantisation/SVD iterations
# the recipe's QPiSSA alternates quantisation and SVD this many times (PiSSAConfig's residual_quant_iters): 0.850x
# QLoRA's quantisation error on SmolLM2 against 0.930x with 1 (benchmarks/README.md, QPiSSA iterations)
QPISSA_RECIPE_ITERS = 5

LORA = Method(
    "lora",
    LoraConfig,
    LoraModel,
    display_name="LoRA",
    card_fields=("r", "lora_alpha", "rank_pattern", "alpha_pattern"),
    paper=Paper(
        "LoRA: Low-Rank Adaptation of Large Language Models", "Hu et al.", 2021, "https://arxiv.org/abs/2106.09685"
    ),
    recipe_defaults={"r": 16, "lora_alpha": 16, "target_modules": "all-linear"},
    recipe_learning_rate=1e-3,
    recipe_learning_rate_quantized=QLORA_RATE,
    peft_builtin=True,
    quantized_base="on_load",
)
PISSA = Method(
    "pissa",
    PiSSAConfig,
    PiSSAModel,
    display_name="PiSSA",
    card_fields=("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init", "residual_quantization"),
    paper=Paper(
        "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models",
        "Meng et al.",
        2024,
        "https://arxiv.org/abs/2404.02948",
    ),
    recipe_defaults={"r": 16, "lora_alpha": 16, "target_modules": "all-linear", "init": "randomized", "niter": 4},
    recipe_learning_rate=3e-4,
    recipe_learning_rate_quantized=QPISSA_RATE,
    quantized_base="residual",
    frozen_buffers=True,  # A_0, B_0
)
SVFIT = Method(
    "svfit",
    SVFitConfig,
    SVFitModel,
    display_name="SVFit",
    card_fields=("r", "energy", "rank_pattern", "init"),
    paper=Paper(
        "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values",
        "Sun et al.",
        2024,
        "https://arxiv.org/abs/2409.05926",
    ),
    recipe_defaults={"target_modules": "all-linear"},
    recipe_learning_rate=3e-3,
    frozen_buffers=True,  # U, Vh, sigma_0
    ranks_from_weights="energy",
)
FLORA = Method(
    "flora",
    FLoRAConfig,
    FLoRAModel,
    display_name="FLoRA",
    card_fields=("r", "conv_ranks", "scale", "rank_pattern"),
    paper=Paper("FLoRA: Low-Rank Core Space for N-dimension", "Si et al.", 2024, "https://arxiv.org/abs/2405.14739"),
    recipe_defaults={"r": 16, "scale": 1.0, "target_modules": "all-linear"},
    recipe_learning_rate=3e-3,
)
EFFORT = Method(
    "effort",
    EffortConfig,
    EffortModel,
    display_name="Effort",
    card_fields=("residual_rank", "rank_pattern", "init", "orth_weight", "norm_weight"),
    paper=Paper(
        "Orthogonal Subspace Decomposition for Generalizable AI-Generated Image Detection",
        "Yan et al.",
        2025,
        "https://arxiv.org/abs/2411.15633",
    ),
    recipe_defaults={
        "residual_rank": 1,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "orth_weight": 1e4,
        "norm_weight": 1.0,
    },
    recipe_learning_rate=1e-3,
    frozen_buffers=True,  # U_0, S_0, Vh_0
)

METHODS: tuple[Method, ...] = (LORA, PISSA, SVFIT, FLORA, EFFORT)  # the recipe's order
DEFAULT_METHOD = PISSA  # the fine-tuning recipe's default
