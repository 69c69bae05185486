"""Callbacks for training frameworks; each submodule imports its framework, this package none.

* :mod:`stableopt.integrations.huggingface`: ``SharpnessCallback`` for ``transformers.Trainer``
  (``pip install "stableopt[hf]"``);
* :mod:`stableopt.integrations.lightning`: ``SharpnessCallback`` for Lightning
  (``pip install "stableopt[lightning]"``).
"""
