# Two commands set everything up on a fresh machine:
#   make train   one real training run (installs what it needs into ./.venv)
#   make test    the test suite (ditto)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: train test bench venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# One stamp per set of extras: re-installs only when pyproject.toml changes.
$(VENV)/.stamp-%: pyproject.toml | $(PY)
	$(PIP) install --quiet -e ".[$(subst +,$(comma),$*)]"
	touch $@

comma := ,

venv: $(VENV)/.stamp-experiments+test

train: $(VENV)/.stamp-experiments
	$(PY) -m experiments.synthetic $(ARGS)

test: $(VENV)/.stamp-experiments+test
	$(PY) -m pytest -q $(ARGS)

bench: $(VENV)/.stamp-experiments+test+bench
	$(PY) -m benchmarks.bench_solver $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
