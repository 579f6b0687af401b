"""The documents' references are real: every test, test file, script and config README.md, CONTRIBUTING.md and the
pages under docs/ cite exists, their relative links lead to files (and, from docs/, to headings) that exist, and
every check of tests/PARITY.md names a test of tests/test_parity.py."""

from __future__ import annotations

import ast
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# one page per method and per topic, which README.md's method table links to
PAGES = (
    "pissa.md",
    "svfit.md",
    "flora.md",
    "effort.md",
    "merging.md",
    "recipes.md",
    "loading-and-sharing.md",
    "big-models.md",
)
DOCS = sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "*.md")))
DOCUMENTS = ["README.md", "CONTRIBUTING.md", *DOCS]

# a path under one of these folders, anywhere in the text (prose, `code`, a command such as
# `python benchmarks/bench_quality.py --quant-errors`), optionally with ::test_name
CITED = re.compile(
    r"(?<![\w./-])((?:tests|benchmarks|recipes|subspace_peft)/[\w/.-]*\w\.(?:py|yaml|md|json|png))(?:::(\w+))?"
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def functions_in(path: str) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(read(path))) if isinstance(node, ast.FunctionDef)}


def heading_anchors(path: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation but '-' and '_' dropped, spaces '-'."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", read(path), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_the_docs_folder_has_every_page():
    assert set(PAGES) <= {os.path.basename(path) for path in DOCS}, DOCS


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_cited_test_file_script_and_test_function_exists(document):
    cited = set(CITED.findall(read(document)))
    assert len(cited) >= (5 if document in ("README.md", "CONTRIBUTING.md") else 1), cited
    for path, function in cited:
        assert os.path.isfile(os.path.join(ROOT, path)), f"{document} cites {path}"
        if function:
            assert function in functions_in(path), f"{document} cites {path}::{function}"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_relative_link_leads_to_a_file(document):
    for target in LINK.findall(read(document)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address, or a heading of the document itself
        path, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(document), path))
        assert os.path.exists(os.path.join(ROOT, linked)), f"{document} links to {target}"
        if anchor and document.startswith("docs") and linked.endswith(".md"):
            assert anchor in heading_anchors(linked), f"{document} links to {target}: no such heading"


def test_the_parity_checklist_names_real_parity_tests():
    named = set(re.findall(r"`(test_\w+)`", read("tests/PARITY.md")))
    defined = {name for name in functions_in("tests/test_parity.py") if name.startswith("test_")}
    assert named == defined, (named - defined, defined - named)


@pytest.mark.parametrize("document", [*DOCUMENTS, "examples/README.md"])
def test_every_python_block_is_python_and_names_only_what_the_package_exports(document):
    """Each ```python block parses, and every ``subspace_peft.X`` / ``from subspace_peft import X`` it uses exists."""
    import importlib

    for block in re.findall(r"```python\n(.*?)```", read(document), flags=re.S):
        tree = ast.parse(block)  # a SyntaxError names the document's block
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("subspace_peft"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{document}: from {node.module} import {alias.name}"
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "subspace_peft"
            ):
                assert hasattr(importlib.import_module("subspace_peft"), node.attr), (
                    f"{document}: subspace_peft.{node.attr}"
                )
