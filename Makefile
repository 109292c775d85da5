# The two commands: `make run` opens the dashboard, `make test` runs the test suite.
# Each creates .venv and installs the requirements first when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8501
# The browser tests drive Debian's Chromium (a browser download by Playwright cannot work
# offline); `make test` installs it with apt when it is missing.
CHROMIUM ?= /usr/bin/chromium

.PHONY: run test setup lint bench-disperse bench-train bench-eval clean-cache chromium screenshots

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    echo "installing Debian's chromium for the browser tests"; \
	    ( $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	      $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null ) || \
	    echo "could not install chromium: the browser tests will skip (and fail under CI)"; \
	  else \
	    echo "no apt-get: install Chromium at $(CHROMIUM) to run the browser tests (they skip)"; \
	  fi; \
	fi

run: $(VENV)/.installed
	$(BIN)/streamlit run app.py --server.port $(PORT)

test: $(VENV)/.installed-dev chromium
	DTM_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest

# The README's pictures (docs/img/): the small lab and a short story in a temporary cache.
screenshots: $(VENV)/.installed-dev chromium
	DTM_CHROMIUM=$(CHROMIUM) $(BIN)/python -m tests.screenshots

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check dtm views app.py tests bench studies

bench-disperse: $(VENV)/.installed
	$(BIN)/python -m bench.disperse

bench-train: $(VENV)/.installed
	$(BIN)/python -m bench.train

bench-eval: $(VENV)/.installed
	$(BIN)/python -m bench.eval

clean-cache:
	find cache -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
