# make demo      -> builds .venv/ if needed, then runs the README's main job on the embedded model
# make test      -> builds .venv/ if needed, then lint + lock check + the whole test suite and the doctests
# make test-fast -> the unit tests and doctests only (no processes, servers, training or notebooks), ~1 min
#
# The venv is rebuilt only when pyproject.toml changes, so a second call takes seconds.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch goes in first and by exact version: pip here takes the local CPU wheel, and on a GPU
# machine the same line takes PyPI's CUDA build. The project's ranges then admit it as is.
TORCH_SPEC ?= torch==2.13.0
POETRY_SPEC ?= poetry==2.5.1
PYTEST_ARGS ?=

# The full GSM8K, when this machine has it beside the checkout: tests and benches use it,
# and skip what needs it when it is absent. An explicit SYNTHTUNE_GSM8K_DIR wins.
SHARED_GSM8K := $(wildcard $(abspath ../shared/data/gsm8k))
ifneq ($(SHARED_GSM8K),)
export SYNTHTUNE_GSM8K_DIR ?= $(SHARED_GSM8K)
endif

.PHONY: setup demo test test-fast lint lock-check clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "synthtune needs Python 3.10+, found " + sys.version' 
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# poetry lives in its own venv so its dependencies never bend the project's.
	@test -x $(VENV)/poetry/bin/poetry || { $(PYTHON) -m venv $(VENV)/poetry && \
		$(VENV)/poetry/bin/python -m pip install --quiet --disable-pip-version-check "$(POETRY_SPEC)"; }
	@$(BIN)/python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'
	@touch $@

demo: $(STAMP)
	$(BIN)/synthtune demo --config configs/demo.yaml

lock-check: $(STAMP)
	$(VENV)/poetry/bin/poetry check --lock

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lock-check lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Tests marked `integration` (pyproject.toml) are the slow tier: they launch the CLI, servers and
# multi-rank runs, train, or execute the notebooks. What is left answers in about a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
