# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs, trains the tiny model on the generated shapes set, prints COCO AP
#   make test   creates .venv, installs the test tools too (pytest, torchvision as a reference), runs the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python train.py --device cpu --output-dir runs/demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs data_cache .pytest_cache
