# Two entry points: `make demo` (whole pipeline) and `make test` (test suite). Both create the
# pinned virtualenv first if it is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export OMP_WAIT_POLICY := PASSIVE
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TRANSFORMERS_VERBOSITY := error
export DVC_NO_ANALYTICS := 1
export DVC_SITE_CACHE_DIR := $(abspath .dvc/site-cache)
export PREFECT_HOME := $(abspath .prefect)
export PREFECT_LOCAL_STORAGE_PATH := $(abspath .prefect/storage)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_LOGGING_LEVEL := WARNING
# a loaded 2-core machine can take longer than Prefect's default 20 s to start the temporary API server
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: venv demo test flow clean
venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt requirements-eval.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-test.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-eval.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

demo: venv
	$(PY) -m rain_dev.demo

flow: venv
	$(VENV)/bin/rain flow

test: venv
	$(PY) -m pytest -q -n 2 --no-loadscope-reorder  # two workers; tests/conftest.py groups the files

clean:
	rm -rf models/base models/itm models/lrm models/merged models/baselines artifacts metrics plots reports .prefect
