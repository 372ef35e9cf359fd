# pneumo_exp: `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export WANDB_SILENT ?= true

.DEFAULT_GOAL := help
.PHONY: help install demo test summary lock sync clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## build .venv with the locked versions (CPU torch 2.13.0), about 1-3 min once

$(STAMP): pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c requirements/lock.txt -e ".[dev]"
	touch $(STAMP)

demo: install ## the main job on built-in phantom data (no download): classifier, then with diffusion augmentation
	$(BIN)/pneumo-exp experiment=demo
	$(BIN)/pneumo-exp experiment=demo_augmented

test: install ## the whole test suite (slow tests included)
	$(BIN)/python -m pytest

summary: install ## counts and leakage check of a dataset: make summary DATA=path/to/chest_xray
	$(BIN)/pneumo-exp summary dataset=kermany dataset.root=$(DATA)

lock: install ## rewrite requirements/lock.txt from the current .venv
	{ echo "# Exact versions that install and work together (CPU, Python 3.11). Regenerate: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^pneumo' | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > requirements/lock.txt

sync: install ## upload offline W&B runs found under outputs/ and multirun/
	find outputs multirun -type d -name 'offline-run-*' -exec $(BIN)/wandb sync {} \;

clean: ## remove run outputs (outputs/, multirun/ sweeps); keeps .venv and caches
	rm -rf outputs && find multirun -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
