# The README's two commands: `make demo` and `make test`. Both build the venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-crash install browser bench bench-refresh clean

demo: install
	$(BIN)/dataops demo

test: install browser
	$(BIN)/pytest -q

# The tests marked `extended`: every cell of the crash matrix beyond make test's sample (make test runs
# every restore, verify and migrate cell and a fixed sample of the others), the fault and signal tests,
# the concurrency refusals and the freshness alert through a deployment. CI runs it after make test.
test-crash: install browser
	$(BIN)/pytest -q -m extended

# The UI test drives Debian's chromium with playwright (no `playwright install`, no download).
browser:
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || \
	  { echo "installing chromium for the browser test (apt-get)"; \
	    $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -q >/dev/null && \
	      $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q chromium >/dev/null; }; }

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,test,bench]'
	touch $@

# Each script rewrites its own section of bench/RESULTS.md. Run them on a quiet machine.
bench: install
	$(BIN)/python bench/bench_backup.py
	$(BIN)/python bench/bench_validation.py
	$(BIN)/python bench/bench_migrations.py
	$(BIN)/python bench/bench_transform.py

# The refresh against pg_anon and pganonymize, installed in a venv of their own (.venv-bench-tools).
bench-refresh: install .venv-bench-tools/bin/python
	$(BIN)/python bench/bench_refresh.py

.venv-bench-tools/bin/python:
	$(PYTHON) -m venv .venv-bench-tools
	.venv-bench-tools/bin/pip install -q pg-anon==1.12.0 pganonymize==0.13.0 psycopg2-binary

clean:
	rm -rf $(VENV) .dataops .pytest_cache
