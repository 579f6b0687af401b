"""FLoRA on a convolutional network: adapt the Conv2d layers to a shifted task, keeping each kernel's
(c_out, c_in, k_h, k_w) structure (a Tucker core and one factor per mode) instead of flattening it to a matrix.

A small CNN (built here) is pretrained to tell four stripe orientations apart when they are drawn in the red channel of
noisy 3x16x16 images; the shifted task draws them in the blue channel. FLoRA adapters on the two Conv2d layers (the
head stays frozen) learn the shift. Prints the accuracy before/after and checks merge_and_unload gives the same outputs.

    python examples/flora_conv.py [--pretrain-steps 200] [--steps 150] [--rank 4] [--lr 1e-2]
"""

import argparse
import json
import sys

import torch
from peft import get_peft_model
from torch import nn

from subspace_peft import FLoRAConfig


class ConvNet(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def images(count: int, channel: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images whose ``channel`` holds stripes: horizontal, vertical, diagonal or anti-diagonal (the label)."""
    labels = torch.randint(0, 4, (count,), generator=generator)
    row, col = torch.arange(16).view(16, 1), torch.arange(16).view(1, 16)
    period = torch.randint(3, 6, (count, 1, 1), generator=generator)
    phase = torch.randint(0, 6, (count, 1, 1), generator=generator)
    patterns = torch.stack([row.expand(16, 16), col.expand(16, 16), row + col, row - col + 16]).float()
    stripes = ((patterns[labels] + phase) % period < period / 2).float() * 2 - 1
    x = 0.8 * torch.randn(count, 3, 16, 16, generator=generator)
    x[:, channel] += stripes
    return x, labels


def train(model: nn.Module, channel: int, steps: int, lr: float, generator: torch.Generator) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        x, y = images(64, channel, generator)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    return (model(data[0]).argmax(-1) == data[1]).float().mean().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(":")[0])
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--steps", type=int, default=150, help="FLoRA steps on the shifted task")
    parser.add_argument("--rank", type=int, default=4, help="rank of every mode (capped at the mode's size)")
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    red_test, blue_test = images(2000, 0, generator), images(2000, 2, generator)

    base = ConvNet()
    train(base, channel=0, steps=args.pretrain_steps, lr=3e-3, generator=generator)
    pretrained = {"red": accuracy(base, red_test), "blue": accuracy(base, blue_test)}
    print(f"pretrained on red: accuracy red {pretrained['red']:.3f}, blue {pretrained['blue']:.3f}")

    config = FLoRAConfig(r=args.rank, target_modules=["conv1", "conv2"])  # ranks per mode: (in, out, k_h, k_w)
    model = get_peft_model(base, config)  # zero core: outputs equal the base model's at init
    trainable, total = model.get_nb_trainable_parameters()
    print(f"FLoRA trainable parameters: {trainable:,} of {total:,}")
    train(model, channel=2, steps=args.steps, lr=args.lr, generator=generator)
    adapted = accuracy(model, blue_test)
    print(f"after FLoRA on blue: accuracy blue {pretrained['blue']:.3f} -> {adapted:.3f}")

    with torch.no_grad():
        expected = model(blue_test[0])
        merged = model.merge_and_unload()  # a plain ConvNet again, with the update merged into the kernels
        diff = (merged(blue_test[0]) - expected).abs().max().item()
    print(f"merge_and_unload: {type(merged).__name__}, max |output difference| = {diff:.2e}")
    ok = adapted > pretrained["blue"] + 0.2 and diff <= 1e-4
    result = dict(pretrained_red=pretrained["red"], before=pretrained["blue"], after=adapted, trainable=trainable,
                  merge_max_abs_diff=diff, ok=ok)  # fmt: skip
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
