# imxd developer tasks.  `make run` starts the server in the foreground on
# etc/imxd.toml; `make test` runs the whole test suite; `make demo` runs two
# servers on loopback and shows two people using them with the `imx` tool;
# `make bench` measures (docs/performance.md).  All build the
# virtual environment in $(VENV) first when setup.cfg or pyproject.toml change;
# it builds the codec's C accelerator (imxd/wire/_speedups.c) too, installing
# a C compiler and Python's headers from apt when they are missing.

VENV ?= .venv
PYTHON ?= python3
PYTEST_ARGS ?= -q -p no:cacheprovider
# The tests insist on the accelerator that this Makefile builds.
TEST_ENV = IMXD_REQUIRE_SPEEDUPS=1
HAVE_BUILD_TOOLS = command -v cc >/dev/null 2>&1 && $(PYTHON) -c 'import os, sys, sysconfig; \
    sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
CONFIG ?= etc/imxd.toml

.PHONY: run test quicktest demo bench clean

$(VENV)/.installed: setup.cfg pyproject.toml setup.py imxd/wire/_speedups.c
	@if ! { $(HAVE_BUILD_TOOLS); }; then \
	    if [ "$$(id -u)" = 0 ]; then \
	        apt-get update && apt-get install -y gcc python3-dev; \
	    else \
	        echo "no C compiler or Python headers: imxd runs on its Python codec alone" >&2; \
	    fi; \
	fi
	@if ! $(PYTHON) -m venv $(VENV); then \
	    rm -rf $(VENV); \
	    if [ "$$(id -u)" = 0 ]; then \
	        apt-get update && apt-get install -y python3-venv; \
	    else \
	        echo "python3 -m venv failed; install python3-venv" >&2; exit 1; \
	    fi; \
	    $(PYTHON) -m venv $(VENV); \
	fi
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install --config-settings editable_mode=compat -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/twistd -n --pidfile= imxd --config $(CONFIG)

test: $(VENV)/.installed
	$(TEST_ENV) $(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests

quicktest: $(VENV)/.installed
	$(TEST_ENV) $(VENV)/bin/python -m pytest $(PYTEST_ARGS) -m "not slow" tests

demo: $(VENV)/.installed
	$(VENV)/bin/python demo/demo.py

# `make bench` runs every scenario (about 7 minutes, Prosody included);
# `make bench BENCH=quick` runs a short scenario 1 and ends with its JSON.
BENCH ?= full
bench: $(VENV)/.installed
	$(VENV)/bin/python bench/run.py $(if $(filter quick,$(BENCH)),--quick)

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp* .pytest_cache .hypothesis
	rm -f twisted/plugins/dropin.cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find imxd -name '*.so' -delete
