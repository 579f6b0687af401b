"""Training step time and peak memory of FLoRA against PEFT's LoRA, LoHa and LoKr on a small convolutional network
with depthwise convolutions (MobileNetV2-style inverted residual blocks), every Conv2d adapted.

    python benchmarks/bench_conv.py [--methods lora lora-no-depthwise loha lokr flora] [--rank 4] [--steps 20]
                                    [--reps 3]

Each (method, repetition) runs in a fresh process: build the network (random weights, seed 0), wrap it, then time
AdamW steps of cross-entropy on a fixed random batch (16 x 3 x 64 x 64) after 2 warm-up steps. Step time is the
median step of a process, reported as the median over processes; peak RSS is VmHWM reset after wrapping (Linux only).
PEFT's LoRA accepts a grouped convolution only at a rank divisible by its groups: its depthwise layers get
rank = channels (``rank_pattern``), the smallest it allows; ``lora-no-depthwise`` leaves them out instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def mobilenet_like():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class InvertedResidual(nn.Module):
        def __init__(self, c_in: int, c_out: int, expand: int, stride: int):
            super().__init__()
            hidden = c_in * expand
            self.expand = nn.Conv2d(c_in, hidden, 1)
            self.depthwise = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden)
            self.project = nn.Conv2d(hidden, c_out, 1)
            self.skip = stride == 1 and c_in == c_out

        def forward(self, x):
            y = self.project(F.relu6(self.depthwise(F.relu6(self.expand(x)))))
            return x + y if self.skip else y

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
            self.blocks = nn.Sequential(
                InvertedResidual(32, 32, 4, 1),
                InvertedResidual(32, 64, 4, 2),
                InvertedResidual(64, 64, 4, 1),
                InvertedResidual(64, 96, 4, 2),
            )
            self.head = nn.Linear(96, 10)

        def forward(self, x):
            return self.head(self.blocks(F.relu6(self.stem(x))).mean((2, 3)))

    torch.manual_seed(0)
    return Net()


def make_config(method: str, rank: int, model):
    from peft import LoHaConfig, LoKrConfig, LoraConfig
    from torch import nn

    import subspace_peft

    convs = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    depthwise = {
        name: module.groups
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and module.groups > 1
    }
    if method == "lora":
        return LoraConfig(
            r=rank, lora_alpha=rank, target_modules=convs, rank_pattern=depthwise, alpha_pattern=depthwise
        )
    if method == "lora-no-depthwise":  # what a LoRA user can do at rank r: leave the depthwise convs out
        return LoraConfig(r=rank, lora_alpha=rank, target_modules=[n for n in convs if n not in depthwise])
    if method == "loha":
        return LoHaConfig(r=rank, alpha=rank, target_modules=convs)
    if method == "lokr":
        return LoKrConfig(r=rank, alpha=rank, target_modules=convs)
    if method == "flora":
        return subspace_peft.FLoRAConfig(r=rank, target_modules=convs)  # ranks min(r, size) per mode
    raise ValueError(f"unknown method {method!r}")


def run(method: str, steps: int, rank: int) -> dict:
    import warnings

    import torch
    from peft import get_peft_model

    from harness import peak_rss_kib, reset_peak_rss, timed_steps

    base = mobilenet_like()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LoRA warns that grouped convs cannot merge
        model = get_peft_model(base, make_config(method, rank, base))
    model.train()
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(16, 3, 64, 64, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    reset_peak_rss()

    def step():
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = timed_steps(step, steps)
    return {
        "step_s": step_s,
        "peak_mib": peak_rss_kib() / 1024,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["lora", "lora-no-depthwise", "loha", "lokr", "flora"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run(args.child, args.steps, args.rank)))
        return

    from harness import print_table, run_interleaved

    rows = run_interleaved(__file__, args.methods, args.reps, ["--steps", str(args.steps), "--rank", str(args.rank)])
    print(
        f"\nMobileNetV2-style CNN (4 inverted residual blocks, depthwise 3x3), every Conv2d adapted, r={args.rank}, "
        f"batch 16x3x64x64, AdamW; median of {args.reps} processes\n"
    )
    print_table(rows, "lora")


if __name__ == "__main__":
    main()
