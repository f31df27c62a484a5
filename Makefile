# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs, trains the tiny model on the generated shapes set, prints COCO AP
#   make test   creates .venv, installs the test tools too (pytest, torchvision as a reference), runs the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test grade experiment clean

$(VENV)/.installed: requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements-test.txt
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python train.py --device cpu --output-dir runs/demo --resume auto --ckpt-period 100

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

# Course assignments (assignments/README.md): points per part for the functions of this folder.
grade: $(VENV)/.installed-test
	$(BIN)/python assignment.py grade

# A CPU-sized version of the paper's comparison (about 6 minutes on 2 cores): a "pre-trained" backbone (trained
# briefly on the shapes set and saved in torchvision format), then scratch vs. fine-tuning from it, and the AP curves.
experiment: $(VENV)/.installed
	mkdir -p runs/mini
	$(BIN)/python train.py --device cpu --output-dir runs/mini/pretrain --resume auto --max-iters 150 --no-eval \
		--save-backbone runs/mini/backbone.pth
	$(BIN)/python train.py --device cpu --output-dir runs/mini/scratch --resume auto --max-iters 250 \
		--eval-period 50 --seed 1
	$(BIN)/python train.py --device cpu --output-dir runs/mini/pretrained --resume auto --max-iters 250 \
		--eval-period 50 --seed 1 --init imagenet --pretrained runs/mini/backbone.pth
	$(BIN)/python plot.py curves runs/mini/scratch runs/mini/pretrained --labels scratch pre-trained \
		--out runs/mini/ap.png

clean:
	rm -rf runs data_cache .pytest_cache
