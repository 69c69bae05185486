"""Hostile history files: every one is refused with a one-line ValueError (API) or a one-line
error and exit status 1 (``stableopt report``, with and without ``--csv``/``--plot``), without
a large allocation, a hang, a traceback or a terminal control code in the output; strings that
are allowed through (event reasons, file names) are shown literally."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

import stableopt
from stableopt.cli import main
from stableopt.history import History

EVIL = "[blink red]PWNED[/] \x1b[2J\x1b]0;title\x07 [link=file:///etc/passwd]click[/link] \x9b31m\x7f\u202e"
# what may never reach a terminal from a file: ESC, BEL, the other C0 controls but newline,
# DEL, C1 controls (CSI U+009B...), bidi overrides
CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _history(events=True):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    loss_fn = lambda: ((model(x) - y) ** 2).mean()  # noqa: E731
    opt = stableopt.Adam(model.parameters(), lr=0.01)
    opt.monitor(loss_fn, every=1, secant=True, k=2)
    for _ in range(3):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    if events:
        opt.history.append_event(3, 0, 1.0, 0.5, 1.5, "cut")
    opt.spectral_density(loss_fn, probes=2, iters=3)  # the density tables: 2 probes × 3 nodes
    return opt


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    _history().history.save(path)
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _raw(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _cases(tmp, good):
    """(name, path, expected fragment of the error) for every hostile file."""
    tensors, meta = good
    cases = []

    def st(name, problem, tensors=tensors, **changes):
        path = tmp / f"{name}.safetensors"
        save_file(dict(tensors), str(path), metadata={k: v for k, v in {**meta, **changes}.items() if v is not None})
        cases.append((name, path, problem))

    def raw(name, problem, content):
        path = tmp / f"{name}.safetensors"
        path.write_bytes(content)
        cases.append((name, path, problem))

    # markup and escape injection in every string field
    st("evil-optimizer", "'optimizer' is not a valid optimizer", optimizer=EVIL)
    st("evil-torch", "'torch_version'", torch_version=EVIL)
    st("evil-stableopt", "'stableopt_version'", stableopt_version=EVIL)
    st("evil-version-form", "not a valid torch version", torch_version="2.0; rm -rf /")
    st("evil-format", "not a stableopt history", format=EVIL)
    st("evil-schema", "without a valid schema", schema=EVIL)
    st("evil-elapsed", "'elapsed'", elapsed=EVIL)
    st("evil-key", "unknown metadata field", **{EVIL: "x"})
    st("evil-hyper-json", "'hyperparameters' is not valid JSON", hyperparameters=EVIL)
    st("evil-reasons-type", "'event_reasons' is not a list of strings", event_reasons=json.dumps([1, EVIL]))
    st("reasons-count", "holds 2 reasons for 1 event rows", event_reasons=json.dumps(["a", "b"]))
    st("reason-long", "over 200 characters", event_reasons=json.dumps(["x" * 201]))
    st("evil-column", "unknown column", tensors={**tensors, EVIL: np.zeros(len(tensors["step"]))})
    st("superscript-column", "unknown column", tensors={**tensors, "lr_²": tensors["lr_0"]})
    st("leading-zero-column", "unknown column", tensors={**tensors, "eig_01": tensors["eig_0"]})
    # deep JSON: in the header itself, in metadata
    raw("deep-header", "nests 100000 levels", _raw(b"[" * 100_000 + b"]" * 100_000))
    st("deep-reasons", "nests 100000 levels", event_reasons="[" * 100_000 + "]" * 100_000)
    st("deep-hyper", "nests 100000 levels", hyperparameters="[" * 100_000 + "]" * 100_000)
    # the header length and the declared sizes against the real file
    raw("length-2^62", "says 4611686018427387904 bytes", struct.pack("<Q", 2**62) + b"{}" * 100)
    declared = {"step": {"dtype": "I64", "shape": [2**28], "data_offsets": [0, 2**31]}}
    raw("declared-2GiB", "declares 2147483648 bytes", _raw(json.dumps(declared).encode(), b"\0" * 4096))
    raw(
        "nan-offsets",
        "holds NaN, which is not JSON",
        _raw(b'{"step":{"dtype":"I64","shape":[1],"data_offsets":[0,NaN]}}', b"\0" * 8),
    )
    raw(
        "float-offsets",
        "invalid data_offsets",
        _raw(b'{"step":{"dtype":"I64","shape":[1],"data_offsets":[0,8.0]}}', b"\0" * 8),
    )
    raw(
        "overlap",
        "overlap or leave gaps",
        _raw(
            json.dumps(
                {
                    "step": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
                    "loss": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]},
                }
            ).encode(),
            b"\0" * 16,
        ),
    )
    raw("not-utf8", "not UTF-8", _raw(b'{"\xff":1}'))
    # columns of mismatched length, wrong dtype, bad values
    n = len(tensors["step"])
    st("ragged", f"has {n + 1} rows", tensors={**tensors, "loss": np.zeros(n + 1)})
    st("dtype", "dtype float32", tensors={**tensors, "hvps": tensors["hvps"].astype(np.float32)})
    st("dtype-bool", "dtype int64", tensors={**tensors, "converged": tensors["converged"].astype(np.int64)})
    st("nan-seconds", "'seconds' holds NaN", tensors={**tensors, "seconds": np.full(n, np.nan)})
    st("inf-elapsed", "'elapsed' holds NaN or infinite", tensors={**tensors, "elapsed": np.full(n, np.inf)})
    st("negative-step", "'step' holds values outside", tensors={**tensors, "step": -tensors["step"]})
    st("steps-back", "'step' is not in order", tensors={**tensors, "step": tensors["step"][::-1].copy()})
    st(
        "secant-back",
        "'secant_step' is not in order",
        tensors={**tensors, "secant_step": tensors["secant_step"][::-1].copy()},
    )
    st("hvps-overflow", "'hvps' holds values outside", tensors={**tensors, "hvps": np.full(n, 2**62, np.int64)})
    st(
        "eig-gap",
        "eig_2 without eig_1",
        tensors={**{k: v for k, v in tensors.items() if k != "eig_1"}, "eig_2": tensors["eig_0"]},
    )
    st(
        "factor-negative",
        "'event_new_factor' holds values outside",
        tensors={**tensors, "event_new_factor": -tensors["event_new_factor"]},
    )
    # the density tables: each column's rules, and the nodes against their densities
    nodes = {k: v for k, v in tensors.items() if k.startswith("node")}
    st("node-orphan", "names density 1 of 1 recorded", tensors={**tensors, "node_density": nodes["node_density"] + 1})
    st(
        "node-without-density",
        "names density 0 of 0 recorded",
        tensors={k: v for k, v in tensors.items() if not k.startswith("density_")},
    )
    st("node-probe", "names probe 2 of density 0", tensors={**tensors, "node_probe": nodes["node_probe"] + 1})
    st("node-weights", "sum to", tensors={**tensors, "node_weight": nodes["node_weight"] * 0.5})
    st("node-inf", "'node' holds NaN or infinite", tensors={**tensors, "node": np.full(6, np.inf)})
    st("node-weight-nan", "'node_weight' holds NaN", tensors={**tensors, "node_weight": np.full(6, np.nan)})
    st(
        "node-probe-order",
        "not in order within a density",
        tensors={**tensors, "node_probe": nodes["node_probe"][::-1].copy()},
    )
    st(
        "node-missing-probe",
        "has nodes for 1 of its 2 probes",
        tensors={**tensors, **{k: v[:3].copy() for k, v in nodes.items()}},
    )
    st(
        "node-over-iters",
        "more than its iters",
        tensors={**tensors, "density_iters": np.full(1, 2, np.int64)},
    )
    st(
        "density-partial",
        "without the column(s) ['density_iters']",
        tensors={k: v for k, v in tensors.items() if k != "density_iters"},
    )
    st(
        "density-probes-zero",
        "'density_probes' holds values outside",
        tensors={**tensors, "density_probes": np.zeros(1, np.int64)},
    )
    st(
        "density-dtype-code",
        "'density_dtype' holds values outside",
        tensors={**tensors, "density_dtype": np.full(1, 7, np.int64)},
    )
    return cases


def _one_line_without_controls(message: str) -> None:
    assert "\n" not in message.rstrip("\n") and not CONTROL.search(message), repr(message)


def test_every_hostile_file_is_a_one_line_value_error(tmp_path, good):
    for name, path, problem in _cases(tmp_path, good):
        with pytest.raises(ValueError) as info:
            History.load(path)
        message = str(info.value)
        assert message.startswith(str(path)) and problem in message, (name, message)
        _one_line_without_controls(message)
        assert len(message) < 1000, name


@pytest.mark.parametrize(
    "extra",
    [[], ["--csv", "out.csv"], ["--plot", "out.png"], ["--csv", "out.csv", "--plot", "out.png"]],
    ids=["report", "csv", "plot", "both"],
)
def test_every_hostile_file_exits_1_with_one_line(tmp_path, good, capsys, extra):
    extra = [str(tmp_path / e) if e.startswith("out") else e for e in extra]
    for name, path, problem in _cases(tmp_path, good):
        assert main(["report", str(path), *extra]) == 1, name
        out, err = capsys.readouterr()
        assert out == "", name
        assert err.count("\n") == 1 and err.startswith("stableopt report: error: ") and problem in err, (name, err)
        _one_line_without_controls(err)
    assert not any((tmp_path / o).exists() for o in ("out.csv", "out.png"))


def test_rejecting_a_declared_2gib_column_allocates_nothing_large(tmp_path, good):
    """A sparse file with a header declaring one 2 GiB column: its size matches the header, but
    the column's length does not match the others, which the header alone shows."""
    tensors, meta = good
    entries, offset = {}, 0
    for name, values in tensors.items():
        rows = 2**28 if name == "loss" else len(values)
        size = rows * values.dtype.itemsize
        code = {"int64": "I64", "float64": "F64", "bool": "BOOL"}[values.dtype.name]
        entries[name] = {"dtype": code, "shape": [rows], "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": meta, **entries}).encode()
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + offset)  # a hole: 2 GiB apparent, a few KB on disk
    assert os.path.getsize(path) > 2**31
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="'loss' has 268435456 rows"):
            History.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak  # the header only, never the 2 GiB


def test_special_paths_are_refused_without_hanging(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.safetensors"
    os.symlink(loop, loop)
    dangling = tmp_path / "dangling.safetensors"
    os.symlink(tmp_path / "nowhere", dangling)
    cases = [
        (fifo, "is a FIFO"),
        (loop, "a loop of symbolic links"),
        (tmp_path, "is a directory"),
        (dangling, "no such file"),
    ]
    if os.path.exists("/dev/zero"):
        cases.append(("/dev/zero", "is a device"))
    for path, problem in cases:
        result = {}
        worker = threading.Thread(
            target=lambda result=result, path=path: result.update(error=_error_of(path)), daemon=True
        )
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), f"History.load({path}) hangs"
        assert result["error"].startswith(str(path)) and problem in result["error"], result


def _error_of(path):
    try:
        History.load(path)
    except ValueError as exc:
        return str(exc)
    return "loaded"


def test_an_unreadable_file_is_a_value_error(tmp_path):
    path = tmp_path / "secret.safetensors"
    _history().history.save(path)
    path.chmod(0)
    if os.geteuid() != 0:
        assert _error_of(path) == f"{path}: permission denied (the file is not readable)"
        return
    # root reads anything: try as nobody, in a forked child that drops its privileges
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, _error_of(path).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        message = f.read()
    os.waitpid(pid, 0)
    assert message == f"{path}: permission denied (the file is not readable)"


def test_allowed_strings_are_shown_literally(tmp_path, good, capsys, monkeypatch):
    """Event reasons are free text and file names anything: both load, and are printed with
    markup as text and control characters escaped."""
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside the panel
    opt = _history(events=False)
    opt.history.append_event(3, 0, 1.0, 0.5, 1.5, EVIL)
    path = tmp_path / "[red]run\x1b[2J.safetensors"
    opt.history.save(path)
    assert History.load(path).events()[0].reason == EVIL  # kept exactly
    csv_path = tmp_path / "out\x07.csv"
    assert main(["report", str(path), "--csv", str(csv_path)]) == 0
    out = capsys.readouterr().out
    assert not CONTROL.search(out)
    assert "[blink red]PWNED[/] \\x1b[2J\\x1b]0;title\\x07 [link=file:///etc/passwd]click[/link]" in out.replace(
        "\n", ""
    )
    assert "[red]run\\x1b[2J.safetensors" in out and "out\\x07.csv" in out
    # the same reason through the live optimizer's report and a state dict
    from rich.console import Console

    console = Console(record=True, width=200, force_terminal=True, color_system="truecolor")
    opt.report(console=console)
    styled = console.export_text(styles=True, clear=False)
    assert "\x1b]" not in styled and "\x07" not in styled and "\x1b[2J" not in styled
    assert "[link=file:///etc/passwd]" in console.export_text()  # shown, not made a link


def test_terminal_output_has_only_colour_codes(tmp_path):
    """With colours forced on (as on a terminal), the only escape sequences are rich's own SGR
    colour codes: nothing from the file."""
    opt = _history(events=False)
    opt.history.append_event(3, 0, 1.0, 0.5, 1.5, EVIL)
    path = tmp_path / "run.safetensors"
    opt.history.save(path)
    env = dict(os.environ, FORCE_COLOR="1", COLUMNS="120", TERM="xterm-256color")
    run = subprocess.run(
        [sys.executable, "-m", "stableopt.cli", "report", str(path)], capture_output=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout.decode()
    assert "\x1b[" in out  # colours are on
    without_sgr = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert not CONTROL.search(without_sgr.replace("\n", "")), repr(CONTROL.search(without_sgr.replace("\n", "")))


def test_extreme_but_valid_values_render(tmp_path, good, capsys):
    tensors, meta = good
    n = len(tensors["ratio"])
    extreme = {
        **tensors,
        "ratio": np.array([1e308, -1e308, np.inf, -np.inf, np.nan][:n] + [1.0] * max(0, n - 5)),
        "raw": np.array([-1e308, 1e308, 5e-324][:n] + [1.0] * max(0, n - 3)),
        # nodes whose range overflows float64 (not drawable: left out of the plot), a huge τ
        "node": np.array([-1e308, 0.0, 1e308, -5e-324, 1.0, 1.7e308]),
        "density_threshold": np.array([1e308]),
        "density_seconds": np.array([1e308]),
    }
    path = tmp_path / "extreme.safetensors"
    save_file(extreme, str(path), metadata=meta)
    history = History.load(path)
    assert main(["report", str(path), "--plot", str(tmp_path / "x.png")]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) < 200  # no 308-digit number
    stableopt.render_report(history)


def test_hvp_totals_never_overflow(tmp_path, good, capsys):
    tensors, meta = good
    n = len(tensors["hvps"])
    path = tmp_path / "many.safetensors"
    save_file({**tensors, "hvps": np.full(n, 2**31 - 1, np.int64)}, str(path), metadata=meta)
    assert main(["report", str(path)]) == 0
    assert f"{n * (2**31 - 1):,} HVPs" in capsys.readouterr().out


def test_special_paths_give_one_line_cli_errors(tmp_path, capsys):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.safetensors"
    os.symlink(loop, loop)
    for path, problem in ((fifo, "is a FIFO"), (loop, "a loop of symbolic links"), (tmp_path, "is a directory")):
        assert main(["report", str(path)]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and problem in err, err


def test_strings_from_a_state_dict_are_shown_literally():
    """Event reasons travel in checkpoints too: a tampered one loads (it is free text) and
    reaches opt.report() literally."""
    from rich.console import Console

    opt = _history()
    sd = opt.state_dict()
    sd["stableopt"]["components"]["history"]["event_reasons"] = [EVIL[:200]]
    fresh = _history(events=False)
    fresh.load_state_dict(sd)
    console = Console(record=True, width=300, force_terminal=True, color_system="truecolor")
    fresh.report(console=console)
    styled, plain = console.export_text(styles=True, clear=False), console.export_text()
    assert not CONTROL.search(re.sub(r"\x1b\[[0-9;]*m", "", styled).replace("\n", ""))
    assert "[blink red]PWNED[/]" in plain and "\\x1b]0;title\\x07" in plain


def test_a_hostile_optimizer_class_name_is_shown_literally_and_saved_safely(tmp_path, capsys):
    Evil = type("[/]" + EVIL, (stableopt.SGD,), {})  # unbalanced markup raised MarkupError
    w = torch.nn.Parameter(torch.ones(2))
    opt = Evil([w], lr=0.1)
    (w**2).sum().backward()
    opt.step()
    opt.sharpness(lambda: (w**2).sum())
    from rich.console import Console

    console = Console(record=True, width=300)
    opt.report(console=console)  # the name is neutralised to a class-name form, never parsed
    assert "stableopt · ____blink_red_PWNED___" in console.export_text()
    path = tmp_path / "evil.safetensors"
    opt.history.save(path)  # saved under a name the loader accepts
    assert re.fullmatch(r"[A-Za-z0-9_.]+", History.load(path).metadata["optimizer"])
    pytest.importorskip("matplotlib")
    figure = stableopt.plot_history(opt.history, tmp_path / "evil.png")
    assert figure._suptitle.get_text().startswith("____blink_red_PWNED")


def test_a_user_title_is_shown_literally():
    from rich.console import Console
    from rich.text import Text

    history = _history().history
    console = Console(record=True, width=300, force_terminal=True)
    console.print(stableopt.render_report(history, title="[link=x]run[/link] \x1b]0;t\x07"))
    console.print(stableopt.render_report(History(), title="[/]empty"))  # unbalanced: no MarkupError
    console.print(stableopt.render_report(history, title=Text("styled", style="bold red")))  # a Text as given
    plain = console.export_text()
    assert "[link=x]run[/link] \\x1b]0;t\\x07" in plain and "[/]empty" in plain and "styled" in plain
