"""Our task arithmetic, TIES and DARE equal mergekit's (https://github.com/arcee-ai/mergekit, a widely used model
merging tool) on the same model folders.

A tiny LlamaForCausalLM (6,224 parameters) is saved with save_pretrained (safetensors) as the base, and twice more
moved by seeded perturbations as two "fine-tunes". mergekit merges the three folders the way its users run it: its
``mergekit-yaml CONFIG OUT`` command (the click entry point, called in this process) on a YAML config naming the
folders, on the CPU in float32. Ours loads the same folders with ``from_pretrained``, builds the task vectors with
``merging.task_vector`` and merges them; every tensor of our merged model must equal the one in mergekit's output
folder within ``TOL`` = 1e-6 (float32 rounding: the two sum and scale in different orders). Measured with mergekit
0.1.5: 0 for task arithmetic and linear DARE, 3.7e-9 for TIES and DARE-TIES, where the merges move the base by 0.02
to 0.05.

How the settings map (mergekit's names on the right; its ``weight`` and ``density`` are per model, the rest shared):

- ``task_arithmetic(scaling=s)``: ``task_arithmetic``, ``weight: s`` for each model (``normalize`` is off by default).
- ``ties_merging(scaling=s, density=d)``: ``ties``, ``density: d``, equal weights, ``normalize: true`` (its default),
  ``lambda: s``. mergekit's TIES divides the agreeing entries by the sum of their weights, so with equal weights its
  ``weight`` cancels and ``lambda`` plays our ``scaling``; ours (peft's) divides by their count and multiplies by
  ``scaling``. Under ``normalize: false`` mergekit sums the agreeing entries instead of averaging them.
- ``dare_merging(scaling=s, drop_rate=p)``: ``dare_linear``, ``density: 1 - p``, ``rescale: false``,
  ``weight: s / (1 - p)``. DARE rescales the kept entries by ``1 / (1 - p)``; mergekit's ``rescale: true`` (its
  default) instead rescales each task-vector tensor so its L1 norm is what it was before the drop, a factor that
  varies from tensor to tensor. With ``rescale: false`` it does not rescale, and the weight carries ``1 / (1 - p)``.
- ``dare_merging(..., use_ties=True)``: ``dare_ties``, ``density: 1 - p``, ``rescale: false``, ``normalize: true``
  (its default is false: it sums the agreeing entries), equal weights, ``lambda: s / (1 - p)``.

DARE drops entries at random. The test records the masks mergekit draws (it samples through ``torch.bernoulli`` in
``mergekit.sparsify.bernoulli``), keyed by the task-vector tensor each one thins, and replays them to our
``dare_merging`` (which samples through ``torch.bernoulli`` in ``peft.utils.merge_utils.random_pruning``): both merges
then drop the same entries, and everything else (the masking, the rescaling, the weighting, TIES' sign election) is
each package's own code. Without the replay the same seed gives the same merge too (mergekit 0.1.5's
``--random-seed S`` and our ``seed=S``): both seed torch's global generator and draw one mask per tensor in the order
of the sorted parameter names, the fine-tunes in the config's order within each.

Where the definitions differ (measured on these models, not asserted): at TIES with density 0.3 and weights 1, ours
with scaling 1 moves the base by up to 0.042 and mergekit's ``normalize: false`` differs from it by up to 0.027 (it
sums where we average); at DARE with p = 0.75 and scaling 0.3 (mergekit's weight 0.3), ours moves the base by up to
0.053 and mergekit's default ``rescale: true`` differs from it by up to 0.028 through the same masks (its per-tensor
L1 factors range from 2.0 to 44 here, where DARE's is 1 / (1 - p) = 4); DARE-TIES under mergekit's defaults
(``rescale: true``, ``normalize: false``) by up to 0.045 (ours moves the base by up to 0.044). And where ``density``
keeps less than one entry of a tensor (``int(density * numel) == 0``, e.g. the 16-entry RMSNorm weights at
``density: 0.05``), mergekit keeps one entry per fine-tune while ours (peft) keeps none and leaves the tensor
unmerged (up to 0.029 apart there); the tests' densities keep at least 4 entries of every tensor.
"""

from __future__ import annotations

import glob
import os
import random
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from peft.utils import merge_utils
from safetensors.torch import load_file

from subspace_peft import merging

from tiny_models import perturbed_copy

INSTALL = "pip install 'mergekit==0.1.5'"
run_yaml = pytest.importorskip(
    "mergekit.scripts.run_yaml", reason=f"the mergekit reference tests need mergekit: {INSTALL}"
)
mergekit_sparsify = pytest.importorskip("mergekit.sparsify", reason=f"needs mergekit: {INSTALL}")
yaml = pytest.importorskip("yaml", reason=f"needs pyyaml: {INSTALL}")

# float32 rounding: the merged values are at most ~1 (the RMSNorm weights), where float32's spacing is 1.2e-7, and the
# two packages apply the same few operations in different orders
TOL = 1e-6


def fine_tune(base, seed: int, scale: float = 0.01):
    """A 'fine-tune': the base moved by a small seeded perturbation (the weights themselves are ~0.02)."""
    return perturbed_copy(base, seed, scale)


def build_models(root):
    """The base and two fine-tunes saved as model folders under ``root``, reloaded; our task vectors."""
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = transformers.LlamaForCausalLM(config)
    folders = {"base": str(root / "base")}
    base.save_pretrained(folders["base"])
    for seed in (1, 2):
        folders[f"tuned{seed}"] = str(root / f"tuned{seed}")
        fine_tune(base, seed).save_pretrained(folders[f"tuned{seed}"])

    def load(name):
        return transformers.LlamaForCausalLM.from_pretrained(folders[name], dtype=torch.float32)

    base = load("base")
    vectors = [merging.task_vector(base, load(name)) for name in ("tuned1", "tuned2")]
    return SimpleNamespace(root=root, folders=folders, base=base, vectors=vectors)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("mergekit"))


def mergekit_yaml(setup, name: str, method: str, model_parameters: dict, parameters: dict, seed: int = 0) -> dict:
    """Runs ``mergekit-yaml CONFIG OUT`` (its click command, in this process) on the base and the two fine-tunes;
    returns the tensors of the merged model it writes."""
    config = {
        "merge_method": method,
        "base_model": setup.folders["base"],
        "models": [
            {"model": setup.folders[tuned], "parameters": dict(model_parameters)} for tuned in ("tuned1", "tuned2")
        ],
        "parameters": parameters,
        "dtype": "float32",
    }
    config_file, out = setup.root / f"{name}.yaml", setup.root / name
    config_file.write_text(yaml.safe_dump(config))
    args = [str(config_file), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):  # --random-seed seeds the global generators: leave them as they were
        run_yaml.main.main(args=[*args, "--random-seed", str(seed)], standalone_mode=False)
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    merged = {}
    for file in sorted(glob.glob(os.path.join(out, "*.safetensors"))):
        merged.update(load_file(file))
    return merged


def max_abs_difference(ours, theirs: dict) -> float:
    state = ours.state_dict()
    assert set(state) == set(theirs)
    return max(float((state[key] - theirs[key]).abs().max()) for key in state)


def assert_equal_to_mergekit(setup, ours, theirs: dict) -> float:
    difference = max_abs_difference(ours, theirs)
    moved = max_abs_difference(setup.base, theirs)
    assert moved > 1000 * TOL, f"the merge barely moved the base ({moved:.2e}): the comparison would prove nothing"
    assert difference <= TOL, f"ours differs from mergekit's merge by {difference:.2e} (tolerance {TOL:.0e})"
    return difference


@pytest.mark.parametrize("scaling", [0.7, -0.4])  # -0.4: task negation
def test_task_arithmetic_equals_mergekit(setup, scaling):
    theirs = mergekit_yaml(setup, f"ta{scaling}", "task_arithmetic", {"weight": scaling}, {})
    assert_equal_to_mergekit(setup, merging.task_arithmetic(setup.base, setup.vectors, scaling=scaling), theirs)


def test_ties_equals_mergekit_with_lambda_as_our_scaling(setup):
    scaling, density = 0.8, 0.3
    # weight 0.5 for both: mergekit's normalisation divides it out again
    theirs = mergekit_yaml(
        setup, "ties", "ties", {"weight": 0.5, "density": density}, {"normalize": True, "lambda": scaling}
    )
    ours = merging.ties_merging(setup.base, setup.vectors, scaling=scaling, density=density)
    assert_equal_to_mergekit(setup, ours, theirs)


class MaskTape:
    """The masks DARE draws, each kept with the task-vector tensor it thins: recorded from mergekit's draws and
    replayed to ours, so both merges drop the same entries."""

    def __init__(self):
        self.masks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (tensor, keep probabilities, mask)
        self.replayed = 0
        self.current = None

    def thinning(self, function):
        """``function(tensor, ...)``, the one that thins a task-vector tensor, noting the tensor for the draw."""

        def thin(tensor, *args, **kwargs):
            self.current = tensor
            try:
                return function(tensor, *args, **kwargs)
            finally:
                self.current = None

        return thin

    def recording(self, bernoulli):
        def record(probabilities, *args, **kwargs):
            mask = bernoulli(probabilities, *args, **kwargs)
            self.masks.append((self.current.detach().clone(), probabilities.clone(), mask.clone()))
            return mask

        return record

    def replaying(self):
        def replay(probabilities, *args, **kwargs):
            found = [(p, mask) for tensor, p, mask in self.masks if torch.equal(tensor, self.current)]
            assert len(found) == 1, "our task-vector tensor is not (exactly once) one mergekit thinned"
            assert torch.equal(probabilities, found[0][0]), "the keep probabilities differ from mergekit's"
            self.replayed += 1
            return found[0][1].clone()

        return replay


@contextmanager
def recording_mergekit_masks(monkeypatch, tape: MaskTape):
    with monkeypatch.context() as patch:
        patch.setattr(mergekit_sparsify, "bernoulli", tape.thinning(mergekit_sparsify.bernoulli))
        patch.setattr(torch, "bernoulli", tape.recording(torch.bernoulli))
        yield


@contextmanager
def replaying_masks_to_ours(monkeypatch, tape: MaskTape):
    with monkeypatch.context() as patch:
        patch.setattr(merge_utils, "random_pruning", tape.thinning(merge_utils.random_pruning))
        patch.setattr(torch, "bernoulli", tape.replaying())
        yield


@pytest.mark.parametrize("use_ties", [False, True])
def test_dare_equals_mergekit_through_the_same_masks(setup, monkeypatch, use_ties):
    scaling, drop_rate = 0.3, 0.75
    density = 1 - drop_rate
    tape = MaskTape()
    with recording_mergekit_masks(monkeypatch, tape):
        if use_ties:
            parameters = {"rescale": False, "normalize": True, "lambda": scaling / density}
            theirs = mergekit_yaml(setup, "dare_ties", "dare_ties", {"weight": 1.0, "density": density}, parameters)
        else:
            model_parameters = {"weight": scaling / density, "density": density}
            theirs = mergekit_yaml(setup, "dare_linear", "dare_linear", model_parameters, {"rescale": False})
    tensors = sum(len(vector) for vector in setup.vectors)
    assert len(tape.masks) == tensors  # one mask per task-vector tensor
    kept = sum(float(mask.sum()) for *_, mask in tape.masks) / sum(mask.numel() for *_, mask in tape.masks)
    assert abs(kept - density) < 0.03  # 12,448 draws: the standard deviation of the kept share is 0.004

    with replaying_masks_to_ours(monkeypatch, tape):
        ours = merging.dare_merging(setup.base, setup.vectors, scaling, drop_rate, seed=0, use_ties=use_ties)
    assert tape.replayed == tensors  # ours drew once per tensor too, and got mergekit's mask each time
    assert_equal_to_mergekit(setup, ours, theirs)

    # mergekit's --random-seed 0 (mergekit_yaml's default) and our seed=0 draw the same masks in the same order
    ours = merging.dare_merging(setup.base, setup.vectors, scaling, drop_rate, seed=0, use_ties=use_ties)
    assert max_abs_difference(ours, theirs) <= TOL, "the same seed no longer gives mergekit's masks: see the docstring"
