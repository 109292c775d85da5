# The two commands: `make run` opens the dashboard, `make test` runs the test suite.
# Each creates .venv and installs the requirements first when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 8501

.PHONY: run test setup lint bench-disperse bench-train bench-eval clean-cache

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

run: $(VENV)/.installed
	$(BIN)/streamlit run app.py --server.port $(PORT)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check dtm pages app.py tests bench

bench-disperse: $(VENV)/.installed
	$(BIN)/python bench/disperse.py

bench-train: $(VENV)/.installed
	$(BIN)/python bench/train.py

bench-eval: $(VENV)/.installed
	$(BIN)/python bench/eval.py

clean-cache:
	find cache -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
