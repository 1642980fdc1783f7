# The README's two commands: `make run` (the main job) and `make test`. Each sets itself up on a
# fresh machine: the virtualenv with pinned installs, then the real data, then the work.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

# No telemetry: this machine reaches only package registries, and logs stay quiet.
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export ITERATIVE_DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90

.PHONY: run test setup data lock clean

run: setup data
	$(BIN)/python -m flows retrain

test: setup data
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

data:
	@if [ -f $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "Installing Fashion-MNIST (apt-get install -y dataset-fashion-mnist)"; \
		apt-get install -y -q dataset-fashion-mnist >/dev/null || \
		{ apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install -y dataset-fashion-mnist'," \
		     "or set data.source: digits in params.yaml to use scikit-learn's bundled digits."; \
		exit 1; \
	fi

# Re-pin after changing pyproject's dependencies: installs them, then freezes the exact set.
lock:
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^moco-pipeline' > requirements.lock

clean:
	rm -rf data/shards runs mlruns mlartifacts mlflow.db mlflow.db.registry.lock metrics.json metrics-*.json promotion.json models
