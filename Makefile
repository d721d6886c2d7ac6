# Every target sets up .venv itself on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are installed first, pinned, so pip takes the local builds instead of
# resolving a newer CUDA build. Override on other machines: make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: test venv clean bench-modules demo

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	touch $@

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

bench-modules: venv
	$(PY) benchmarks/modules.py

# The default bench (7 attentions x 3 seeds on the built-in cluttered digits); resumes if
# interrupted. Prints the summary table and the report's path.
DEMO_OUT ?= bench-demo
demo: venv
	$(PY) -m attnzoo.cli bench --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
