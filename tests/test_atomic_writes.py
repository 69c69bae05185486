"""Outputs never destroy data: ``History.save``, ``--csv`` and ``--plot`` replace a file whole or
not at all (SIGKILL mid-write included), write through symlinks, keep permissions and umask, and
refuse what is not a regular file."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import stableopt
from stableopt._atomic import atomic_write
from stableopt.cli import main
from stableopt.history import History


def _opt(steps=2, secant=False):
    torch.manual_seed(steps)
    w = torch.nn.Parameter(torch.randn(3))
    loss_fn = lambda: (w**4).sum()  # noqa: E731
    opt = stableopt.SGD([w], lr=0.01)
    opt.monitor(loss_fn, every=1, secant=secant)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return opt


def _temps(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


def test_a_symlink_is_written_through(tmp_path):
    target = tmp_path / "real.safetensors"
    _opt(1).history.save(target)
    (tmp_path / "sub").mkdir()
    link = tmp_path / "sub" / "link.safetensors"
    link.symlink_to("../real.safetensors")  # relative, as users make them
    _opt(3).history.save(link)
    assert link.is_symlink() and os.readlink(link) == "../real.safetensors"
    assert len(History.load(target)) == 3 and _temps(tmp_path) == _temps(tmp_path / "sub") == []


def test_permissions_follow_umask_and_the_replaced_file(tmp_path):
    old = os.umask(0o027)
    try:
        reference = tmp_path / "reference"
        reference.write_bytes(b"")  # what any program makes under this umask
        new = tmp_path / "new.safetensors"
        _opt().history.save(new)
        assert stat.S_IMODE(new.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode) == 0o640
        shared = tmp_path / "shared.safetensors"
        _opt().history.save(shared)
        shared.chmod(0o664)
        _opt(3).history.save(shared)
        assert stat.S_IMODE(shared.stat().st_mode) == 0o664  # kept, not reset to 0600 or umask
    finally:
        os.umask(old)


def _special(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    hard = tmp_path / "hard.png"  # any suffix: the file's kind is what counts (and --plot needs one)
    _opt().history.save(hard)
    os.link(hard, tmp_path / "other-name.png")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    cases = [
        (fifo, "a FIFO"),
        (tmp_path, "a directory"),
        (hard, "2 hard links"),
        (loop, "a loop of symbolic links"),
        (tmp_path / "missing" / "h.png", "does not exist"),
    ]
    if os.path.exists("/dev/null") and os.geteuid() == 0:  # as root a replace would succeed
        cases.append(("/dev/null", "a character device"))
    return cases


def test_special_files_are_refused_before_anything_is_written(tmp_path):
    cases = _special(tmp_path)
    before = {p: os.lstat(p) for p, _ in cases if os.path.lexists(p)}
    for path, problem in cases:
        with pytest.raises(ValueError, match=problem) as info:
            _opt().history.save(path)
        assert str(path) in str(info.value)
    for path, st in before.items():  # all still what they were
        assert stat.S_IFMT(os.lstat(path).st_mode) == stat.S_IFMT(st.st_mode) and os.lstat(path).st_ino == st.st_ino
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert _temps(tmp_path) == []


def test_cli_outputs_refuse_special_files_and_missing_directories(tmp_path, capsys):
    src = tmp_path / "run.safetensors"
    _opt().history.save(src)
    for path, problem in _special(tmp_path):
        for flag in ("--csv", "--plot"):
            assert main(["report", str(src), flag, str(path)]) == 1
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and problem in err, (flag, path, err)


def test_an_exception_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "h.safetensors"
    _opt(1).history.save(path)
    original = path.read_bytes()

    def half_then_fail(f):
        f.write(b"x" * 1000)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == original and _temps(tmp_path) == []


def test_a_temporary_of_a_dead_writer_is_removed_and_a_live_ones_kept(tmp_path):
    path = tmp_path / "h.safetensors"
    _opt(1).history.save(path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = stableopt._atomic._host_tag()
    stale = tmp_path / f".h.safetensors.{tag}-{dead.pid}-0badc0de.tmp"
    alive = tmp_path / f".h.safetensors.{tag}-1-0badc0de.tmp"  # pid 1 always runs
    other = (
        tmp_path / f".h.safetensors.{'0' * 6 if tag != '0' * 6 else '1' * 6}-{dead.pid}-0badc0de.tmp"
    )  # another host's
    for p in (stale, alive, other):
        p.write_bytes(b"partial")
    _opt(2).history.save(path)
    assert not stale.exists() and alive.exists() and other.exists()


_CHILD = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from stableopt.history import History
    from stableopt._columns import Tables
    path, rows, stall = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "stall"
    if stall:  # a disk that takes long to flush: the kill lands before the rename, always
        os.fsync = lambda fd: time.sleep(600)
    h = History()
    big = {"secant_step": np.arange(rows, dtype=np.int64), "secant": np.random.rand(rows), "secant_ratio": np.random.rand(rows)}
    full = {name: np.zeros(0, dtype=np.int64 if name in ("step", "hvps", "monitor") else (bool if name == "converged" else float))
            for name in ("step", "loss", "preconditioned", "raw", "threshold", "ratio", "residual", "hvps", "seconds",
                         "converged", "monitor", "elapsed")}
    full.update({n: np.zeros(0, dtype=np.int64 if n in ("event_step", "event_group") else float)
                 for n in ("event_step", "event_group", "event_old_factor", "event_new_factor", "event_ratio")})
    full.update(big)
    h._t = Tables.of(full, {"measurements": 0, "secant": rows, "events": 0}, [])
    if sys.argv[4] == "csv":
        from stableopt.cli import _write_csv
        h2 = History.load(path + ".src")
        _write_csv(h2, path)
    else:
        h.save(path)
""")


def _kill_mid_write(tmp_path, path, rows, mode, kind):
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(rows), mode, kind], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            temps = _temps(tmp_path)
            if temps and os.path.getsize(tmp_path / temps[0]) > 0:
                break
            time.sleep(0.001)
        seen = bool(_temps(tmp_path))
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    assert seen or child.returncode == 0, child.stderr.read()[-2000:]
    return seen


@pytest.mark.parametrize("mode", ["stall", "race"])
def test_sigkill_mid_save_leaves_the_old_history_whole(tmp_path, mode):
    path = tmp_path / "h.safetensors"
    _opt(2).history.save(path)
    original = path.read_bytes()
    killed = _kill_mid_write(tmp_path, path, 3_000_000 if mode == "race" else 1000, mode, "history")
    data = path.read_bytes()
    if mode == "stall":
        assert killed and data == original  # killed before the rename: the old file, whole
    else:  # a 72 MB write killed as soon as it started: the old file, or (if done first) the new
        assert data == original or len(History.load(path).secant()["secant"]) == 3_000_000
    assert len(History.load(path)) in (2, 0)
    if killed:
        assert _temps(tmp_path)  # the killed writer's temporary is left...
        _opt(2).history.save(path)
        assert _temps(tmp_path) == []  # ...and the next save removes it


def test_sigkill_mid_csv_leaves_the_old_csv_whole(tmp_path):
    src = tmp_path / "out.csv.src"
    _opt(3).history.save(src)
    out = tmp_path / "out.csv"
    out.write_text("old,content\n1,2\n")
    assert _kill_mid_write(tmp_path, out, 10, "stall", "csv")
    assert out.read_text() == "old,content\n1,2\n"


def test_csv_and_plot_never_overwrite_the_input(tmp_path, capsys):
    src = tmp_path / "run.safetensors"
    _opt(2).history.save(src)
    original = src.read_bytes()
    link = tmp_path / "link.csv"
    link.symlink_to(src)
    for args in (
        ["--csv", str(src)],
        ["--plot", str(src)],
        ["--csv", str(link)],
        ["--csv", str(tmp_path / "a.png"), "--plot", str(tmp_path / "a.png")],
    ):
        assert main(["report", str(src), *args]) == 1
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured
        assert "refusing to overwrite the history" in captured.err or "same file" in captured.err
    assert src.read_bytes() == original and not (tmp_path / "a.png").exists()


def test_plot_needs_a_known_image_suffix(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="cannot write .xyz images"):
        stableopt.plot_history(_opt(2).history, tmp_path / "fig.xyz")
    assert os.listdir(tmp_path) == []
