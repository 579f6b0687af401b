"""Concrete Task Arithmetic equals FusionBench's (Tang et al.'s own code, fusion-bench 0.2.33) step for step.

A tiny classifier body (Linear, tanh, LayerNorm, Linear: 880 parameters) is fine-tuned on three seeded synthetic
tasks (each with its own head); its task vectors are merged with a Concrete mask learned on unlabelled batches, once
in FusionBench's components (``MaskModel``, ``TaskWiseMergedModel``, ``entropy_loss``, in the loop of its
``ConcreteTaskArithmeticAlgorithmForCLIP``) and once by ``concrete_merge``, with the same Concrete noise: FusionBench's
uniforms are recorded and handed to ours under the name they were drawn for (tests/fusionbench_concrete.py says how;
the draw orders differ, so a shared generator would not do).

Measured here (torch 2.13 CPU, float32, 5 steps): step-1 gradients of the mask logits 2.3e-9 apart (largest
gradient 6.2e-3), logits after 5 steps 9.3e-9 apart (they moved 5.0e-3), merged parameters 1.2e-7, summed entropy
2.4e-7 (50 steps: 5.6e-9, 1.5e-8, 1.2e-7, 4.8e-7). FusionBench's own setup_models/train_mask give the logits of the
component loop here bit for bit.

The returned model: FusionBench's is merged with one Concrete sample (``eval_mask_type: continuous``), as is our
default ``final_mask="sample"``, which equals its model with FusionBench's final noise (1.2e-7). Our option
``final_mask="mean"`` (``sigmoid(logits)``) equals FusionBench's merge of that mask (1.2e-7) and lies 0.073 (max abs
parameter difference) from its sampled model, whose summed entropy on the first batches is 3.2381 against the
mean mask's 3.2986. Smaller differences, inside the tolerances:
FusionBench clamps the uniforms to [1.19e-7, 1 - 1.19e-7], we to [1e-6, 1 - 1e-6] (no draw here lies between);
its entropy takes ``log(p + 1e-8)``, ours ``log_softmax``; its Concrete sample goes through ``probs = sigmoid(logits)``
and back, ours uses the logits.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import types

import pytest
import torch

from fusionbench_concrete import INSTALL, LR, SCALING, NoiseTape, fusionbench_run, max_diff, ours_run, tiny_tasks

pytest.importorskip("fusion_bench", reason=f"FusionBench is not installed: {INSTALL}")

STEPS = 5
GRAD_TOL = 1e-6  # the mask logits' gradient, float32 through two summation orders
LOGIT_TOL = 1e-6  # the mask logits after STEPS Adam steps
STATE_TOL = 1e-6  # the merged parameters (values of order 1)


@pytest.fixture(scope="module")
def runs():
    base, tuned, heads, batches = tiny_tasks()
    tape = NoiseTape()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        reference = fusionbench_run(base, tuned, heads, batches, STEPS, tape=tape)
    ours = ours_run(base, tuned, heads, batches, STEPS, tape=tape, final_mask="sample")
    return dict(base=base, tuned=tuned, heads=heads, batches=batches, tape=tape, reference=reference, ours=ours)


def test_both_sample_from_the_same_uniforms_which_both_clamps_leave_alone(runs):
    tape, reference, ours = runs["tape"], runs["reference"], runs["ours"]
    assert sorted(reference.names) == ours.names and reference.names != ours.names  # same tensors, other order
    assert len(tape.samples) == STEPS + 1  # the training samples and the final one; ours used each draw once
    assert sum(u.numel() for u in tape.samples[0].values()) == 880
    # FusionBench clamps the uniforms to [eps, 1 - eps] (float32 eps 1.19e-7), we to [1e-6, 1 - 1e-6]: no draw of
    # this seed lies between, so the clamps give both the same numbers (a draw there has odds ~2e-6 each)
    uniforms = torch.cat([u.flatten() for sample in tape.samples for u in sample.values()])
    assert float(uniforms.min()) > 1e-6 and float(uniforms.max()) < 1 - 1e-6


def test_the_first_step_gradient_of_the_mask_logits_equals_fusionbench(runs):
    reference, ours = runs["reference"], runs["ours"]
    assert len(reference.grads) == len(ours.grads) == STEPS
    scale = max(float(g.abs().max()) for g in reference.grads[0].values())
    assert scale > 1e-3, scale  # a gradient worth comparing
    diff = max_diff(reference.grads[0], ours.grads[0])
    assert diff <= GRAD_TOL, (diff, scale)
    later = max(max_diff(r, o) for r, o in zip(reference.grads, ours.grads))
    assert later <= GRAD_TOL, later
    # the summed entropy of every step (FusionBench takes log(p + 1e-8), we log_softmax: 1e-8 per class apart)
    assert max(abs(r - o) for r, o in zip(reference.entropy, ours.entropy)) <= 1e-6


def test_the_mask_logits_after_the_steps_equal_fusionbench(runs):
    reference, ours = runs["reference"], runs["ours"]
    moved = max(float(logit.abs().max()) for logit in reference.logits.values())
    assert moved > 0.5 * STEPS * LR, moved  # Adam moved them about lr per step
    diff = max_diff(reference.logits, ours.logits)
    assert diff <= LOGIT_TOL, (diff, moved)


def test_the_merged_model_for_fusionbench_s_final_sample_equals_fusionbench(runs):
    reference, ours, base, tuned = runs["reference"], runs["ours"], runs["base"], runs["tuned"]
    ref_state, our_state = reference.model.state_dict(), ours.model.state_dict()
    diff = max_diff(ref_state, our_state)
    assert diff <= STATE_TOL, diff
    # the mask matters: the merge is far from plain task arithmetic at the same lambda
    plain = {
        name: value + SCALING * sum(t.state_dict()[name] - value for t in tuned)
        for name, value in base.state_dict().items()
    }
    assert max_diff(plain, our_state) > 1e-2


def test_our_mean_mask_is_fusionbench_s_merge_of_sigmoid_logits(runs):
    """``final_mask="mean"`` equals FusionBench's final merge with ``sigmoid(logits)`` in place of
    its Concrete sample; how far that lies from FusionBench's sampled model is measured and printed."""
    base, tuned, heads, batches, tape = (runs[k] for k in ("base", "tuned", "heads", "batches", "tape"))
    with torch.random.fork_rng():
        torch.manual_seed(1)
        expected = fusionbench_run(
            base,
            tuned,
            heads,
            batches,
            STEPS,
            final_mask=lambda mask_model: {n: torch.sigmoid(p) for n, p in mask_model.named_parameters()},
        )
    ours = ours_run(base, tuned, heads, batches, STEPS, tape=tape, final_mask="mean")
    assert max_diff(expected.logits, ours.logits) <= LOGIT_TOL  # the same noise again
    diff = max_diff(expected.model.state_dict(), ours.model.state_dict())
    assert diff <= STATE_TOL, diff
    sampled = runs["reference"].model.state_dict()
    apart = max_diff(sampled, ours.model.state_dict())

    def entropy(model):
        with torch.no_grad():
            return sum(
                float(torch.special.entr(torch.softmax(head(model(b[0])), -1)).sum(-1).mean())
                for head, b in zip(heads, batches)
            )

    print(
        f"mean vs FusionBench's sampled final mask: max abs parameter difference {apart:.4g}; entropy on the "
        f"first batches {entropy(ours.model):.6f} (mean) vs {entropy(runs['reference'].model):.6f} (sample)"
    )
    assert apart > 1e-3  # a real difference: the mean mask is not FusionBench's sample


def test_fusionbench_s_own_setup_and_training_loop_give_the_same_logits(runs):
    """FusionBench's ``setup_models`` and ``train_mask`` themselves (methods of its
    ``ConcreteTaskArithmeticAlgorithmForCLIP``, run on a stand-in for the algorithm object: its own yaml config, a
    model pool of our tiny models, a Fabric that only calls backward, the tasks' heads as ``compute_logits``): the loop
    of tests/fusionbench_concrete.py is FusionBench's bit for bit, and ours equals it within LOGIT_TOL."""
    algorithms = pytest.importorskip(
        "fusion_bench.method.concrete_subspace.clip_concrete_task_arithmetic",
        reason=f"FusionBench's algorithm module needs its full dependencies: {INSTALL}",
    )
    from fusion_bench.constants.paths import DEFAULT_CONFIG_PATH
    from omegaconf import OmegaConf

    config = OmegaConf.load(DEFAULT_CONFIG_PATH / "method" / "concrete_subspace" / "clip_concrete_task_arithmetic.yaml")
    assert (config.lr, config.scaling_factor, config.temperature, config.initial_logits) == (LR, SCALING, 0.5, 0)
    assert (config.optimizer, config.clamp_weights, config.eval_mask_type) == ("adam", False, "continuous")
    config.max_steps = STEPS
    base, tuned, heads, batches = (runs[k] for k in ("base", "tuned", "heads", "batches"))
    names = [f"task{i}" for i in range(len(tuned))]
    loaders = {name: itertools.cycle([(x,) for x in b]) for name, b in zip(names, batches)}

    class Fabric:
        is_global_zero = True

        def setup(self, model, optimizer):
            model.device = torch.device("cpu")  # what Fabric's module wrapper adds
            return model, optimizer

        def backward(self, loss):
            loss.backward()

        def log_dict(self, metrics, step=None):
            pass

    class Pool:
        model_names = names

        def load_model(self, name):
            return copy.deepcopy(base if name == "_pretrained_" else tuned[names.index(name)])

    algorithm = types.SimpleNamespace(
        config=config,
        modelpool=Pool(),
        fabric=Fabric(),
        is_debug_mode=False,
        profile=lambda name: contextlib.nullcontext(),
        get_shuffled_test_loader_iter=lambda task: loaders[task],
        compute_logits=lambda module, images, task: heads[names.index(task)](module(images)),
    )
    cls = algorithms.ConcreteTaskArithmeticAlgorithmForCLIP
    with torch.random.fork_rng():
        torch.manual_seed(1)
        module, mask_model = cls.setup_models(algorithm)
        cls.train_mask(algorithm, module, mask_model)
    logits = {name: p.detach() for name, p in mask_model.named_parameters()}
    assert max_diff(logits, runs["reference"].logits) == 0.0
    assert max_diff(logits, runs["ours"].logits) <= LOGIT_TOL
