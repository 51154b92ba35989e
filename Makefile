# make demo      -> builds .venv/ if needed, then runs the README's main job on the embedded model
# make test      -> builds .venv/ if needed, then lint + lock check + the whole test suite and the doctests,
#                   on TEST_WORKERS pytest workers (default 2; TEST_WORKERS=0: one process, e.g. for --pdb)
# make test-fast -> the unit tests and doctests only (no processes, servers, training or notebooks), ~1 min
# make lock      -> re-resolves poetry.lock (LOCK_ARGS=--regenerate to take the newest versions the ranges
#                   allow) and rewrites constraints.txt from it; commit both once `make test` passes on them
#
# .venv/ holds exactly the versions in poetry.lock, every package but torch hash-checked against it: pip
# installs the lock's export (with hashes, no dependency resolution), then the project, then checks. The
# venv is rebuilt only when pyproject.toml, poetry.lock or constraints.txt change, so a second call takes
# seconds.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONSTRAINTS := constraints.txt
# torch goes in first, at the lock's version (read from constraints.txt: one place): pip here takes the
# local CPU wheel of that version, and on a GPU machine the same line takes PyPI's CUDA build of it.
TORCH_SPEC := $(shell sed -n 's/^\(torch==[^ ;]*\).*/\1/p' $(CONSTRAINTS))
POETRY_SPEC ?= poetry==2.5.1
EXPORT_SPEC ?= poetry-plugin-export==1.10.1
POETRY := $(VENV)/poetry/bin/poetry
# named after the versions, so changing either spec reinstalls them
POETRY_STAMP := $(VENV)/poetry/.installed-$(subst ==,-,$(POETRY_SPEC))-$(subst ==,-,$(EXPORT_SPEC))
LOCK_ARGS ?=
# The lock's pins for pip. torch's CUDA runtime (nvidia-cu*, nvidia-nccl..., cuda-*, triton; not nvitop's
# nvidia-ml-py) is left out: the torch wheel pins it exactly itself, the CPU wheel needs none of it, and
# poetry locks some of it twice.
CUDA_RUNTIME := ^(cuda-|triton==|nvidia-(cu|nccl|nvjitlink|nvshmem|nvtx))
EXPORT = $(POETRY) export -f constraints.txt --all-extras --without-hashes --without-urls | grep -v -E '$(CUDA_RUNTIME)'
# The same pins with the lock's hashes, for pip's hash-checking mode; torch goes too (the CPU wheel is
# another file than the one the lock hashes). A package's hashes sit on its continuation lines. They go
# in before torch: pip checks hashes only of what it downloads, so torch's own dependencies (sympy,
# jinja2, filelock...) must already be there, hash-checked, when torch's install would resolve them.
LOCKED_REQS := $(VENV)/locked-requirements.txt
EXPORT_HASHED = $(POETRY) export -f requirements.txt --all-extras --without-urls | \
	awk '/^[^ ]/ { skip = ($$0 ~ /$(CUDA_RUNTIME)|^torch==/) } !skip'
PYTEST_ARGS ?=

# The full GSM8K, when this machine has it beside the checkout: tests and benches use it,
# and skip what needs it when it is absent. An explicit SYNTHTUNE_GSM8K_DIR wins.
SHARED_GSM8K := $(wildcard $(abspath ../shared/data/gsm8k))
ifneq ($(SHARED_GSM8K),)
export SYNTHTUNE_GSM8K_DIR ?= $(SHARED_GSM8K)
endif

.PHONY: setup demo test test-fast fuzz lint lock lock-check clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml poetry.lock $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "synthtune needs Python 3.10+, found " + sys.version' 
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -n "$(TORCH_SPEC)" || { echo "$(CONSTRAINTS) pins no torch: run make lock" >&2; exit 1; }
	@$(MAKE) --no-print-directory $(POETRY_STAMP)
	@$(EXPORT_HASHED) > $(LOCKED_REQS)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r $(LOCKED_REQS)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(BIN)/python -m pip check
	@$(BIN)/python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'
	@touch $@

# poetry (and its export plugin) live in their own venv so their dependencies never bend the project's.
$(POETRY_STAMP):
	@test -x $(VENV)/poetry/bin/python || $(PYTHON) -m venv $(VENV)/poetry
	$(VENV)/poetry/bin/python -m pip install --quiet --disable-pip-version-check "$(POETRY_SPEC)" "$(EXPORT_SPEC)"
	@touch $@

# Re-resolve, then export; `make test` must pass on the new set before both files are committed.
lock: $(POETRY_STAMP)
	$(POETRY) lock $(LOCK_ARGS)
	$(EXPORT) > $(CONSTRAINTS)

demo: $(STAMP)
	$(BIN)/synthtune demo --config configs/demo.yaml

# poetry.lock matches pyproject.toml, and constraints.txt is exactly what the lock exports (a pin edited
# in either file by hand, or a lock refreshed without re-exporting, fails here with what to run).
lock-check: $(STAMP)
	$(POETRY) check --lock
	@$(EXPORT) | diff -u $(CONSTRAINTS) - >/dev/null || { $(EXPORT) | diff -u $(CONSTRAINTS) - | head -20; \
		echo "$(CONSTRAINTS) does not match poetry.lock: run make lock (then make test) and commit both" >&2; exit 1; }

lint: $(STAMP)
	$(BIN)/ruff check .

# Two pytest workers (pytest-xdist; the reference machine has 2 cores), each with one torch thread:
# most of the suite is subprocesses (launches, servers, notebooks, the CLI) and small-model torch, so
# two workers keep both cores busy where one left a core idle; two workers of two threads each thrash.
# PASSIVE: an idle OpenMP thread sleeps instead of spinning on a core another process needs.
# worksteal gives each worker one half of the list; tests/conftest.py puts the launch-heavy modules first,
# so one worker starts on them and the other on the unit tests, then takes the back half of the busy
# worker's queue again and again: both end on short tests, not one on a long launch while the other idles.
TEST_WORKERS ?= 2
test: $(STAMP) lock-check lint
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest --hypothesis-profile=gate -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# Tests marked `integration` (pyproject.toml) are the slow tier: they launch the CLI, servers and
# multi-rank runs, train, or execute the notebooks. What is left answers in about a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

# The property tests with fresh random examples (make test replays one fixed draw of them).
fuzz: $(STAMP)
	$(BIN)/python -m pytest --hypothesis-profile=explore tests/test_fuzz_*.py $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
