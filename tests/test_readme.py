"""The README's references are real: every test, test file and script it cites exists."""

from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        return handle.read()


def test_every_cited_test_file_script_and_test_function_exists():
    cited = set(re.findall(r"`((?:tests|benchmarks|recipes)/[\w/]+\.py)(?:::(\w+))?", readme()))
    assert len(cited) >= 10, cited
    for path, function in cited:
        full = os.path.join(ROOT, path)
        assert os.path.isfile(full), path
        if function:
            with open(full, encoding="utf-8") as handle:
                names = {node.name for node in ast.walk(ast.parse(handle.read())) if isinstance(node, ast.FunctionDef)}
            assert function in names, f"{path}::{function}"
