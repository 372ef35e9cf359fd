# pneumo_exp: `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export WANDB_SILENT ?= true

.DEFAULT_GOAL := help
.PHONY: help install demo test lint readme-check summary pretrain-diffusion generator-study augment-cpu augment-study augment-study-demo sweep-demo sweep-backbones dashboard paper-demo paper paper-cpu bench bench-kermany bench-kermany-final lock sync clean

PAPER_ROWS := original_study,original_no_augmentation,zero_shot,linear_probe,lora,full
SEEDS ?= 0,1,2
SWEEP ?= $(shell date +%Y-%m-%d_%H-%M-%S)
SWEEP := $(SWEEP)
comma := ,

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## build .venv with the locked versions (CPU torch 2.13.0), about 1-3 min once

# Bytecode is compiled here, over all cores: where PYTHONDONTWRITEBYTECODE is set, as on the development VMs, Python
# never caches it at import, and every process (each test worker, each job) recompiled torch and transformers from
# source, 25 s of imports instead of 10. pip's own compile does the same work on one core.
$(STAMP): pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -c requirements/lock.txt -e ".[dev,sweep]"
	$(BIN)/python -c "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()['purelib'], quiet=2, workers=0)"
	touch $(STAMP)

demo: install ## the main job on built-in phantom data (no download): classifier, then with diffusion augmentation
	$(BIN)/pneumo-exp experiment=demo
	$(BIN)/pneumo-exp task=pretrain_diffusion experiment=demo_augmented
	$(BIN)/pneumo-exp experiment=demo_augmented

test: install lint ## the lint gate, then the whole test suite (slow tests included) over all cores, slowest 25 listed
	$(BIN)/python -m pytest -n auto --dist loadgroup --durations=25

lint: install ## ruff: pyflakes, pycodestyle (120 columns), import order, pyupgrade, bugbear (pyproject.toml)
	$(BIN)/ruff check .

readme-check: install ## the README's printed blocks and names against the code, then against a fresh demo (1-3 min)
	$(BIN)/python -m pytest -q tests/test_readme.py
	$(BIN)/python tests/test_readme.py

summary: install ## counts and leakage check of a dataset: make summary DATA=path/to/chest_xray
	$(BIN)/pneumo-exp summary dataset=kermany dataset.root=$(DATA)

pretrain-diffusion: install ## the cxr_small diffusion base, from scratch on the training split: make pretrain-diffusion DATA=...
	$(BIN)/pneumo-exp task=pretrain_diffusion diffusion_lora=cxr_small dataset=kermany dataset.root=$(DATA) \
	  experiment_name=pretrain_diffusion

STUDY_BASE = $(if $(BASE),'$(BASE)',null)
STUDY_LORA = $(if $(LORA),$(comma){name:base_lora$(comma)base:$(STUDY_BASE)$(comma)lora:'$(LORA)'})
generator-study: install ## did cxr_small learn? make generator-study RUN=<real-only classifier run> DATA=... [LORA=...]
	$(BIN)/pneumo-exp task=generator_study diffusion_lora=cxr_small dataset=kermany dataset.root=$(DATA) \
	  generator_study.reference_run=$(RUN) experiment_name=generator_study \
	  "generator_study.generators=[{name:noise,base:random},{name:base,base:$(STUDY_BASE)}$(STUDY_LORA)]"

AUGMENT_ROWS := original_no_augmentation,original_study,ratio_half
STUDY ?= main
AUGMENT_GENERATOR = multirun/augment_cpu/$(STUDY)-generator
augment-cpu: install ## does augmentation help? recipe v3 with/without cxr_small images, 3 seeds: make augment-cpu DATA=...
	$(BIN)/pneumo-exp experiment=augment_cpu/generator dataset.root=$(DATA) hydra.run.dir=$(AUGMENT_GENERATOR)
	$(BIN)/pneumo-exp -m seed=$(SEEDS) experiment=$(subst $(comma),$(comma)augment_cpu/,augment_cpu/$(AUGMENT_ROWS)) \
	  dataset=kermany dataset.root=$(DATA) diffusion_lora.trained_lora=$(abspath $(AUGMENT_GENERATOR))/diffusion/lora \
	  hydra.sweep.dir=multirun/augment_cpu/$(STUDY)
	$(BIN)/pneumo-exp report report.input=multirun/augment_cpu/$(STUDY) \
	  'report.pairs=[[original_study,original_no_augmentation],[ratio_half,original_no_augmentation]]'

# The augmentation study (docs/augmentation-study.md): per real fraction, a base pretrained on that fraction's
# training images, LoRA replicates on it and the filtered arm's judge; then one grid over fractions x arms x seeds
# (the synthetic arms also x LoRA replicates) at the recipes' step budget, scaled to the fraction; then the report.
# Jobs finished with the same settings and inputs are skipped, so a stopped study resumes where it stopped.
STUDY_REAL_ARMS := augment_study/none,augment_study/duplicate_real
STUDY_SYNTHETIC_ARMS := augment_study/mix,augment_study/filtered,augment_study/synthetic_then_real
STUDY_FRACTIONS ?= 0.1,0.25,1.0
STUDY_LORA_SEEDS ?= 0,1
STUDY_DIR ?= multirun/augment_study/$(STUDY)
STUDY_SIZE ?= dataset=kermany dataset.root=$(DATA)
study_run = $(BIN)/pneumo-exp $(1) $(STUDY_SIZE) paths.study_dir=$(abspath $(STUDY_DIR))
augment-study: install ## when do synthetic images help? fractions x arms x seeds x LoRA replicates: make augment-study DATA=...
	set -e; for f in $(subst $(comma), ,$(STUDY_FRACTIONS)); do \
	  $(call study_run,task=pretrain_diffusion experiment=augment_study/generator dataset.train_fraction=$$f \
	    hydra.run.dir=$(STUDY_DIR)/pretrain/$$f); \
	  for lora_seed in $(subst $(comma), ,$(STUDY_LORA_SEEDS)); do \
	    $(call study_run,experiment=augment_study/generator dataset.train_fraction=$$f \
	      diffusion_lora.training.seed=$$lora_seed); done; \
	  $(call study_run,experiment=augment_study/judge dataset.train_fraction=$$f); \
	done
	$(call study_run,-m experiment=$(STUDY_REAL_ARMS) seed=$(SEEDS) dataset.train_fraction=$(STUDY_FRACTIONS) \
	  hydra.sweep.dir=$(STUDY_DIR)/grid)
	$(call study_run,-m experiment=$(STUDY_SYNTHETIC_ARMS) seed=$(SEEDS) dataset.train_fraction=$(STUDY_FRACTIONS) \
	  diffusion_lora.training.seed=$(STUDY_LORA_SEEDS) hydra.sweep.dir=$(STUDY_DIR)/grid)
	$(BIN)/pneumo-exp report report.input=$(STUDY_DIR)/grid

augment-study-demo: install ## the same study on phantom data: 2 fractions x 5 arms x 2 seeds (~5 min), then its report
	$(MAKE) --no-print-directory augment-study STUDY_DIR=multirun/augment_study_demo/$(SWEEP) \
	  STUDY_SIZE=debug=augment_study_demo STUDY_FRACTIONS=0.5,1.0 SEEDS=0,1 STUDY_LORA_SEEDS=0

sweep-demo: install ## LoRA alpha x lr x 3 seeds on phantom data (~2 min), then its report
	$(BIN)/pneumo-exp -m experiment=sweep/alpha_lr hydra.sweep.dir=multirun/sweep_alpha_lr/$(SWEEP)
	$(BIN)/pneumo-exp report report.input=multirun/sweep_alpha_lr/$(SWEEP)

BACKBONES ?= tiny_vit,tiny_siglip
sweep-backbones: install ## backbone x LoRA alpha x lr x 3 seeds, then its report: [BACKBONES=...] [DATA=...] [PAIRS=...]
	$(BIN)/pneumo-exp -m experiment=sweep/backbones clip_lora=$(BACKBONES) \
	  $(if $(DATA),dataset=kermany dataset.root=$(DATA)) $(SWEEP_ARGS) hydra.sweep.dir=multirun/sweep_backbones/$(SWEEP)
	$(BIN)/pneumo-exp report report.input=multirun/sweep_backbones/$(SWEEP) $(if $(PAIRS),'report.pairs=$(PAIRS)')

dashboard: install ## the sweep's saved W&B view: make dashboard SWEEP_DIR=multirun/<experiment>/<sweep> (after make sync)
	$(BIN)/pneumo-exp dashboard report.input=$(SWEEP_DIR)

paper-demo: install ## the paper table's rows at demo scale on phantom data, 3 seeds (~10 min), then the table
	$(BIN)/pneumo-exp -m experiment=$(subst $(comma),$(comma)paper_cpu/,paper_cpu/$(PAPER_ROWS)) seed=$(SEEDS) \
	  dataset=phantom clip_lora=tiny dataset.resolution=64 experiment_name=paper_demo \
	  'augmentation.per_class_count={NORMAL:30,VIRUS:30}' hydra.sweep.dir=multirun/paper_demo/$(SWEEP)
	$(BIN)/pneumo-exp report report.input=multirun/paper_demo/$(SWEEP)

paper: install ## the paper table (GPU + hub access): make paper DATA=path/to/chest_xray
	$(BIN)/pneumo-exp -m experiment=$(subst $(comma),$(comma)paper/,paper/$(PAPER_ROWS)) seed=$(SEEDS) \
	  dataset=kermany dataset.root=$(DATA) hydra.sweep.dir=multirun/paper/$(SWEEP)
	$(BIN)/pneumo-exp report report.input=multirun/paper/$(SWEEP)

paper-cpu: install ## the same table with the small from-scratch presets on a CPU: make paper-cpu DATA=...
	$(BIN)/pneumo-exp -m experiment=$(subst $(comma),$(comma)paper_cpu/,paper_cpu/$(PAPER_ROWS)) seed=$(SEEDS) \
	  dataset=kermany dataset.root=$(DATA) hydra.sweep.dir=multirun/paper_cpu/$(SWEEP)
	$(BIN)/pneumo-exp report report.input=multirun/paper_cpu/$(SWEEP)

bench: install ## throughput: framework vs plain loops (classifier images/s, diffusion steps/s and images/s)
	$(BIN)/python bench/bench_classifier.py
	$(BIN)/python bench/bench_diffusion.py
	$(BIN)/python bench/bench_precision.py

bench-kermany: install ## the real-data recipe for 3 seeds: make bench-kermany DATA=path/to/chest_xray
	$(BIN)/python bench/bench_kermany.py $(DATA) --seeds $(subst $(comma), ,$(SEEDS))

bench-kermany-final: install ## the same recipe refitted on train + val (no selection, last epoch kept), 3 seeds
	$(BIN)/python bench/bench_kermany.py $(DATA) --seeds $(subst $(comma), ,$(SEEDS)) \
	  --out bench/results/kermany_final_fit.json dataset.val_fraction=0

lock: install ## rewrite requirements/lock.txt from the current .venv
	{ echo "# Exact versions that install and work together (CPU, Python 3.11). Regenerate: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^pneumo' | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > requirements/lock.txt

sync: install ## upload offline W&B runs found under outputs/ and multirun/
	find $(wildcard outputs multirun) -type d -name 'offline-run-*' -exec $(BIN)/wandb sync {} \;

clean: ## remove run outputs (outputs/, multirun/ sweeps); keeps .venv and caches
	rm -rf outputs && find multirun -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
