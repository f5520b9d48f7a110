# The README's two commands: `make demo` and `make test`. Both build the venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-crash test-real install browser pg15 bench bench-refresh lint-compare bench-startup bench-parallel bench-curves bench-floor clean


demo: install
	$(BIN)/dataops demo

test: install
	$(BIN)/pytest -q

# The tests marked `extended`: every cell of the crash matrix beyond make test's sample (make test runs
# every restore and verify cell, every migration failpoint once and a fixed sample of the others), the
# faults from outside (server restarts, terminated sessions, S3 dying), the signal tests, prune during a
# backup, the concurrency refusals, the CI pipelines of infra/ci, a deployment run of every flow, the
# heartbeat watch, the freshness alert, the browser test of the UI, the PostgreSQL 15 tests and two workers
# serving the pool (tests/test_two_workers.py). CI runs it after make test.
test-crash: install browser pg15
	$(BIN)/pytest -q -m extended

# Every operation (backup, verify, restore, validate, migrate, transform, refresh, anonymize, leak scan) on the
# public sample databases committed in tests/real/ (pagila, northwind, chinook, employees), with a table of
# seconds per command at the end. Offline: nothing is downloaded.
test-real: install
	$(BIN)/pytest -q -m real

# tests/test_pg15.py runs a PostgreSQL 15 server beside the embedded 16 (backup 15 -> restore 16, refresh
# 15 -> 16, the refusal of 16 -> 15, validate and migrate on 15): Debian's postgresql-15, installed when
# missing. If it cannot be, those tests fail saying so; DATAOPS_SKIP_PG15=1 skips them on purpose.
pg15:
	@test -x /usr/lib/postgresql/15/bin/postgres || test "$$DATAOPS_SKIP_PG15" = 1 || \
	  { echo "installing postgresql-15 for tests/test_pg15.py (apt-get)"; \
	    $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q postgresql-15 >/dev/null 2>&1 || \
	    { $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -q >/dev/null && \
	      $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q postgresql-15 >/dev/null; } || \
	    echo "could not install postgresql-15: tests/test_pg15.py will fail (DATAOPS_SKIP_PG15=1 skips it)"; }

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

# Start-up per command and the CI pipeline, before and after the local Prefect API (issue 18).
bench-startup: install
	$(BIN)/python bench/bench_startup.py

# The refresh against pg_anon and pganonymize, installed in a venv of their own (.venv-bench-tools).
bench-refresh: install .venv-bench-tools/bin/python
	$(BIN)/python bench/bench_refresh.py

# backups.jobs 1 against 2 and pg_dump -Fd -j 2 alone, side by side at 100k and 1M rows (issue 18)
bench-parallel: install
	$(BIN)/python bench/bench_backup.py --parallel

# Backup, restore, validate, transforms and refresh at 100k, 1M and 3M users: bench/curves.png and a RESULTS section.
bench-floor: install .venv-bench-tools/bin/python
	$(BIN)/python bench/bench_refresh_floor.py

bench-curves: install
	$(BIN)/python bench/bench_curves.py

.venv-bench-tools/bin/python:
	$(PYTHON) -m venv .venv-bench-tools
	.venv-bench-tools/bin/pip install -q pg-anon==1.12.0 pganonymize==0.13.0 psycopg2-binary

clean:
	rm -rf $(VENV) .dataops .pytest_cache

# Migration lint side by side with squawk (docs/lint-rules.md): squawk-cli 2.66.0 from npm into .cache/squawk, then
# bench/bench_lint.py lints tests/lint_corpus with both, records squawk's answers in
# tests/lint_corpus/squawk-2.66.json (what make test compares against, without npm) and writes its section of
# bench/RESULTS.md.
lint-compare: install .cache/squawk/node_modules/.bin/squawk
	$(BIN)/python bench/bench_lint.py --squawk .cache/squawk/node_modules/.bin/squawk

.cache/squawk/node_modules/.bin/squawk:
	mkdir -p .cache/squawk
	cd .cache/squawk && npm install --no-save --no-audit --no-fund squawk-cli@2.66.0
