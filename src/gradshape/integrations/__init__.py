"""Adapters that run gradshape transforms inside training frameworks.

Each adapter lives in its own submodule and imports its framework only when that submodule is
imported, so ``import gradshape`` never needs them:

* :mod:`gradshape.integrations.lightning`: Lightning callbacks (``pip install
  'gradshape[lightning]'``).
"""
