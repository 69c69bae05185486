"""Doctest collection of the package (``--doctest-modules stableopt``): the framework
integrations import their framework on purpose (a one-line ImportError naming the extra), so
they are left out where that framework is not installed; tests/ covers them where it is."""

from __future__ import annotations

import importlib.util

collect_ignore = [
    path
    for path, module in (
        ("stableopt/integrations/huggingface.py", "transformers"),
        ("stableopt/integrations/lightning.py", "lightning"),
    )
    if importlib.util.find_spec(module) is None
]
