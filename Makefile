# `make test` is the one test command: from a bare Python it builds .venv, installs the project with its
# dev extra, and runs the whole suite (CPU only).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test lint clean demo

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check hgrn_vision tests scripts benchmark.py train.py validate.py

# `make demo`: get Fashion-MNIST (Debian package or torchvision download), train an HGRN-DeiT on it and validate on
# the 10k test images, ending with the JSON result. The GPU recipe runs when torch sees a GPU, else the CPU one.
DEMO_DATA ?= data
DEMO_OUT ?= output/demo
DEMO_RUN ?= $(shell date +%Y%m%d-%H%M%S)

demo: $(BIN)/.installed
	$(BIN)/python -m hgrn_vision.train.prepare_data fashion_mnist $(DEMO_DATA)
	@if $(BIN)/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then \
		cfg=configs/fashion_mnist_gpu.yaml; else cfg=configs/fashion_mnist_cpu.yaml; fi; \
	echo "demo recipe: $$cfg"; \
	$(BIN)/python train.py -c $$cfg $(DEMO_DATA) --output $(DEMO_OUT) --experiment $(DEMO_RUN) && \
	$(BIN)/python validate.py $(DEMO_DATA) --checkpoint $(DEMO_OUT)/$(DEMO_RUN)/last.pth.tar \
		--split test --results-file $(DEMO_OUT)/$(DEMO_RUN)/results.json

clean:
	rm -rf $(VENV) .timm_tests .pytest_cache
