# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROFILE ?= demo
DATA   ?=
STORE  ?=
SET    ?=
# Prefect's home (ephemeral SQLite database, result records) lives in the checkout by default.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

PORT   ?= 4200

.PHONY: demo tiny test install bench serve docker-test clean-store

# torchattacks 3.5.1 (the PGD peer of the tests and benchmarks) pins requests~=2.25.1, which breaks
# other packages: install it without its dependencies (it needs only torch, numpy, scipy and tqdm,
# which the dev extra brings).
# With uv on PATH (`pip install uv`) the install takes ~25 s instead of 2-3 min (PyTorch's CUDA build
# is 5.5 GB unpacked; uv downloads and unpacks in parallel); UV= (empty) forces pip. uv reads neither
# pip.conf nor pip's constraints (it takes the registry's newest matching releases): where it fails
# (a private index, a proxy), make says so and installs with pip instead.
UV ?= $(shell command -v uv 2>/dev/null)
$(STAMP): pyproject.toml
	@if [ -n "$(UV)" ]; then \
		echo "make: installing .venv with uv ($(UV))"; \
		{ test -x $(BIN)/python || $(UV) venv -q --python "$$(command -v $(PYTHON))" $(VENV); } && \
		VIRTUAL_ENV=$(CURDIR)/$(VENV) $(UV) pip install -q -e '.[dev,timm]' && \
		VIRTUAL_ENV=$(CURDIR)/$(VENV) $(UV) pip install -q --no-deps torchattacks==3.5.1 && exit 0; \
		echo "make: uv could not install (above); installing with pip instead (UV= skips uv)"; \
		$(BIN)/python -m pip --version >/dev/null 2>&1 || rm -rf $(VENV); \
	fi; \
	set -e; \
	echo "make: installing .venv with pip (PyTorch's CUDA build: 2-3 min the first time)"; \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	$(BIN)/python -m pip install -q --upgrade pip; \
	$(BIN)/python -m pip install -q -e '.[dev,timm]'; \
	$(BIN)/python -m pip install -q --no-deps torchattacks==3.5.1
	touch $(STAMP)

install: $(STAMP)

# Without DATA the demo downloads CIFAR-10 with torchvision; when that fails (no internet: the CLI
# exits with 3) it says so and runs the tiny synthetic path instead, which needs no download.
demo: $(STAMP)
	@$(BIN)/advfeatures run --profile $(PROFILE) $(if $(DATA),--data $(DATA)) $(if $(STORE),--store $(STORE)) \
		$(foreach s,$(SET),--set $(s)); rc=$$?; \
	if [ $$rc -eq 3 ] && [ -z "$(DATA)" ]; then \
		echo "make demo: CIFAR-10 could not be downloaded (above). Running the tiny synthetic path instead" \
		     "(make tiny: synthetic images, not science); for the real demo: make demo DATA=path/to/cifar10"; \
		$(MAKE) --no-print-directory tiny; \
	else exit $$rc; fi

# The one-minute first run, no download: a tiny synthetic data set and every stage on it.
TINY_DATA ?= .advstore/synthetic-tiny.zip
tiny: $(STAMP)
	test -f $(TINY_DATA) || $(BIN)/advfeatures synth $(TINY_DATA)
	$(BIN)/advfeatures run --profile tiny --data $(TINY_DATA) $(if $(STORE),--store $(STORE)) \
		$(foreach s,$(SET),--set $(s))

# Every test (CI: .ci/run), on JOBS pytest workers (pytest-xdist; each module on one worker, the
# longest first: tests/conftest.py). JOBS=1: in this process, one test after another. FAST=1:
# without the tests marked slow (pytest -m "not slow"), for development. The 15 slowest are listed.
JOBS   ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 $(if $(filter-out 1,$(JOBS)),-n $(JOBS) --dist loadfile \
		--no-loadscope-reorder) $(if $(FAST),-m "not slow")

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_pgd.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_e2e.py $(if $(DATA),--data $(DATA))

# Prefect server + UI on http://127.0.0.1:$(PORT) (unless PREFECT_API_URL is set), the deployments
# served from one process; their shards go to a Dask LocalCluster per run, or to DASK=tcp://HOST:8786.
serve: $(STAMP)
	$(BIN)/advfeatures serve --port $(PORT) $(if $(DASK),--dask-address $(DASK))

# Docker: builds the images (a local debootstrap base if BASE_IMAGE is unset), starts the compose
# stack (Prefect server on PostgreSQL, a stock Prefect worker, a Dask scheduler and 2 Dask workers),
# runs a tiny replication through the replicate deployment, kills a Dask worker mid-shard and checks
# that the set is byte-identical to a local run. Needs a Docker engine (docker/README.md).
docker-test: $(STAMP)
	PY=$(BIN)/python docker/test.sh

clean-store:
	rm -rf .advstore
