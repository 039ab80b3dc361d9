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
	# the distilled few-step model: one UNet pass per step, 4 steps
	$(BIN)/sdlab generate "a large red circle in the top left on a blue background" \
		--model shapes-fast --seed 0 --num-images 4 --out outputs/fast
	@echo "images are in $(CURDIR)/outputs and outputs/fast (see 'sdlab info outputs/<file>.png')"

# The web page is tested in Debian's Chromium (driven by Playwright, no browser download).
BROWSER := /usr/bin/chromium

$(BROWSER):
	@command -v apt-get >/dev/null || { echo "install Chromium (or set SDLAB_NO_BROWSER=1)"; exit 1; }
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

test: $(STAMP) $(if $(SDLAB_NO_BROWSER),,$(BROWSER))
	$(BIN)/python -m pytest -q tests

test-slow: $(STAMP)
	SDLAB_SLOW=1 $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) outputs
