# Entry points: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format demo clean

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

# A single-node Slurm (slurm-wlm + munge, apt, ~20 s cold) for tests/e2e/test_slurm.py and a
# separate two-node one on this host for tests/e2e/test_slurm_nodes.py; if one cannot start
# here, its tests skip and say why.
test: lint
	-bash tools/slurm_local.sh || echo "tools/slurm_local.sh failed: Slurm tests will skip"
	-bash tools/slurm_local.sh --nodes 2 || echo "two-node Slurm failed: its test will skip"
	$(BIN)/python -m pytest -q tests

# The tiny end-to-end RPG run on CPU: 2 gloo processes (data parallel), a few minutes.
demo: $(STAMP)
	rm -rf runs/demo  # each demo is a fresh run (training refuses to write over an earlier one)
	$(BIN)/python -m rpg_megatron.tiny runs/demo
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node 2 \
		-m rpg_megatron.cli train examples/tiny_cpu.yaml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
