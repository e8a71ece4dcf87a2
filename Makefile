# Two commands set everything up on a fresh machine:
#   make train   the main job: MGDA-UB on MultiMNIST (installs into ./.venv)
#   make test    the test suite (ditto)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
comma := ,

# Local MNIST: the four IDX files. Defaults to the shared copy when present;
# otherwise the experiments read TFDS's data dir (see README).
MNIST_DIR ?= $(wildcard ../shared/data/mnist)
DATA_ARGS := $(if $(MNIST_DIR),--mnist-dir $(MNIST_DIR),)
EPOCHS ?= 10
SEEDS ?= 0 1 2

.PHONY: train test bench reproduce-multimnist check-multimnist venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# One stamp per set of extras: re-installs only when pyproject.toml changes.
$(VENV)/.stamp-%: pyproject.toml | $(PY)
	$(PIP) install --quiet -e ".[$(subst +,$(comma),$*)]"
	touch $@

venv: $(VENV)/.stamp-experiments+test

train: $(VENV)/.stamp-experiments
	$(PY) -m experiments.multimnist --epochs $(EPOCHS) $(DATA_ARGS) $(ARGS)

test: $(VENV)/.stamp-experiments+test
	$(PY) -m pytest -q $(ARGS)

bench: $(VENV)/.stamp-experiments+test+bench
	$(PY) -m benchmarks.bench_solver --variants --scaling $(ARGS)
	$(PY) -m benchmarks.bench_step --pool --scaling --methods

# All methods of the paper's Table 2 over several seeds -> docs/RESULTS.md.
reproduce-multimnist: $(VENV)/.stamp-experiments
	$(PY) -m experiments.multimnist.reproduce --epochs $(EPOCHS) \
	  --seeds $(SEEDS) $(DATA_ARGS) $(ARGS)

# Short real-data check (CI): 2 epochs of MGDA-UB must reach the stated
# accuracy on both digits.
check-multimnist: $(VENV)/.stamp-experiments
	$(PY) -m experiments.multimnist.check $(DATA_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
