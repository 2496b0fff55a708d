# Fresh machine: `make train` (sets up, runs the main job) or `make test` (sets up, runs the tests).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
# The extras `install` adds (pyproject.toml): dev is every optional part (the embedded model
# that `make train` runs, Optuna, SLURM, TensorBoard, the notebook tools) plus the test
# tools that `make test` runs.
EXTRAS ?= dev

.PHONY: install test test-fast train smoke format lint clean study-matched-kl

$(BIN)/fpo-train: pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: this exact version is the CPU build already on this kind of machine;
	# any other spec would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(BIN)/fpo-train

install: $(BIN)/fpo-train  ## create .venv and install the package with its extras (EXTRAS)

test: install  ## the whole suite, offline (slow tests on the real gemma-3-270m included)
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/pytest -q $(PYTEST_ARGS)

test-fast: install  ## everything except the real-model tests
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

smoke: install  ## all five objectives on the tiny model, one Hydra multirun
	$(BIN)/fpo-train -m experiment=smoke objective=dpo,simpo,tdpo1,tdpo2,fpo

MAIN_JOB ?= experiment=sentiment_gemma3

train: install  ## the main job: reference cache, FPO on gemma-3-270m, evaluation (logs/latest)
	$(BIN)/fpo-cache $(MAIN_JOB)
	$(BIN)/fpo-train $(MAIN_JOB)

# Protocol 2 of docs/results.md (every objective at matched KL): reference caches, each
# objective's knob calibrated to 3 and 6 nats of validation KL, 5 seeds at the bracketing
# values, fpo-compare --at-kl, export into docs/results/matched_kl/. CPU days; resumable:
# run it again and finished runs are read, an interrupted one resumes.
study-matched-kl: install  ## protocol 2 of docs/results.md, every stage (resumable)
	$(BIN)/fpo-study --protocol matched_kl

format: install  ## ruff lint + format through pre-commit
	$(BIN)/pre-commit run --all-files

lint: install
	$(BIN)/ruff check src tests && $(BIN)/ruff format --check src tests

clean:
	rm -rf logs/train logs/debug logs/cache .pytest_cache .ruff_cache
