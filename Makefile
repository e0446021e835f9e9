# Entry points: `make demo` and `make test`. Both create .venv on first use.

# The interpreter: the first of python3.12 and python3.11 that runs here (Ubuntu 24.04 ships
# only 3.12, Debian 12 only 3.11). Each candidate is run, not just looked up on PATH: a pyenv
# shim exists for every installed version but fails outside the versions it is set to.
# `make PY=/path/to/python3.X ...` overrides the choice.
PY_CANDIDATES ?= python3.12 python3.11
ifndef PY
PY := $(firstword $(foreach p,$(PY_CANDIDATES),$(shell $(p) -c "import sys; \
	assert sys.version_info[:2] in ((3, 11), (3, 12))" >/dev/null 2>&1 && echo $(p))))
endif
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The two ends of the supported megatron-core range (pyproject.toml): .venv holds the oldest,
# .venv-mcore-latest the newest, and `make test` runs both.
MCORE_OLDEST := 0.16.1
MCORE_LATEST := 0.19.2
LATEST_VENV := .venv-mcore-latest
LATEST_STAMP := $(LATEST_VENV)/.installed-$(MCORE_LATEST)

.PHONY: install test test-mcore-latest test-sglang lint format demo demo-sglang clean print-py

print-py:
	@echo $(PY)

$(STAMP): pyproject.toml
	@test -n "$(PY)" || { echo "make: none of $(PY_CANDIDATES) runs here; install Python 3.12 \
	or 3.11, or pass PY=/path/to/python3.X"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# The CPU wheel first, pinned, so that no dependency pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,nemo]' megatron-core==$(MCORE_OLDEST)
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The SGLang venv (torch 2.14.1 + sglang 0.5.23 + sglang-router 0.3.2, ~11 GB, 5-10 min cold)
# lives once per machine outside every checkout, keyed by its pins, and is reused by every clone
# and CI run: tools/sglang_venv.sh builds it unless complete (and installs the CPU stand-in for
# sgl-kernel); --path prints where it is.
SGLANG_PYTHON = $$(bash tools/sglang_venv.sh --path)/bin/python
FREE_PORT = $$($(BIN)/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")

# A single-node Slurm (slurm-wlm + munge, apt, ~20 s cold) for tests/e2e/test_slurm.py and a
# separate two-node one on this host for tests/e2e/test_slurm_nodes.py; if one cannot start
# here, its tests skip and say why. The sglang tier (tests/sglang) runs too.
test: lint
	-bash tools/slurm_local.sh || echo "tools/slurm_local.sh failed: Slurm tests will skip"
	-bash tools/slurm_local.sh --nodes 2 || echo "two-node Slurm failed: its test will skip"
	bash tools/sglang_venv.sh
	RPG_SGLANG_PYTHON=$(SGLANG_PYTHON) $(BIN)/python -m pytest -q tests
	$(MAKE) test-mcore-latest

# megatron-core $(MCORE_LATEST) in a second venv, for the suites that run Megatron's schedules,
# DDP and optimizer (tests/dist, tests/e2e) and the unit tests of what we take from megatron-core
# (the version logic, CPU patches and docs/megatron-core.md; the model config; dist_checkpointing,
# whose files changed in 0.19); the other unit tests and the Slurm launch tests (no megatron-core
# in them) run once, in .venv.
# Its wheel's metadata asks for Python >= 3.12 but it ships a cp311 build that runs on 3.11, so
# it goes in with --ignore-requires-python, and with --no-deps so pip keeps the torch pinned
# first (its own requirements, torch/numpy/packaging, are ours too). It imports triton at
# start-up (pipeline_parallel.schedules and models.gpt.gpt_model import
# transformer.moe.paged_stash, whose kernels are triton.jit), which a CUDA torch brings along
# and the CPU wheel does not. Rebuilt when pyproject.toml or MCORE_LATEST changes.
$(LATEST_STAMP): pyproject.toml
	@test -n "$(PY)" || { echo "make: none of $(PY_CANDIDATES) runs here"; exit 1; }
	test -x $(LATEST_VENV)/bin/python || $(PY) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install --quiet torch==2.13.0
	$(LATEST_VENV)/bin/pip install --quiet -e '.[dev]'
	$(LATEST_VENV)/bin/pip install --quiet --no-deps --ignore-requires-python \
		megatron-core==$(MCORE_LATEST) triton==3.8.0
	rm -f $(LATEST_VENV)/.installed-*
	touch $(LATEST_STAMP)

test-mcore-latest: $(LATEST_STAMP)
	$(LATEST_VENV)/bin/python -m pytest -q tests/dist tests/e2e tests/unit/test_compat.py \
		tests/unit/test_parallel.py tests/unit/test_model.py tests/unit/test_checkpoint.py \
		tests/unit/test_convert.py \
		--ignore=tests/e2e/test_slurm.py --ignore=tests/e2e/test_slurm_nodes.py

# Only the tests against real SGLang servers on CPU (tests/sglang, marker `sglang`).
test-sglang: $(STAMP)
	bash tools/sglang_venv.sh
	RPG_SGLANG_PYTHON=$(SGLANG_PYTHON) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m sglang tests/sglang

# The tiny end-to-end RPG run on CPU: 2 gloo processes (data parallel), a few minutes.
demo: $(STAMP)
	rm -rf runs/demo  # each demo is a fresh run (training refuses to write over an earlier one)
	$(BIN)/python -m rpg_megatron.tiny runs/demo
	OMP_NUM_THREADS=1 $(BIN)/rpg-megatron train examples/tiny_cpu.yaml --nproc-per-node 2

# The same demo trained through one real SGLang server on this CPU (rollout.engine=sglang).
demo-sglang: $(STAMP)
	rm -rf runs/demo_sglang  # a fresh run, as `make demo`
	$(BIN)/python -m rpg_megatron.tiny runs/demo_sglang
	bash tools/sglang_venv.sh
	OMP_NUM_THREADS=1 $(BIN)/rpg-megatron train examples/tiny_cpu_sglang.yaml --nproc-per-node 2 \
		rollout.sglang.python=$(SGLANG_PYTHON) rollout.sglang.base_port=$(FREE_PORT)

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info .pytest_cache .ruff_cache
