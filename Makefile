# Two commands on a fresh machine (Python 3.10+ and make):
#   make demo   virtual environment + requirements, the phantom, and every notebook executed into outputs/
#   make test   virtual environment + requirements, ruff, and the test suite
# and: make bench (training throughput, benchmarks/train_throughput.py; meant for a GPU)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: demo test lint phantom bench clean

demo: $(VENV)/.installed phantom
	@mkdir -p outputs
	@for nb in $(NOTEBOOKS); do \
		echo "== $$nb"; \
		$(BIN)/papermill "$$nb" "outputs/$$(basename $$nb)" --cwd notebooks -k python3 --log-level WARNING || exit 1; \
	done
	@echo "executed notebooks and figures are in outputs/"

test: $(VENV)/.installed lint
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/train_throughput.py

phantom: $(VENV)/.installed
	$(BIN)/python -c "import mura_helpers as mh; print('phantom:', mh.ensure_phantom('data/phantom'))"

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

clean:
	rm -rf outputs/*.ipynb outputs/figures data/phantom data/cache
