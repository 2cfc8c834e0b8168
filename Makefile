# make install: dependencies + the op extension (idempotent; never replaces your torch).
# make test:    install, then the test suite.
# make demo:    install, then train and evaluate on the built-in synthetic data set.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0
EXT_SOURCES := setup.py $(shell find ops/csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')
EXT_STAMP := build/.ext-stamp

.PHONY: install deps test demo bench clean

install: deps $(EXT_STAMP)

deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(PIP) install -q -r requirements/build.txt
	$(PIP) install -q --no-build-isolation -r requirements/mmcv.txt
	$(PIP) install -q -r requirements/runtime.txt -r requirements/tests.txt

# Rebuilt only when a source changed: the editable install compiles ops/_C in place.
$(EXT_STAMP): $(EXT_SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $@

test: install
	$(PYTHON) -m pytest tests

demo: install
	bash tools/demo.sh

bench: install
	$(PYTHON) tools/analysis_tools/benchmark_multi_scale_deformable_attn.py

clean:
	rm -rf build ops/*.so *.egg-info
