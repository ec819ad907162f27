# make bench     - the benchmark report (the main job)
# make test      - the test suite (what CI runs)
# make fuzz      - tests/test_fuzz.py with 10x the examples, new random ones each run
# make mutants   - the mutation harness: every deliberately wrong kernel must fail the tests
# make gpu-check - on a GPU machine: CUDA-tensor tests + benchmark against SDPA flash
# make sanitize  - the C++ kernels' tests against an AddressSanitizer + UBSan build of _C, made
#                  in build/sanitize (the optimized in-place build is left alone)
# All create .venv, install torch and the rest, and build the extension on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A fresh machine without a GPU should get a CPU build of torch: here torch==2.13.0 resolves to
# the CPU wheel on disk; elsewhere point TORCH_INDEX at a CPU wheel index (pip --index-url).
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

DEPS      := $(VENV)/.deps
INSTALLED := $(VENV)/.installed
BUILT     := $(VENV)/.built
CXX_SOURCES := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
SOURCES := setup.py $(CXX_SOURCES)

.PHONY: test fuzz bench bench-quick build sanitize lint typecheck clean mutants
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
$(INSTALLED): $(DEPS) setup.py pyproject.toml
	SCREENING_ATTN_NO_EXT=1 $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

$(BUILT): $(INSTALLED) $(SOURCES)
	$(BIN)/python setup.py -q build_ext --inplace
	touch $@

build: $(BUILT)

test: $(BUILT)
	$(BIN)/python -m pytest tests screening_attn kernels -q $(PYTEST_ARGS)

# The tests that run the C++ kernels against build/sanitize/.../_C*.so, which
# SCREENING_ATTN_EXTENSION makes the package load (Triton's are deselected: under the interpreter
# they never reach C++; so is test_build.py: nvcc crashes with libasan preloaded). CPython is not
# built with ASan, so libasan is preloaded (it must come first), and leak checking is off: CPython
# and torch keep allocations alive until exit by design. halt_on_error (and
# -fno-sanitize-recover in setup.py) turn any report into a failed run; --capture=sys leaves
# stderr to the sanitizers (pytest's fd capture would swallow a report that ends the process).
# Here: several minutes of tests (the fuzz file is the longest); rebuilding the extension adds 5-8 min (a shared 2-core VM).
SAN_DIR := build/sanitize
SAN_TESTS := tests/test_attention_kernels.py tests/test_rnn_kernels.py tests/test_feedback_*.py \
	tests/test_determinism.py \
	tests/test_hostile_inputs.py tests/test_fuzz.py
SAN_ENV := LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	SCREENING_ATTN_EXTENSION="$$(ls $(SAN_DIR)/screening_attn/_C*.so)" \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}
sanitize: $(INSTALLED)
	SANITIZE=1 $(BIN)/python setup.py -q build_ext --force --build-lib $(SAN_DIR) \
		--build-temp $(SAN_DIR)/tmp
	$(SAN_ENV) $(BIN)/python -c "import screening_attn as s; i = s.build_info(); \
		assert i['loaded'] and i['address_sanitizer'], i"
	$(SAN_ENV) $(BIN)/python -m pytest $(SAN_TESTS) -q --capture=sys -k "not triton" $(PYTEST_ARGS)

# tests/test_fuzz.py with 10x the examples, freshly random each run (the "fuzz" profile of
# tests/conftest.py; failures are saved in .hypothesis/ and replayed first next time).
fuzz: $(BUILT)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/test_fuzz.py -q \
		--hypothesis-show-statistics $(PYTEST_ARGS)

# One thread by default: this machine's two cores throttle under sustained load.
# BASELINE=<json> compares with an earlier result and flags cases more than 10% slower.
# bench.readme then writes the latest complete run (default or --full) into README.md.
BASELINE ?=
bench: $(BUILT)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m bench.report $(BENCH_ARGS) \
		$(if $(BASELINE),--baseline $(BASELINE))
	$(BIN)/python -m bench.readme

bench-quick:
	$(MAKE) bench BENCH_ARGS="--quick $(BENCH_ARGS)"

# make quality: the learned-task quality benchmark (bench/quality; QUALITY_ARGS="--quick" or
# "--only cnnf"). One thread unless OMP_NUM_THREADS says otherwise: the models are small and the
# budgets (default <= 15 min, --quick <= 3) are measured on one; the JSON records the count.
.PHONY: quality
quality: $(BUILT)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m bench.quality $(QUALITY_ARGS)

# Python (ruff), C++ / CUDA (clang-format, style in .clang-format) and the package's type hints
# (mypy, [tool.mypy] in pyproject.toml): checks only, no rewrite.
lint: $(DEPS)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/clang-format --dry-run -Werror $(CXX_SOURCES)
	$(BIN)/mypy

# mypy on the package ([tool.mypy] in pyproject.toml: the public API fully annotated).
typecheck: $(DEPS)
	$(BIN)/mypy

clean:
	rm -rf build $(BUILT) screening_attn/*.so

# Mutation testing (tests/mutants/): each wrong kernel patched in at its op must fail the suite;
# writes build/mutants.json. MUTANTS_ARGS="--only attention-cpu" runs a subset.
mutants: $(BUILT)
	$(BIN)/python tests/mutants/run.py $(MUTANTS_ARGS)

# make gpu-static: compile every Triton kernel specialisation for sm_80 and sm_90 (no GPU
# needed) and fail if one exceeds shared memory, spills, or keeps half-precision or TF32
# products off the tensor cores; writes bench/results/gpu-static.json (bench/gpu_static.py).
# Cached in build/gpu-static/ by kernel source: a re-run rebuilds only what changed.
# GPU_STATIC_ARGS="--dtype tf32 --merge" rebuilds a subset into the JSON, keeping the rest.
.PHONY: gpu-static
gpu-static: $(INSTALLED)
	$(BIN)/python -m bench.gpu_static $(GPU_STATIC_ARGS)

# make gpu-check: on a machine with one CUDA GPU (< 10 min): the tests of the GPU backends on
# CUDA tensors, then screened attention (Triton) against SDPA's flash kernel and, if installed,
# flash-attn's sliding window; writes bench/results/gpu-*.json and plots (bench/gpu_check.py).
# Without a GPU it says so and fails.
.PHONY: gpu-check
gpu-check: $(BUILT)
	$(BIN)/python -m bench.gpu_check $(GPU_CHECK_ARGS)
