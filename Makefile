# The two commands a new user needs: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv and install what they need; nothing is assumed pre-installed but Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
# torch first and pinned: here a CPU wheel of 2.13.0 lies on disk; with a GPU, override, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

# The environment defaults of our own processes (telemetry off, quiet) are set in one place,
# pipeline_env.py, which every entry point imports. The one export left here is for a tool that is
# not ours and that make runs directly: pip.
export PIP_DISABLE_PIP_VERSION_CHECK ?= 1

.PHONY: demo deploy test lint venv clean
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# `make demo`: the lora scenario study (LoRA adapters of a longer-pretrained base, in .demo/lora);
# the full fine-tunes of the skills scenario: .venv/bin/python -m flows.demo --scenario skills
demo: venv
	$(PY) -m flows.demo

# The Prefect deployments of prefect.yaml on a running server (PREFECT_API_URL set, see README):
# their params are checked first (the demo's need `make demo`), then the work pool and the
# deployments are created. Start a worker yourself: .venv/bin/prefect worker start --pool metamerge
deploy: venv
	$(PY) -m flows.deployments prefect.yaml
	@test -n "$$PREFECT_API_URL" || { echo "error: PREFECT_API_URL is not set: start 'prefect server start' and export PREFECT_API_URL=http://127.0.0.1:4200/api" >&2; exit 2; }
	$(VENV)/bin/prefect work-pool inspect metamerge >/dev/null 2>&1 || $(VENV)/bin/prefect work-pool create metamerge --type process
	$(VENV)/bin/prefect --no-prompt deploy --all

# The parity tests run the real mergekit, from its own venv so its pins never touch ours.
MERGEKIT_VENV ?= .venv-mergekit
$(MERGEKIT_VENV)/.ready: bench/mergekit_runner.py
	$(PYTHON) bench/mergekit_runner.py ensure $(MERGEKIT_VENV) --lean
	touch $@

# Lint (ruff) and type-check (mypy, the metamerge package) before any test; settings in pyproject.toml.
lint: venv
	$(PY) -m ruff check . && $(PY) -m mypy

test: venv lint $(MERGEKIT_VENV)/.ready
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(MERGEKIT_VENV) .demo
