"""Adapters to other frameworks, each an optional extra that imports its framework lazily.

* :mod:`attnzoo.integrations.ultralytics` (``pip install 'attnzoo[ultralytics]'``): attnzoo
  attention modules in Ultralytics YOLO models, as a model-YAML row (``AttnZoo``) or attached to
  an existing model with its pretrained weights.

Importing this package imports no framework; each adapter imports its framework inside the
functions that need it.
"""
