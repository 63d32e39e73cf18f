VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test check fuzz bench results lint clean

# torch from PyPI is, on Linux x86-64, the CUDA build (gigabytes of NVIDIA libraries). For the CPU build:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[dev,ray,peers]'
	touch $(STAMP)

demo: install
	mkdir -p out
	$(PY) -m hmcompress compress sample_models/classifier/classifier.safetensors --tol 1e-2 -o out/classifier.hm.safetensors --force
	$(PY) -m hmcompress report out/classifier.hm.safetensors
	$(PY) -m hmcompress verify out/classifier.hm.safetensors --original sample_models/classifier/classifier.safetensors

# Tests run in two processes (pytest-xdist), torch on one thread in each: `make check` took 54 s
# this way against 88 s in one process with torch's two threads (2-core machine, 2026-12-01).
# Figures do not depend on the thread count (hmcompress computes each matrix on one thread).
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

# Everything, slow tests included.
test: install
	$(PYTEST) tests

# The fast tier while working: no test marked slow (pyproject.toml says which are).
check: install
	$(PYTEST) -m "not slow" tests

# 10,000 random byte mutations per loader and format, and 10,000 structural mutations of the JSON
# headers (safetensors headers, compressed files' metadata and stats), under a memory limit
# (make test runs 40 of each, deterministically).
fuzz: install
	HMCOMPRESS_FUZZ_EXAMPLES=10000 $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py

bench: install
	$(PY) -m benchmarks

results: install
	$(PY) -m sample_models.results --readme README.md --json out/results.json

# ruff (pyproject.toml): pyflakes, import order, unused arguments, syntax errors.
lint: install
	$(PY) -m ruff check hmcompress tests benchmarks sample_models

clean:
	rm -rf out .pytest_cache .hypothesis
