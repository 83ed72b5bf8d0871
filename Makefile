# Two entry points (README quick start): `make run` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

.PHONY: setup run test
setup: $(STAMP)

run: $(STAMP)
	$(BIN)/dpops run

test: $(STAMP)
	DVC_NO_ANALYTICS=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow"
