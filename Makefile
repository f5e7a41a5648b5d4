# lorax: the README's two set-up commands are `make demo` and `make test`; both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: install test test-slow lint format demo bench docs pictures shapes-model shapes-flux-model clean

install: $(VENV)/.installed

# torch first, pinned: a bare `torch` in a fresh venv would pull a multi-GB CUDA build on this CPU machine.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

lint: install
	$(VENV)/bin/ruff check lorax tests bench
	$(VENV)/bin/ruff format --check lorax tests bench
	$(VENV)/bin/mypy lorax

format: install
	$(VENV)/bin/ruff check --fix lorax tests bench
	$(VENV)/bin/ruff format lorax tests bench

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

bench: install
	$(PY) -m bench

docs: install
	$(PY) -m lorax.cli.docgen docs/cli.md

# The pictures in docs/img/ (sweep, X/Y plot, inpainting, prepare, loss plot, samples sheet), made from the shipped shapes model.
pictures: install
	nice -n 10 $(PY) scripts/docs_pictures.py --out docs/img

# Retrain the built-in shapes model (docs/model-card.md) into SHAPES_OUT; copy it over lorax/zoo/shapes/model to ship it.
SHAPES_OUT ?= shapes-model-out
shapes-model: install
	nice -n 10 $(PY) -m lorax.zoo.shapes.train_base --out $(SHAPES_OUT) --seed 0

# Retrain the built-in shapes-flux model (docs/model-card-flux.md; about an hour on one CPU thread) into
# SHAPES_FLUX_OUT; copy it (without checkpoints/) over lorax/zoo/shapes_flux/model to ship it.
SHAPES_FLUX_OUT ?= shapes-flux-model-out
shapes-flux-model: install
	OMP_NUM_THREADS=1 nice -n 10 $(PY) -m lorax.zoo.shapes_flux.train_base --out $(SHAPES_FLUX_OUT) --seed 0

clean:
	rm -rf $(VENV) demo-out docs-pictures-work bench/out .pytest_cache .ruff_cache .mypy_cache
