# Two entry points: `make demo` and `make test`. Both create .venv on first use. `make demo` installs
# only what the demo needs (torch and scikit-learn); `make test` installs everything on top of that
# (TensorFlow, JAX, moto, the dev tools...). Each set has its stamp, named after the checksum of
# pyproject.toml, this Makefile and constraints.txt (the pinned versions), so editing any reinstalls; the
# full set's stamp implies the demo's.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CHECKSUM := $(shell cat pyproject.toml Makefile constraints.txt | cksum | cut -d' ' -f1)
DEMO_STAMP := $(VENV)/.demo-installed-$(CHECKSUM)
STAMP := $(VENV)/.installed-$(CHECKSUM)
KERAS_BACKENDS := torch tensorflow jax
INTEGRATIONS := lightning,transformers,accelerate,ray,tensorboard,mlflow,wandb

.PHONY: demo test lint typecheck unit keras-tests bench crashtest clean

$(DEMO_STAMP): pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[demo]'
	rm -f $(VENV)/.demo-installed-*
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	# constraints.txt pins the tested versions (torch==2.13.0 among them, so the integrations' frameworks
	# keep the CPU build installed above): nothing for pip's resolver to search on a fresh machine.
	$(BIN)/python -m pip install -q -c constraints.txt \
	  -e '.[demo,torch,keras,s3,plot,dev,$(INTEGRATIONS)]' tensorflow-cpu jax 'moto[server]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(DEMO_STAMP)
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
	$(BIN)/python -m bench.direct_io

crashtest: $(STAMP)
	SAVEGAME_CRASH_TRIALS=500 $(BIN)/python -m pytest tests/crash -q

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
