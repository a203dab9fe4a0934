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

.PHONY: demo test install clean-store

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/advfeatures run --profile $(PROFILE) $(if $(DATA),--data $(DATA)) $(if $(STORE),--store $(STORE)) \
		$(foreach s,$(SET),--set $(s))

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean-store:
	rm -rf .advstore
