# The two commands of README.md:
#   make demo   install into .venv (pinned by constraints.txt) and run the main job on the embedded default
#   make test   install into .venv and run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench clean

# pip's output goes to .venv/pip.log and is shown only if the install fails.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (pinned by constraints.txt; log: $(VENV)/pip.log)"
	@$(PY) -m pip install -c constraints.txt torch==2.13.0 > $(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	@$(PY) -m pip install -c constraints.txt -e ".[dev]" >> $(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	@# the registry's torchvision for torch 2.13 is a CUDA build: a start-up guard lets any script of the venv
	@# import torchvision / transformers / diffusers (reimagen/utils/compat.py; `reimagen-eval doctor` checks it)
	@$(PY) -c "from reimagen.utils.compat import install_torchvision_hook as h; print(h())" >> $(VENV)/pip.log 2>&1 \
		|| (cat $(VENV)/pip.log; exit 1)
	touch $(STAMP)

install: $(STAMP)

# OMP_WAIT_POLICY=PASSIVE: on a shared or oversubscribed machine OpenMP's spin-waiting made the tiny models
# up to 20x slower (measured: 1.7 s instead of 0.1 s per demo training step); it costs ~15% when idle.
demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 $(VENV)/bin/reimagen-eval toy demo --out runs/toy

# First the layers contract (pyproject.toml, [tool.importlinter]); then the suite runs as a new machine would expose it: a narrow terminal (COLUMNS=60), one torch thread instead of the
# machine's two, and a random test order (pytest-randomly; rerun one order with SEED=N make test).
# Another terminal width or thread count: make test TEST_COLUMNS=200 TEST_THREADS=2.
SEED ?= $(shell date +%s)
TEST_COLUMNS ?= 60
TEST_THREADS ?= 1
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	@echo "test order: pytest -p randomly --randomly-seed=$(SEED)  (COLUMNS=$(TEST_COLUMNS), OMP_NUM_THREADS=$(TEST_THREADS))"
	COLUMNS=$(TEST_COLUMNS) OMP_NUM_THREADS=$(TEST_THREADS) HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
		$(PY) -m pytest -q -p randomly --randomly-seed=$(SEED)

bench: $(STAMP)
	$(PY) benchmarks/guided_step.py
	$(PY) benchmarks/bm25.py

clean:
	rm -rf $(VENV) runs
