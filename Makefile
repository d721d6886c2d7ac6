# Every target sets up .venv itself on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are installed first, pinned, so pip takes the local builds instead of
# resolving a newer CUDA build. Override on other machines: make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: test venv clean bench-modules demo demo-detect demo-segment demo-cascade lint docs docs-serve

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

test: venv
	$(MAKE) lint
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff (rules and line length in pyproject.toml) and mypy on the typed public API
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# The documentation site (mkdocs, material theme) into site/; docs-serve previews it
docs: venv
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs-serve: venv
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

bench-modules: venv
	$(PY) benchmarks/modules.py

# The default bench (7 attentions x 3 seeds on the built-in cluttered digits); resumes if
# interrupted. Prints the summary table and the report's path.
DEMO_OUT ?= bench-demo
demo: venv
	$(PY) -m attnzoo.cli bench --out $(DEMO_OUT)

# The default detect bench: YOLOv4-tiny with none, se, cbam, eca, ca (the reference's phi
# variants) x 3 seeds on the built-in digit scenes; resumes if interrupted.
DEMO_DETECT_OUT ?= bench-demo-detect
demo-detect: venv
	$(PY) -m attnzoo.cli bench --task detect --out $(DEMO_DETECT_OUT)

# The default segment bench: danet_small with the heads none (FCN), pam, cam, dual_attention
# x 3 seeds on the built-in digit scenes' masks; resumes if interrupted.
DEMO_SEGMENT_OUT ?= bench-demo-segment
demo-segment: venv
	$(PY) -m attnzoo.cli bench --task segment --out $(DEMO_SEGMENT_OUT)

# Cascade vs Faster R-CNN (small, CPU-sized) x none, se x 2 seeds on the built-in digit scenes:
# every (model, attention) arm compared to faster_rcnn_small/none; resumes if interrupted.
DEMO_CASCADE_OUT ?= bench-demo-cascade
demo-cascade: venv
	$(PY) -m attnzoo.cli bench --task detect --model faster_rcnn_small,cascade_rcnn_small \
		--attention none,se --seeds 2 --out $(DEMO_CASCADE_OUT)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache site
