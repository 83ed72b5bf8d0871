# Two entry points (README quick start): `make run` and `make test`. Both set up .venv first.
# make test      = make lint + the whole suite (what CI runs: .ci/run)
# make test-fast = the fast tier (-m "not slow": no end-to-end subprocess runs), 1 min 27 s on 2 cores (0.12.0)
# make lint      = ruff check, ruff format --check, mypy (every function annotated: pyproject.toml [tool.mypy])
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST := DVC_NO_ANALYTICS=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,dev]'
	touch $(STAMP)

.PHONY: setup run lint test test-fast
setup: $(STAMP)

run: $(STAMP)
	$(BIN)/dpops run

# All three run and report; the target fails if any of them failed.
lint: $(STAMP)
	@status=0; \
	$(BIN)/ruff check . || status=1; \
	$(BIN)/ruff format --check . || status=1; \
	$(BIN)/mypy || status=1; \
	exit $$status

test: lint
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"
