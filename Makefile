# The README's two commands: `make demo` and `make test`. Both build the venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install bench clean

demo: install
	$(BIN)/dataops demo

test: install
	$(BIN)/pytest -q

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

bench: install
	$(BIN)/python bench/bench_backup.py

clean:
	rm -rf $(VENV) .dataops .pytest_cache
