# `make run` and `make test` work on a fresh machine with only Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test test-slow clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: here the CPU build on disk, elsewhere PyPI's build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/sdlab generate "a large red circle in the top left on a blue background" \
		--seed 0 --num-images 4 --out outputs
	$(BIN)/sdlab generate "a small yellow triangle in the bottom right on a purple background" \
		--model shapes-fast --seed 0 --num-images 4 --out outputs
	@echo "images are in $(CURDIR)/outputs (see 'sdlab info outputs/<file>.png')"

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-slow: $(STAMP)
	SDLAB_SLOW=1 $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) outputs
