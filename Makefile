# make demo:    set up, then train and evaluate on the built-in synthetic data set.
# make test:    set up, then run the test suite.
# make test-numerics:    the numeric tests on every CPU code path this machine has.
# make check-cuda-build: build ops._C against a CUDA torch and check it (no GPU needed).
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
# One stamp per interpreter: each environment gets its own editable install and its own
# record of the requirements it was given (`make clean` forgets both).
EXT_STAMP := build/.ext-stamp$(subst /,_,$(PYTHON))
DEPS_STAMP := build/.deps-stamp$(subst /,_,$(PYTHON))

.PHONY: install deps test test-numerics check-cuda-build demo bench clean

install: deps $(EXT_STAMP)

ifdef VENV
$(VENV):
	@echo "creating the project's virtual environment .venv with $(BASE_PYTHON)"
	@$(BASE_PYTHON) -m venv .venv || { echo "'$(BASE_PYTHON) -m venv' failed: install your" \
	  "system's venv package (Debian/Ubuntu: apt install python3-venv), or run make with" \
	  "PYTHON=/path/to/python of an environment of yours"; rm -rf .venv; exit 1; }
endif

deps: $(DEPS_STAMP)

# Rerun when a requirements file changed (or the project's .venv was made again): the
# two pip runs that check everything took 6 s a time even with nothing to install.
$(DEPS_STAMP): $(VENV) $(wildcard requirements/*.txt)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(PIP) install -q -r requirements/build.txt
	@# No mmcv wheel exists for this torch: its C++ ops build from source the first time
	@# (pip caches the wheel), with a progress line a minute and the log kept. One compile
	@# job a core (MAX_JOBS, unless set): on 2 cores 2 jobs took 9.3 min, ninja's default
	@# of 4 took 11.2 (one build each, ~4.2 GB of memory at the peak either way).
	@$(PYTHON) -c "import mmcv.ops" 2>/dev/null || MAX_JOBS=$${MAX_JOBS:-$$(nproc 2>/dev/null || echo 2)} \
	  bash tools/misc/with_progress.sh build/logs/mmcv.log \
	  "building mmcv 2.1.0's C++ ops from source (once; 10 to 30 minutes on 2 cores)" \
	  $(PIP) install -v --no-build-isolation -r requirements/mmcv.txt
	$(PIP) install -q -r requirements/runtime.txt -r requirements/tests.txt -r requirements/deploy.txt
	@mkdir -p build && touch $@

# Rebuilt only when a source changed: the editable install compiles ops/_C in place.
$(EXT_STAMP): $(EXT_SOURCES)
	@bash tools/misc/with_progress.sh build/logs/ext.log "building the op extension ops/_C" \
	  $(PIP) install -v --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

# One pytest worker per core, at most 4 (pytest-xdist; TEST_JOBS=1 runs them in one
# process). Most tests run a tool on one thread, so one worker would leave the other
# cores idle. A test module's tests stay on one worker, with its module fixtures.
# Prints at its end how long setting up and testing took.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
test:
	@t0=$$(date +%s); $(MAKE) --no-print-directory install || exit $$?; t1=$$(date +%s); \
	  $(PYTHON) -m pytest tests --durations=15 \
	    $(if $(filter-out 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadscope); rc=$$?; t2=$$(date +%s); \
	  echo "make test: setting up $$(( (t1 - t0) / 60 ))m$$(( (t1 - t0) % 60 ))s," \
	    "tests $$(( (t2 - t1) / 60 ))m$$(( (t2 - t1) % 60 ))s"; exit $$rc

# The numeric tests (marked `numerics`) on every ATen CPU path this CPU has (default,
# avx2, avx512), with MKL and oneDNN held to the same instruction set, at 1 and 2 threads.
test-numerics: install
	PYTHON=$(PYTHON) bash tests/run_numerics.sh

# The CUDA build of ops._C against PyPI's CUDA torch, in .venv-cuda; no GPU needed.
check-cuda-build:
	bash tools/gpu/check_cuda_build.sh

demo: install
	PYTHON=$(PYTHON) bash tools/demo.sh

bench: install
	$(PYTHON) tools/analysis_tools/benchmark_multi_scale_deformable_attn.py

clean:
	rm -rf build ops/*.so *.egg-info
