"""Every example script runs in --quick mode, holds its claim (exit 0) and writes its outputs.

Each script is run as a subprocess, the way a reader runs it, with ``--out`` pointing at a
temporary folder; the scripts assert on the claim they demonstrate and exit 1 when it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: script -> the files it must leave in --out
OUTPUTS = {
    "quickstart.py": ["quickstart.safetensors", "quickstart.png"],
    "adaptive_edge.py": ["adaptive_edge.safetensors", "adaptive_edge.png"],
    "thresholds.py": ["thresholds_rmsprop.safetensors", "thresholds_adam_b0.9.safetensors", "thresholds.png"],
    "transformer.py": ["transformer.safetensors", "transformer.png"],
    "gd_vs_adam.py": ["gd_vs_adam_gd.safetensors", "gd_vs_adam_adam.safetensors", "gd_vs_adam.png"],
    "minibatch.py": ["minibatch_25.safetensors", "minibatch_1000.safetensors", "minibatch.png"],
    "frozen_preconditioner.py": [
        "frozen_preconditioner_adam.safetensors",
        "frozen_preconditioner_frozen.safetensors",
        "frozen_preconditioner.png",
    ],
    "guard.py": ["guard_lr0.1.safetensors"],
    "spike_predictor.py": ["spike_predictor.safetensors", "spike_predictor.png"],
    "ddp.py": ["ddp.safetensors"],  # spawns 2 gloo processes itself without torchrun
}


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    # one BLAS thread: the models are tiny and oversubscribed threads only slow a shared CI box
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(OUTPUTS))
def test_example_quick_run_holds_its_claim_and_writes_outputs(script, tmp_path):
    done = run(script, "--quick", "--out", str(tmp_path))
    assert done.returncode == 0, (
        f"{script} --quick exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    missing = [name for name in OUTPUTS[script] if not (tmp_path / name).is_file()]
    assert not missing, f"{script} did not write {missing}; --out holds {sorted(p.name for p in tmp_path.iterdir())}"
    import stableopt

    history = stableopt.History.load(tmp_path / OUTPUTS[script][0])
    assert len(history) > 0 and "ratio" in history.columns()


@pytest.mark.parametrize("script", sorted(OUTPUTS))
def test_example_help(script):
    done = run(script, "--help")
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--out" in done.stdout
