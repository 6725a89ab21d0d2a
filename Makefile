# make test: create or reuse .venv, install the project with its dev extra, run pytest.
# make demo: run the scoring job on the embedded default (local Ray, local files, demo model).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install test demo benchmark clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m jobs.demo

benchmark: $(STAMP)
	$(PY) -m jobs.benchmark

clean:
	rm -rf $(VENV) out demo-data .pytest_cache
