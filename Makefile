# hessmpi: `make run` trains the bundled example, `make test` runs every test suite.
# Each target installs what it needs into .venv on first use (a machine with only Python).
# On a cluster: make test MPIEXEC=srun NP_FLAG=-n   (or MPIEXEC="srun --mpi=pmi2")

PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
MPIEXEC ?= $(abspath $(BIN))/mpiexec
NP_FLAG ?= -n
NP      ?= 2
# MPICH's hydra kills a job that runs longer than this many seconds (a hung test fails fast).
export MPIEXEC_TIMEOUT ?= 600
export HESSMPI_MPIEXEC = $(MPIEXEC)
PYTEST  := $(BIN)/python -m pytest
DATA    := data/digits.h5
EXAMPLE := jobs/configs/digits_mlp.toml

.PHONY: install run test test-unit test-mpi test-e2e test-gpu test-slurm bench bench-gpu lint clean

install: $(VENV)/.installed

# The torch extra is installed so that its tests run: the pinned CPU build, taken from pip's
# configured sources; where those would offer the multi-GB CUDA build, point pip at PyTorch's
# CPU index: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,data,report,dev,torch]' \
	    $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	touch $@

$(DATA): | $(VENV)/.installed
	$(BIN)/hessmpi data digits --out $@

# The bundled example: the same MLP on the digits at full batch, with SGD+momentum at its
# best learning rate and with the recommended recipe; the report says by how much.
run: install $(DATA)
	rm -rf runs/example-sgd runs/example-recipe
	$(MPIEXEC) $(NP_FLAG) $(NP) $(BIN)/hessmpi train --config $(EXAMPLE) --out runs/example-sgd
	$(MPIEXEC) $(NP_FLAG) $(NP) $(BIN)/hessmpi train --config $(EXAMPLE) \
	    --config jobs/configs/recommended_fullbatch.toml --out runs/example-recipe
	$(BIN)/hessmpi report runs/example-sgd runs/example-recipe --baseline runs/example-sgd \
	    --plot runs/example.png
	@echo "plot of both runs: runs/example.png"

test: install test-unit test-mpi test-e2e test-gpu test-slurm

test-unit: install
	$(PYTEST) -q tests/unit

test-mpi: install
	$(MPIEXEC) $(NP_FLAG) 2 $(PYTEST) -q --with-mpi -p no:cacheprovider tests/mpi
	$(MPIEXEC) $(NP_FLAG) 3 $(PYTEST) -q --with-mpi -p no:cacheprovider tests/mpi

test-e2e: install
	$(PYTEST) -q tests/e2e

# Skipped, with the reason, where CuPy or a GPU is missing (as in CI): pytest's exit
# status 5 (no test ran) is then success.
test-gpu: install
	$(PYTEST) -q -rs tests/gpu || [ $$? -eq 5 ]

# Starts a local one-host SLURM (Debian packages; needs root and apt, as in CI), runs the
# job-script tests on it, stops it; elsewhere runs the tests that need no SLURM and says so.
test-slurm: install
	PATH="$(abspath $(BIN)):$$PATH" bash tests/slurm/run.sh

bench: install
	$(BIN)/python benchmarks/step_time.py
	$(BIN)/python benchmarks/sharded.py
	$(BIN)/python benchmarks/secant_step.py
	$(BIN)/python benchmarks/checkpoint.py
	$(BIN)/python benchmarks/convergence.py --quick
	$(BIN)/python benchmarks/robustness.py
	$(BIN)/python benchmarks/cnn.py --part speed

# On a machine with a GPU (CuPy installed): GPU against CPU, SGD and secant.
bench-gpu: install
	$(BIN)/python benchmarks/gpu.py

lint: install
	$(BIN)/ruff check hessmpi tests benchmarks examples

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache .ruff_cache $(DATA)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
