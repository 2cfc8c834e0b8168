# make demo:    set up, then train and evaluate on the built-in synthetic data set.
# make test:    set up, then run the test suite.
#
# Setting up installs the dependencies and builds the op, into:
#   - the interpreter given as PYTHON=..., if any;
#   - else the active virtual environment (VIRTUAL_ENV or CONDA_PREFIX);
#   - else the project's own .venv, made on first use with $(BASE_PYTHON) -m venv
#     (stock Debian/Ubuntu Pythons refuse system-wide installs: PEP 668).
# It is idempotent and never replaces an installed torch.
BASE_PYTHON ?= python3
ACTIVE_ENV := $(or $(VIRTUAL_ENV),$(CONDA_PREFIX))
ifdef PYTHON
  VENV :=
else ifneq ($(ACTIVE_ENV),)
  PYTHON := $(ACTIVE_ENV)/bin/python
  VENV :=
else
  PYTHON := .venv/bin/python
  VENV := .venv/bin/python
endif
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0
EXT_SOURCES := setup.py $(shell find ops/csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')
# One stamp per interpreter: each environment gets its own editable install.
EXT_STAMP := build/.ext-stamp$(subst /,_,$(PYTHON))

.PHONY: install deps test demo bench clean

install: deps $(EXT_STAMP)

ifdef VENV
$(VENV):
	@echo "creating the project's virtual environment .venv with $(BASE_PYTHON)"
	@$(BASE_PYTHON) -m venv .venv || { echo "'$(BASE_PYTHON) -m venv' failed: install your" \
	  "system's venv package (Debian/Ubuntu: apt install python3-venv), or run make with" \
	  "PYTHON=/path/to/python of an environment of yours"; rm -rf .venv; exit 1; }
endif

deps: $(VENV)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(PIP) install -q -r requirements/build.txt
	@$(PYTHON) -c "import mmcv.ops" 2>/dev/null || echo "building mmcv 2.1.0's C++ ops from" \
	  "source (no wheel exists for this torch): about 10 minutes the first time, then cached"
	$(PIP) install -q --no-build-isolation -r requirements/mmcv.txt
	$(PIP) install -q -r requirements/runtime.txt -r requirements/tests.txt -r requirements/deploy.txt

# Rebuilt only when a source changed: the editable install compiles ops/_C in place.
$(EXT_STAMP): $(EXT_SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

test: install
	$(PYTHON) -m pytest tests

demo: install
	PYTHON=$(PYTHON) bash tools/demo.sh

bench: install
	$(PYTHON) tools/analysis_tools/benchmark_multi_scale_deformable_attn.py

clean:
	rm -rf build ops/*.so *.egg-info
