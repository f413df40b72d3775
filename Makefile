VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test setup clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/fxstream analyze torchvision.models:resnet50 --input 1x3x8192x8192 --tile 2048
	$(VENV)/bin/fxstream bench torchvision.models:resnet18 --input 1x3x4096x4096 --variants full,streamed --repeat 1

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) *.egg-info
