"""The commands README.md shows, as a user would type them: each line of its ```bash blocks (comments stripped,
split as a shell splits them), and its ```python blocks."""

from __future__ import annotations

import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_text() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        return handle.read()


def code_blocks(language: str, text: str | None = None) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", readme_text() if text is None else text, flags=re.S)


def readme_shell_commands() -> list[list[str]]:
    return [
        words
        for block in code_blocks("bash")
        for line in block.splitlines()
        if (words := shlex.split(line, comments=True))
    ]


def readme_python_blocks() -> list[str]:
    return code_blocks("python")


def makefile_recipe(target: str) -> list[str]:
    """The command lines of a Makefile target's recipe (variables unexpanded)."""
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe
