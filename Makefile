# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
KERAS_BACKENDS := torch tensorflow jax

.PHONY: demo test lint typecheck unit keras-tests bench crashtest clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[torch,keras,s3,plot,dev]' tensorflow-cpu jax 'moto[server]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/savegame demo

test: $(STAMP) lint typecheck unit keras-tests

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy src/savegame

unit: $(STAMP)
	$(BIN)/python -m pytest tests --ignore=tests/keras -q

keras-tests: $(STAMP)
	@if [ -d tests/keras ]; then \
	  for b in $(KERAS_BACKENDS); do \
	    echo "== Keras tests, backend $$b"; \
	    KERAS_BACKEND=$$b $(BIN)/python -m pytest tests/keras -q || exit 1; \
	  done; \
	fi

bench: $(STAMP)
	$(BIN)/python -m bench
	$(BIN)/python -m bench.remote_upload --mib 1024

crashtest: $(STAMP)
	SAVEGAME_CRASH_TRIALS=500 $(BIN)/python -m pytest tests/crash -q

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
