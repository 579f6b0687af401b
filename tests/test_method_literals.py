"""Methods describe themselves: what a method needs (a quantised base, frozen buffers, ranks from the weights) is a
field of its record, so no code outside the method's folder, ``methods.py`` and the recipes' configs tests a method's
name. A new method then goes through every guard by its record alone."""

from __future__ import annotations

import ast
import os

import subspace_peft  # noqa: F401  (registers the records)
from subspace_peft.methods import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = {spelling for method in METHODS for spelling in (method.name, method.peft_type)}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                found.add(id(body[0].value))
    return found


def method_name_literals(path: str) -> list[str]:
    """``file:line: 'name'`` for each string constant in ``path``'s code (docstrings aside) that is a method's name."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    skip = _docstrings(tree)
    return [
        f"{os.path.relpath(path, ROOT)}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in NAMES and id(node) not in skip
    ]


def test_no_method_name_is_tested_outside_its_folder_and_its_record():
    allowed = {os.path.join(ROOT, "subspace_peft", "methods.py")}
    allowed_folders = [os.path.join(ROOT, "subspace_peft", "tuners", method.name) for method in METHODS]
    found = []
    for top in ("subspace_peft", "recipes"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            if any(folder.startswith(inside) for inside in allowed_folders):
                continue
            found += [
                hit
                for name in sorted(files)
                if name.endswith(".py") and os.path.join(folder, name) not in allowed
                for hit in method_name_literals(os.path.join(folder, name))
            ]
    assert not found, "method names as literals (use the record's fields):\n" + "\n".join(found)


def test_the_check_finds_a_name_in_code_and_not_in_a_docstring(tmp_path):
    source = tmp_path / "example.py"
    source.write_text('"""About "pissa"."""\n\ndef f(method):\n    """pissa"""\n    return method == "pissa"\n')
    assert method_name_literals(str(source)) == [f"{os.path.relpath(source, ROOT)}:5: 'pissa'"]
