"""The recipes' embedded default data set, generated (no download): two- and three-digit additions as question /
answer pairs, a task SmolLM2-135M gets partly right before fine-tuning, so that the metric can move both ways."""

from __future__ import annotations

import random


def arithmetic_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        rows.append({"prompt": f"Question: What is {a} + {b}?\nAnswer:", "answer": f" {a + b}"})
    return rows
