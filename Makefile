# Two commands on a fresh machine (Python 3.10+ and make):
#   make demo   virtual environment + requirements, the phantom, and every notebook executed into outputs/
#               (DEMO=quick by default: CPU-sized settings; make demo DEMO=full for the notebooks' own defaults)
#   make test   virtual environment + requirements, ruff, and the whole test suite (what CI runs)
# and: make test-fast (ruff and the tests not marked slow: no notebook runs, torchrun or training runs),
#      make lab (JupyterLab on notebooks/ with this environment's kernel),
#      make bench (training throughput, benchmarks/train_throughput.py; meant for a GPU),
#      make test-colab (the fast tier and the six notebook runs in a copy of Colab's runtime: before each release),
#      make colab-url (writes pyproject.toml's repository URL into the notebooks' setup cells),
#      make gallery (docs/gallery.md: the demo's figures, downscaled, labelled as phantom data)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast test-colab colab-url gallery lint lab phantom bench clean

# DEMO=quick (default): sizes a CPU finishes in minutes (from scratch, 128 px, 2 epochs), into outputs/;
# DEMO=full: every notebook's own defaults (ImageNet weights, 224 px, 5 epochs; 512-px autoencoders, 20 epochs),
# meant for a GPU, into outputs/full/ (so the two never resume each other's runs).
DEMO ?= quick
PAPERMILL := $(BIN)/papermill --cwd notebooks -k python3 --log-level WARNING
# The phantom: DEMO=quick keeps v6's 240 patients (902 views; the default 1,000, about real XR_HAND's scale, has
# four times as many for a CPU to read, mask and train on); notebook 04 says whether its model learned
ifeq ($(DEMO),quick)
OUT := outputs
PHANTOM_PATIENTS := 240
ARGS_03 := -p pretrained False -p image_size 128 -p epochs 2 -p batch_size 16
ARGS_06 := -p image_size 128 -p gan_image_size 64 -p epochs 2 -p batch_size 16
DEMO_SETTINGS := the demo's CPU settings (DEMO=quick: a 240-patient phantom, models from scratch at 128 px, GANs \
at 64 px, 2 epochs)
else
OUT := outputs/full
PHANTOM_PATIENTS := 1000
DEMO_SETTINGS := the notebooks' own defaults (DEMO=full)
endif
ARGS := -p output_dir $(CURDIR)/$(OUT)
DATA_ARGS := $(ARGS) -p phantom_patients $(PHANTOM_PATIENTS)

demo: $(VENV)/.installed phantom
	@mkdir -p $(OUT)
	$(PAPERMILL) notebooks/01_eda.ipynb $(OUT)/01_eda.ipynb $(DATA_ARGS)
	$(PAPERMILL) notebooks/02_pipeline_check.ipynb $(OUT)/02_pipeline_check.ipynb $(DATA_ARGS)
	$(PAPERMILL) notebooks/03_training.ipynb $(OUT)/03_training.ipynb $(DATA_ARGS) $(ARGS_03)
	$(PAPERMILL) notebooks/04_results.ipynb $(OUT)/04_results.ipynb $(ARGS)
	$(PAPERMILL) notebooks/05_predict.ipynb $(OUT)/05_predict.ipynb $(ARGS)
	$(PAPERMILL) notebooks/06_anomaly_detection.ipynb $(OUT)/06_anomaly_detection.ipynb $(DATA_ARGS) $(ARGS_06)
	@echo "executed notebooks are in $(OUT)/, figures in $(OUT)/figures/, numbers in $(OUT)/*.json and *.csv"

# The tests run in parallel, one pytest-xdist worker a core (each worker's torch takes its share of the cores:
# tests/conftest.py), a test file to a worker (--dist loadfile: a file's module fixtures are built once);
# PYTEST_WORKERS=0 runs them in this process, one after another.
PYTEST_WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

test: $(VENV)/.installed lint
	$(PYTEST)

test-fast: $(VENV)/.installed lint
	$(PYTEST) -m "not slow"

lint: $(VENV)/.installed
	$(BIN)/ruff check .

# The kernel spec goes into the environment itself (--sys-prefix), where Jupyter looks before a user's own
# "python3" spec, so the notebooks run on this environment's Python. LAB_ARGS=--no-browser for a remote machine.
LAB_ARGS ?=
lab: $(VENV)/.installed
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3" >/dev/null
	$(BIN)/jupyter lab --ServerApp.root_dir=notebooks $(LAB_ARGS)

# Colab's runtime as published (colab-pins.txt: Colab's versions, its source and date), on Python 3.13 where this
# machine has one (Colab's), then requirements.txt as the notebooks' setup cell installs it in Colab (it adds
# papermill). Not run by CI (.ci/run): its install downloads about 3 GB (torch for CUDA); run it before each release.
COLAB_VENV ?= .venv-colab
COLAB_PYTHON ?= $(firstword $(foreach p,python3.13 $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13),\
                  $(if $(shell $(p) -c "" 2>/dev/null && echo ok),$(p))) $(PYTHON))

test-colab: $(COLAB_VENV)/.installed
	$(COLAB_VENV)/bin/python -m pytest -m "not slow or notebook"

$(COLAB_VENV)/.installed: colab-pins.txt requirements.txt
	$(COLAB_PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_VENV)/bin/python -m pip install --quiet -r colab-pins.txt
	$(COLAB_VENV)/bin/python -m pip install --quiet -r requirements.txt
	$(COLAB_VENV)/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null  # papermill's kernel
	touch $@

# The figures of the last `make demo` run (the same DEMO) when they are there, else a demo run first; then
# docs/gallery/ and docs/gallery.md (docs/make_gallery.py picks the figures). From scratch: make demo gallery.
gallery: $(VENV)/.installed
	@test -d $(OUT)/figures || $(MAKE) demo DEMO=$(DEMO)
	$(BIN)/python docs/make_gallery.py $(OUT)/figures --settings "$(DEMO_SETTINGS)"

colab-url: $(VENV)/.installed
	$(BIN)/python -m mura_helpers colab-url

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/train_throughput.py

phantom: $(VENV)/.installed
	$(BIN)/python -c "import mura_helpers as mh; print('phantom:', \
	                  mh.ensure_phantom('data/phantom', n_patients=$(PHANTOM_PATIENTS)))"

# uv installs the requirements (about 3 GB: torch's wheels with their CUDA libraries) three times as fast as pip:
# 61 s against 194 s on CI's 2-core machine, where the whole of .ci/run has 12 minutes; pip installs uv first.
# --compile-bytecode as pip does: without .pyc files (and with PYTHONDONTWRITEBYTECODE set, as on CI) every new
# process compiles torch's sources again, and `import torch` takes 12-14 s instead of 5. uv reads no pip.conf: where
# only pip reaches the packages (a mirror set there), uv fails and pip installs them as before, more slowly.
REQUIREMENTS := -r requirements.txt -r requirements-dev.txt
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv && \
	  $(BIN)/uv pip install --python $(BIN)/python --quiet --compile-bytecode $(REQUIREMENTS) || \
	  { echo "uv could not install the requirements (above): pip installs them instead"; \
	    $(BIN)/python -m pip install --quiet $(REQUIREMENTS); }
	touch $@

clean:
	rm -rf outputs/*.ipynb outputs/figures data/phantom data/cache
