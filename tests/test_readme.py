"""The documents' references are real: every test, test file and script README.md and CONTRIBUTING.md cite exists,
and every check of tests/PARITY.md names a test of tests/test_parity.py."""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def functions_in(path: str) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(read(path))) if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("document", ["README.md", "CONTRIBUTING.md"])
def test_every_cited_test_file_script_and_test_function_exists(document):
    cited = set(re.findall(r"`((?:tests|benchmarks|recipes|subspace_peft)/[\w/]+\.py)(?:::(\w+))?", read(document)))
    assert len(cited) >= 5, cited
    for path, function in cited:
        assert os.path.isfile(os.path.join(ROOT, path)), path
        if function:
            assert function in functions_in(path), f"{path}::{function}"


def test_the_parity_checklist_names_real_parity_tests():
    named = set(re.findall(r"`(test_\w+)`", read("tests/PARITY.md")))
    defined = {name for name in functions_in("tests/test_parity.py") if name.startswith("test_")}
    assert named == defined, (named - defined, defined - named)
