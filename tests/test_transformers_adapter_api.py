"""transformers' own adapter API (``PreTrainedModel.load_adapter`` / ``add_adapter``) with our methods, as the
README's "works with" table states it: load_adapter loads every method but QPiSSA (refused: nothing would quantise
the residual from the loaded factors); add_adapter is refused by transformers 5 itself with peft 0.21, for LoRA
alike. When a pin moves, these tests fail and the table must be checked again."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from packaging.version import Version
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import LlamaConfig, LlamaForCausalLM

from subspace_peft import EffortConfig, FLoRAConfig, PiSSAConfig, SVFitConfig

from tiny_models import build, perturb_trainable

CONFIGS = {
    "lora": lambda: LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False),
    "pissa": lambda: PiSSAConfig(r=2, target_modules=["c_attn", "c_fc"]),
    "svfit": lambda: SVFitConfig(r=2, target_modules=["c_attn", "c_fc"]),
    "effort": lambda: EffortConfig(residual_rank=2, target_modules=["c_attn", "c_fc"]),
    "flora": lambda: FLoRAConfig(r=2, target_modules=["c_attn", "c_fc"]),
}
IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def trained(base, config):
    model = get_peft_model(base, config)
    perturb_trainable(model, scale=0.05)
    return model.eval()


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_transformers_load_adapter_gives_the_saved_model(method, tmp_path):
    saved = trained(build("gpt2"), CONFIGS[method]())
    saved.save_pretrained(str(tmp_path))
    with torch.no_grad():
        expected = saved(input_ids=IDS).logits
    model = build("gpt2").eval()
    model.load_adapter(str(tmp_path))
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    assert float((out - expected).abs().max() / expected.abs().max()) <= 1e-6


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_transformers_add_adapter_asks_for_a_newer_peft_for_every_method(method):
    assert Version(peft.__version__) < Version("0.22") and Version(transformers.__version__) >= Version("5.0")
    with pytest.raises(ValueError, match=r"PEFT you are using is not compatible, please use a version >= 0.22"):
        build("gpt2").add_adapter(CONFIGS[method]())


def test_transformers_load_adapter_refuses_qpissa_and_leaves_the_model_as_it_was(tmp_path):
    pytest.importorskip("bitsandbytes")

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=64,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
            )
        )

    trained(llama(), PiSSAConfig(r=2, target_modules=["gate_proj"], residual_quantization="nf4")).save_pretrained(
        str(tmp_path)
    )
    model = llama()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"QPiSSA adapters load through peft only.*PeftModel.from_pretrained"):
        model.load_adapter(str(tmp_path))
    assert not any(isinstance(module, BaseTunerLayer) for module in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
