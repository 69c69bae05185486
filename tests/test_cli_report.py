"""``stableopt report FILE [--plot OUT.png] [--csv OUT.csv]``: output and exit codes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import stableopt
from stableopt.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    loss_fn = lambda: ((model(x) - y) ** 2).mean()
    opt = stableopt.Adam(model.parameters(), lr=0.01)
    opt.monitor(loss_fn, every=2, raw=True)
    for _ in range(8):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    path = tmp_path_factory.mktemp("cli") / "run.safetensors"
    opt.history.save(path)
    return path, opt.history


def test_report_of_a_good_file_exits_zero(saved, capsys):
    path, history = saved
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: 4 measurements of Adam" in out
    assert "stableopt · Adam" in out and "ratio history" in out and "raw λ_max(H)" in out
    assert f"{history.column('ratio')[-1]:.3f}" in out
    assert "the edge, ratio 1" in out and "step 8" in out  # the terminal chart
    assert "\x1b" not in out  # not a terminal: no control codes


def test_csv_output(saved, tmp_path, capsys):
    path, history = saved
    out_csv = tmp_path / "run.csv"
    assert main(["report", str(path), "--csv", str(out_csv)]) == 0
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(history)
    assert [int(r["step"]) for r in rows] == history.column("step").tolist()
    assert [float(r["ratio"]) for r in rows] == history.column("ratio").tolist()  # repr: exact
    assert f"wrote {out_csv}" in capsys.readouterr().out


def test_plot_output_is_a_readable_png(saved, tmp_path):
    mpimg = pytest.importorskip("matplotlib.image")
    path, _ = saved
    out_png = tmp_path / "run.png"
    assert main(["report", str(path), "--plot", str(out_png)]) == 0
    image = mpimg.imread(out_png)
    assert image.ndim == 3 and min(image.shape[:2]) > 300 and image.std() > 0.05


@pytest.mark.parametrize(
    "content, problem",
    [(None, "no such file"), (b"", "empty file"), (b"\x13" * 200, "not a readable safetensors file")],
)
def test_bad_file_exits_nonzero_with_one_line(tmp_path, capsys, content, problem):
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    assert main(["report", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stableopt report: error: ") and str(path) in lines[0]
    assert problem in lines[0]


def test_unwritable_outputs_fail_cleanly(saved, tmp_path, capsys):
    path, _ = saved
    assert main(["report", str(path), "--csv", str(tmp_path / "no" / "dir.csv")]) == 1
    assert capsys.readouterr().err.startswith("stableopt report: error: cannot write")


def test_console_entry_point_exit_codes(saved, tmp_path):
    path, _ = saved
    code = "import sys; from stableopt.cli import main; sys.exit(main())"
    env = dict(os.environ, COLUMNS="100")
    good = subprocess.run(
        [sys.executable, "-c", code, "report", str(path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert good.returncode == 0 and "stableopt · Adam" in good.stdout
    bad = subprocess.run(
        [sys.executable, "-c", code, "report", str(tmp_path / "x.safetensors")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "no such file" in bad.stderr


def test_plot_without_matplotlib_is_a_one_line_error(saved, tmp_path, capsys, monkeypatch):
    path, _ = saved
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(path), "--plot", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs matplotlib: pip install matplotlib" in err[0]
