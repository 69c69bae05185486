"""``import stableopt`` imports no framework; an integration whose framework is missing fails with
a one-line ImportError that names the extra to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

FRAMEWORKS = ("transformers", "accelerate", "lightning", "pytorch_lightning", "tensorboard", "wandb")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_stableopt_imports_no_framework():
    done = _python(
        "import sys, stableopt, stableopt.loggers, stableopt.integrations\n"
        f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("stableopt.integrations.huggingface", ("transformers",), "stableopt[hf]"),
        ("stableopt.integrations.lightning", ("lightning",), "stableopt[lightning]"),
    ],
)
def test_missing_framework_gives_a_one_line_import_error_naming_the_extra(module, blocked, extra):
    block = "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)  # makes `import name` fail
    done = _python(
        f"import sys\n{block}"
        f"try:\n    import {module}\nexcept ImportError as exc:\n    print(repr(str(exc)))\n"
        "else:\n    print('imported')"
    )
    assert done.returncode == 0, done.stderr
    message = eval(done.stdout.strip())  # the repr printed above
    assert "\n" not in message and f'pip install "{extra}"' in message


def test_wandb_adapter_without_wandb_names_the_install():
    done = _python(
        "import sys\nsys.modules['wandb'] = None\nfrom stableopt import loggers\n"
        "try:\n    loggers.wandb()\nexcept ImportError as exc:\n    print(exc)"
    )
    assert done.stdout.strip() == "stableopt.loggers.wandb() needs wandb: pip install wandb"
