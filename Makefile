# make bench  - the benchmark report (the main job)
# make test   - the test suite (what CI runs)
# make fuzz   - tests/test_fuzz.py with 10x the examples, new random ones each run
# Both create .venv, install torch and the rest, and build the extension on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A fresh machine without a GPU should get a CPU build of torch: here torch==2.13.0 resolves to
# the CPU wheel on disk; elsewhere point TORCH_INDEX at a CPU wheel index (pip --index-url).
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

DEPS  := $(VENV)/.deps
BUILT := $(VENV)/.built
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

.PHONY: test fuzz bench bench-quick build lint clean
.DEFAULT_GOAL := test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(PIP_TORCH_FLAGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

# The editable install (it maps kernels/ to screening_attn._kernels) skips the extension, which
# ninja then builds, and later rebuilds, in place.
$(BUILT): $(DEPS) $(SOURCES)
	SCREENING_ATTN_NO_EXT=1 $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	$(BIN)/python setup.py -q build_ext --inplace
	touch $@

build: $(BUILT)

test: $(BUILT)
	$(BIN)/python -m pytest tests -q $(PYTEST_ARGS)

# tests/test_fuzz.py with 10x the examples, freshly random each run (the "fuzz" profile of
# tests/conftest.py; failures are saved in .hypothesis/ and replayed first next time).
fuzz: $(BUILT)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/test_fuzz.py -q \
		--hypothesis-show-statistics $(PYTEST_ARGS)

# One thread by default: this machine's two cores throttle under sustained load.
# BASELINE=<json> compares with an earlier result and flags cases more than 10% slower.
BASELINE ?=
bench: $(BUILT)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m bench.report $(BENCH_ARGS) \
		$(if $(BASELINE),--baseline $(BASELINE))

bench-quick:
	$(MAKE) bench BENCH_ARGS="--quick $(BENCH_ARGS)"

lint: $(DEPS)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf build $(BUILT) screening_attn/*.so
