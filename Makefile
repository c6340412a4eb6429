# Two entry points for a fresh machine with Python 3.11 and the system compilers:
#   make bench   create .venv, install, build the extension, run the benchmark harness, write a report
#   make test    the same set-up, then the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)
BENCH_DIR := bench-results

.PHONY: install test bench clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements-dev.txt
	touch $@

# Editable install, the extension built in place against the torch in .venv; the build must succeed.
$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml CMakeLists.txt $(EXT_SOURCES)
	AELEARN_REQUIRE_EXT=1 $(PIP) install --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

test: install
	$(VENV)/bin/pytest tests -q

bench: install
	$(PIP) install -r requirements-bench.txt
	mkdir -p $(BENCH_DIR)
	$(VENV)/bin/pytest benchmarks -q --benchmark-json=$(BENCH_DIR)/benchmarks.json
	$(PY) benchmarks/report.py $(BENCH_DIR)/benchmarks.json --out $(BENCH_DIR)

clean:
	rm -rf build $(VENV) $(BENCH_DIR) aelearn/_C*.so *.egg-info
