# Entry points: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-sglang lint format demo demo-sglang clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# The CPU wheel first, pinned, so that no dependency pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,nemo]'
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

# A single-node Slurm (slurm-wlm + munge, apt, ~20 s cold) for tests/e2e/test_slurm.py; if it
# cannot start here, that test skips and says why. The sglang tier (tests/sglang) runs too.
test: lint
	-bash tools/slurm_local.sh || echo "tools/slurm_local.sh failed: Slurm tests will skip"
	bash tools/sglang_venv.sh
	RPG_SGLANG_PYTHON=$(SGLANG_PYTHON) $(BIN)/python -m pytest -q tests

# Only the tests against real SGLang servers on CPU (tests/sglang, marker `sglang`).
test-sglang: $(STAMP)
	bash tools/sglang_venv.sh
	RPG_SGLANG_PYTHON=$(SGLANG_PYTHON) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m sglang tests/sglang

# The tiny end-to-end RPG run on CPU: 2 gloo processes (data parallel), a few minutes.
demo: $(STAMP)
	rm -rf runs/demo  # each demo is a fresh run (training refuses to write over an earlier one)
	$(BIN)/python -m rpg_megatron.tiny runs/demo
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node 2 \
		-m rpg_megatron.cli train examples/tiny_cpu.yaml

# The same demo trained through one real SGLang server on this CPU (rollout.engine=sglang).
demo-sglang: $(STAMP)
	rm -rf runs/demo_sglang  # a fresh run, as `make demo`
	$(BIN)/python -m rpg_megatron.tiny runs/demo_sglang
	bash tools/sglang_venv.sh
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node 2 \
		-m rpg_megatron.cli train examples/tiny_cpu_sglang.yaml \
		rollout.sglang.python=$(SGLANG_PYTHON) rollout.sglang.base_port=$(FREE_PORT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
