# Every target sets up .venv itself on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are installed first, pinned, so pip takes the local builds instead of
# resolving a newer CUDA build. Override on other machines: make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: test venv clean bench-modules

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

bench-modules: venv
	$(PY) benchmarks/modules.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
