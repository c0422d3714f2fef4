# Two set-up commands (README): `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA := data/synthetic
FOLDS := data/folds.csv
EXP := demo
# the tiny preset at a larger tile and more epochs: measured best per CPU-minute on the demo data (README)
DEMO_FLAGS := --preset tiny --tile-size 84 --epochs 24
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1

.PHONY: install data-synthetic data demo test ablate kernel push kaggle-sim real gpu-wheels gpu-check clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

install: $(VENV)/.installed

# the bundled synthetic default: 240 train + 20 test images at 1000x500 (real images are 2000x1000)
$(DATA)/train.csv: | install
	$(PY) -m src.synthetic --out $(DATA) --n-train 240 --n-test 20 --size 1000x500 --seed 0

data-synthetic: $(DATA)/train.csv

# the peers (train mean, colour-feature ridge) on the same folds first; the last line prints model vs peer per fold
# (python -m src.docs demo checkpoints/demo --write puts that table into README.md)
demo: install data-synthetic
	$(PY) folds.py --data-dir $(DATA) --out $(FOLDS)
	$(PY) -m src.baseline --colour --data-dir $(DATA) --folds $(FOLDS) --out checkpoints/$(EXP)/baselines
	$(PY) train.py --fold all $(DEMO_FLAGS) --data-dir $(DATA) --folds $(FOLDS) --exp $(EXP) --overwrite
	$(PY) infer.py --oof --data-dir $(DATA) --checkpoints checkpoints/$(EXP)
	$(PY) infer.py --data-dir $(DATA) --checkpoints checkpoints/$(EXP) --out submission.csv
	$(PY) -m src.docs demo checkpoints/$(EXP)

test: install
	$(PY) -m pytest

# default vs each option of docs/OPTIONS.md on the demo data, 16 rows x 5 folds x ABLATE_SEEDS (3 seeds: about an hour
# on 2 cores) -> docs/ABLATION.md (generated section) + docs/ablation.csv/.json; ABLATE_FLAGS=--quick: smoke run
# into checkpoints/ablation-quick/
ABLATE_SEEDS ?= 0 1 2
ABLATE_FLAGS ?=
$(FOLDS): $(DATA)/train.csv
	$(PY) folds.py --data-dir $(DATA) --out $(FOLDS)

ablate: install data-synthetic $(FOLDS)
	$(PY) bench/ablate.py --data-dir $(DATA) --folds $(FOLDS) --seeds $(ABLATE_SEEDS) $(ABLATE_FLAGS)

# real competition files (needs Kaggle credentials and the accepted rules)
data: install
	$(PY) -m src.download --out data/csiro-biomass

# offline Kaggle kernel from an experiment: make kernel EXP=myexp OWNER=me; then make push
OWNER ?=
kernel: install
	$(PY) kernels/build.py --checkpoints checkpoints/$(EXP) $(if $(OWNER),--owner $(OWNER)) --out build/kaggle

push: install
	$(PY) kernels/push.py build/kaggle

# rehearsal of Kaggle's hidden-test rerun (docs/KAGGLE.md): a tiny experiment, the built kernel run offline on a
# Kaggle-style input tree with bad inputs, twice (2026 layout; competition-era layout with timm 1.0.19); ~1 min.
# SIM_FLAGS="--checkpoints checkpoints/demo --data-dir data/synthetic" rehearses an experiment of yours instead.
SIM_FLAGS ?=
kaggle-sim: install
	$(PY) kernels/rehearse.py $(SIM_FLAGS)

# competition files -> a submitted kernel with a recipe of configs/ (README "Real data", docs/RECIPES.md):
# make real RECIPE=seed OWNER=me [GPUS=0,1,...] [DRY_RUN=1]; real.py runs the existing commands in order, each printed
RECIPE ?= seed
GPUS ?=
DRY_RUN ?=
OVERRIDE ?=
real: install
	$(PY) real.py --recipe $(RECIPE) $(if $(OWNER),--owner $(OWNER)) $(if $(GPUS),--gpus $(GPUS)) \
		$(if $(OVERRIDE),--override $(OVERRIDE)) $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run)

# the GPU suite and the GPU figures (docs/GPU.md). Here, with network: make gpu-wheels (albumentations and the
# dependencies a bare CUDA box lacks, as Python 3.12 wheels, into the ignored .whl/). There, with .whl/ carried:
# make gpu-check (set-up from the wheels, pytest -m gpu, peak memory, TFLOP/s, infer.py end to end; under 6 minutes on
# an H200) -> docs/gpu.json + docs/GPU.md. GPU_FLAGS=--dry-run prints the plan on any machine.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_FLAGS ?=
gpu-wheels: install
	$(PY) bench/gpu_check.py --fetch-wheels

gpu-check:
	$(GPU_PY) bench/gpu_check.py $(GPU_FLAGS)

clean:
	rm -rf $(DATA) $(FOLDS) checkpoints/$(EXP) submission.csv
