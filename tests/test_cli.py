"""The `stableopt` console script: `stableopt demo` runs and shows the ratio reaching the edge."""

from __future__ import annotations

import re
import subprocess
import sys

from stableopt.cli import main


def test_demo_prints_the_climb_to_the_edge(capsys):
    assert main(["demo", "--steps", "400", "--every", "100"]) == 0
    out = capsys.readouterr().out
    ratios = [float(m) for m in re.findall(r"^step .*ratio\s+([0-9.]+)", out, flags=re.M)]
    assert len(ratios) == 4
    assert ratios == sorted(ratios) and ratios[-1] > 0.9  # progressive sharpening to the edge


def test_console_script_entry_point_and_usage_errors():
    ok = subprocess.run([sys.executable, "-m", "stableopt.cli", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "demo" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "stableopt.cli", "demo", "--steps", "0"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "expected a positive integer, got 0" in bad.stderr


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
