# Two entry points, both self-contained on a fresh machine:
#   make demo   - the whole pipeline on the bundled model organism
#   make test   - the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
WORKDIR ?= runs/demo

.PHONY: demo test lint bench clean install

LABEL_WHEEL := $(VENV)/label-sets/pyrit-1.1.0-py3-none-any.whl

install: $(STAMP) $(LABEL_WHEEL)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 is a CPU build on the project's machines;
	# an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# PyRIT's human-labelled refusal pairs, read from its wheel by training/label_sets.py (the judge's
# held-out floor). --no-deps: only the file is fetched, nothing of PyRIT is installed.
$(LABEL_WHEEL): | $(STAMP)
	$(PY) -m pip download --quiet --no-deps --dest $(VENV)/label-sets pyrit==1.1.0

demo: install
	$(VENV)/bin/curate demo --workdir $(WORKDIR)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
