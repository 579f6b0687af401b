"""The code's structure, checked from its source: methods describe themselves (what a method needs, a quantised
base, frozen buffers, ranks from the weights, is a field of its record, so no code outside the method's folder,
``methods.py`` and the recipes' configs tests a method's name, and a new method goes through every guard by its
record alone), and no two modules of the package import each other (lazy imports inside functions included)."""

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


def _module_name(path: str) -> str:
    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return name.removesuffix(".__init__")


def package_imports() -> dict[str, set[str]]:
    """Each module of subspace_peft -> the package's modules it imports (at the top or inside a function)."""
    paths = {
        _module_name(os.path.join(folder, name)): os.path.join(folder, name)
        for folder, _, files in os.walk(os.path.join(ROOT, "subspace_peft"))
        for name in files
        if name.endswith(".py")
    }
    graph = {}
    for module, path in paths.items():
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), path)
        package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                parts = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(parts + ([node.module] if node.module else []))
                # "from .x import y": y when it is a module, else x
                found = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in paths]
                imported.update(found or ([target] if target in paths else []))
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names if alias.name in paths)
        graph[module] = imported - {module}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (Tarjan's strongly connected
    components of more than one module)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(module):
        index[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        on_stack.add(module)
        for other in graph.get(module, ()):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in graph:
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycle_in_the_package():
    graph = package_imports()
    assert "subspace_peft.tuners.pissa.factors" in graph["subspace_peft.tuners.pissa.quant_iters"]
    assert import_cycles(graph) == []
    # the check finds a cycle, including one hidden in a function's lazy import
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_recipes_stay_recipes():
    # what the recipes are built from (the config layer, the checkpoint checks) lives in subspace_peft.recipe_tools;
    # recipes/ holds the recipes and their phases, finetune.py reads as its run
    folder = os.path.join(ROOT, "recipes")
    lines = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                lines[name] = len(handle.read().splitlines())
    assert sum(lines.values()) <= 1600, lines
    assert lines["finetune.py"] <= 400
