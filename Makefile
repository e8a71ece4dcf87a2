# Two commands set everything up on a fresh machine:
#   make train   the main job: MGDA-UB on MultiMNIST (installs into ./.venv)
#   make test    the test suite (ditto)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
comma := ,

# Local MNIST: the four IDX files. Defaults to the shared copy when present;
# otherwise the experiments read TFDS's data dir, else download MNIST
# (verified by SHA-256) into data/mnist (see README).
MNIST_DIR ?= $(wildcard ../shared/data/mnist)
DATA_ARGS := $(if $(MNIST_DIR),--config.data.mnist_dir=$(MNIST_DIR),)
DATA_SET := $(if $(MNIST_DIR),--set data.mnist_dir=$(MNIST_DIR),)
EPOCHS ?= 10
SEEDS ?= 0 1 2

.PHONY: train test bench bench-gpu gpu-wheels bench-peers reproduce-multimnist reproduce-architectures check-multimnist venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# One stamp per set of extras: re-installs only when pyproject.toml changes.
$(VENV)/.stamp-%: pyproject.toml | $(PY)
	$(PIP) install --quiet -e ".[$(subst +,$(comma),$*)]"
	touch $@

venv: $(VENV)/.stamp-experiments+test

train: $(VENV)/.stamp-experiments
	$(PY) -m experiments.multimnist --config.epochs=$(EPOCHS) $(DATA_ARGS) $(ARGS)

# Two pytest workers, one file per worker (a file's tests share its compiled
# programs and module fixtures: the multi-device script runs once), and a
# persistent compilation cache (empty on a fresh clone), so identical programs
# built by different tests compile once (12:43 against 16:25 without it and
# the faster QP reference; 16:13 with tests spread one by one).
TEST_WORKERS ?= 2
test: $(VENV)/.stamp-experiments+test
	JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.cache/jax-tests \
	JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.2 \
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

bench: $(VENV)/.stamp-experiments+test+bench
	$(PY) -m benchmarks.bench_solver --variants --scaling $(ARGS)
	$(PY) -m benchmarks.bench_step --pool --conv --scan --scaling --methods
	$(PY) -m benchmarks.bench_devices
	$(PY) -m benchmarks.bench_tag
	$(PY) -m benchmarks.bench_dense --time
	$(PY) -m benchmarks.bench_nn
	$(PY) -m benchmarks.bench_nn --parts multimnist
	$(PY) -m benchmarks.bench_epoch --methods mgda_ub
	$(MAKE) bench-peers

# The Performance issue's GPU figures, for a lent GPU machine (no registry
# there): `make gpu-wheels` here, then run `bash benchmarks/gpu.sh` there
# with .gpu-wheels carried along.
gpu-wheels:
	mkdir -p .gpu-wheels
	for v in 3.10 3.11 3.12 3.13; do $(PYTHON) -m pip download --quiet \
	  --no-deps --only-binary=:all: --python-version $$v \
	  --platform manylinux2014_x86_64 PyYAML -d .gpu-wheels; done
	$(PYTHON) -m pip download --quiet --no-deps ml_collections tqdm absl-py \
	  -d .gpu-wheels

bench-gpu:
	bash benchmarks/gpu.sh

# Against the PyTorch peers (TorchJD, the paper's PyTorch way); not part of
# the tests. A separate environment: torch pinned to 2.13.0, which installs a
# CPU build on these machines, whose pip reads local wheel indexes (an
# unpinned torch pulls several GB of CUDA packages; elsewhere, add
# --index-url https://download.pytorch.org/whl/cpu for torch).
PEERS ?= .venv-peers
$(PEERS)/.stamp: pyproject.toml
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS)/bin/python -m pip install --quiet "torch==2.13.0" \
	  "torchjd[quadprog-projector]" -e ".[experiments,bench]"
	touch $@

bench-peers: $(PEERS)/.stamp
	$(PEERS)/bin/python -m benchmarks.bench_peers $(ARGS)

# Methods x seeds -> a section of docs/RESULTS.md (resumable). Default
# methods: the paper's six; METHODS="..." for others (registry names).
METHODS ?=
reproduce-multimnist: $(VENV)/.stamp-experiments
	$(PY) -m experiments.multimnist.reproduce --epochs $(EPOCHS) \
	  --seeds $(SEEDS) $(if $(METHODS),--methods $(METHODS),) $(DATA_SET) $(ARGS)

# Architectures x {uniform, MGDA-UB, full MGDA} -> docs/ARCHITECTURES.md
# (resumable); the FAFS tree found by python -m experiments.multimnist.fafs.
FAFS_GROUPS ?= 01|0,1|0,1
ARCH_SEEDS ?= 0 1
reproduce-architectures: $(VENV)/.stamp-experiments
	$(PY) -m experiments.multimnist.reproduce_architectures --epochs $(EPOCHS) \
	  --seeds $(ARCH_SEEDS) --groups '$(FAFS_GROUPS)' $(DATA_SET) $(ARGS)

# Short real-data check (CI): 2 epochs of MGDA-UB must reach the stated
# accuracy on both digits.
check-multimnist: $(VENV)/.stamp-experiments
	$(PY) -m experiments.multimnist.check $(if $(MNIST_DIR),--mnist-dir $(MNIST_DIR),)

clean:
	rm -rf $(VENV) $(PEERS) build *.egg-info .cache
