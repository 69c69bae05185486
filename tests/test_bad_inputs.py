"""One table of bad inputs for every public entry point.

Each row: the entry point and argument, the call, the documented exception type, and fragments
the message must contain — the argument's name, what was expected and what came. Rows for
constructor arguments that torch itself validates keep torch's type and message (stableopt's
classes are torch's; the message names the argument and the value).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import stableopt


@dataclass
class Case:
    id: str
    call: Callable[[Any], Any]  # receives the fixture namespace
    exc: type[BaseException]
    fragments: tuple[str, ...]  # regexes, all of which must be in the message


class NS:
    """A model after one Adam step (so that sharpness() is defined), and friends."""

    def __init__(self, tmp_path) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(3, 2)
        self.x, self.y = torch.randn(4, 3), torch.randn(4, 2)
        self.opt = stableopt.Adam(self.model.parameters(), lr=1e-2)
        self.loss_fn = lambda: ((self.model(self.x) - self.y) ** 2).mean()
        self.opt.zero_grad()
        self.loss_fn().backward()
        self.opt.step()
        self.fresh = stableopt.Adam(nn.Linear(2, 1).parameters(), lr=1e-2)
        self.tmp = tmp_path

    def params(self):
        return nn.Linear(2, 1).parameters()

    def file(self, name: str, data: bytes | None) -> str:
        path = os.path.join(self.tmp, name)
        if data is not None:
            with open(path, "wb") as fh:
                fh.write(data)
        return str(path)


def S(ns, **kw):
    return ns.opt.sharpness(kw.pop("loss_fn", ns.loss_fn), **kw)


CASES: list[Case] = [
    # -- constructors (torch validates its own arguments; stableopt adds guard=) -----------------
    Case("Adam(lr<0)", lambda ns: stableopt.Adam(ns.params(), lr=-1.0), ValueError, ("learning rate", "-1.0")),
    Case(
        "Adam(betas)", lambda ns: stableopt.Adam(ns.params(), betas=(1.5, 0.9)), ValueError, ("beta parameter", "1.5")
    ),
    Case("Adam(eps<0)", lambda ns: stableopt.Adam(ns.params(), eps=-1e-8), ValueError, ("epsilon", "-1e-08")),
    Case(
        "AdamW(weight_decay<0)",
        lambda ns: stableopt.AdamW(ns.params(), weight_decay=-0.1),
        ValueError,
        ("weight_decay", "-0.1"),
    ),
    Case(
        "SGD(momentum<0)",
        lambda ns: stableopt.SGD(ns.params(), lr=0.1, momentum=-0.5),
        ValueError,
        ("momentum", "-0.5"),
    ),
    Case(
        "SGD(nesterov, no momentum)",
        lambda ns: stableopt.SGD(ns.params(), lr=0.1, nesterov=True),
        ValueError,
        ("[Nn]esterov", "momentum"),
    ),
    Case("RMSprop(alpha<0)", lambda ns: stableopt.RMSprop(ns.params(), alpha=-0.9), ValueError, ("alpha", "-0.9")),
    Case("Adam(params=[])", lambda ns: stableopt.Adam([], lr=1e-3), ValueError, ("empty parameter list",)),
    Case(
        "Adam(guard='yes')",
        lambda ns: stableopt.Adam(ns.params(), guard="yes"),
        TypeError,
        ("guard", "None, a bool or a stableopt.LRGuard", "got str"),
    ),
    # -- sharpness ------------------------------------------------------------------------------
    Case("sharpness(loss_fn=3)", lambda ns: S(ns, loss_fn=3), TypeError, ("loss_fn", "callable", "got int")),
    Case("sharpness(k=0)", lambda ns: S(ns, k=0), ValueError, ("k", "positive integer", "got 0")),
    Case("sharpness(k=1.5)", lambda ns: S(ns, k=1.5), ValueError, ("k", "positive integer", "got 1.5")),
    Case("sharpness(k=True)", lambda ns: S(ns, k=True), ValueError, ("k", "positive integer", "got True")),
    Case("sharpness(tol=0)", lambda ns: S(ns, tol=0.0), ValueError, ("tol", r"in \(0, 1\)", "got 0.0")),
    Case("sharpness(tol=2)", lambda ns: S(ns, tol=2), ValueError, ("tol", r"in \(0, 1\)", "got 2")),
    Case("sharpness(tol='x')", lambda ns: S(ns, tol="x"), ValueError, ("tol", r"in \(0, 1\)", "got 'x'")),
    Case(
        "sharpness(max_iters=0)", lambda ns: S(ns, max_iters=0), ValueError, ("max_iters", "positive integer", "got 0")
    ),
    Case("sharpness(raw='yes')", lambda ns: S(ns, raw="yes"), TypeError, ("raw", "bool", "got str")),
    Case(
        "sharpness(batches=iterator)",
        lambda ns: S(ns, loss_fn=lambda b: ns.loss_fn(), batches=iter([(ns.x,)])),
        TypeError,
        ("batches", "re-iterable", "iterator of type list_iterator"),
    ),
    Case(
        "sharpness(batches=5)",
        lambda ns: S(ns, loss_fn=lambda b: ns.loss_fn(), batches=5),
        TypeError,
        ("batches", "re-iterable of batches", "got int"),
    ),
    Case(
        "sharpness(batches=[])",
        lambda ns: S(ns, loss_fn=lambda b: ns.loss_fn(), batches=[]),
        ValueError,
        ("batches", "at least one sample", "0 batches with 0 samples"),
    ),
    Case(
        "sharpness(batches=[object])",
        lambda ns: S(ns, loss_fn=lambda b: ns.loss_fn(), batches=[object()]),
        TypeError,
        ("batches", "expected a tensor", "type object"),
    ),
    Case(
        "sharpness(batches=[0-dim])",
        lambda ns: S(ns, loss_fn=lambda b: ns.loss_fn(), batches=[torch.tensor(1.0)]),
        ValueError,
        ("batches", "leading batch dimension", "0-dim"),
    ),
    Case(
        "sharpness: loss_fn returns float",
        lambda ns: S(ns, loss_fn=lambda: 1.0),
        TypeError,
        ("loss_fn", "scalar tensor", "got float"),
    ),
    Case(
        "sharpness: loss_fn returns vector",
        lambda ns: S(ns, loss_fn=lambda: ns.model(ns.x).sum(0)),
        ValueError,
        ("loss_fn", "scalar tensor", r"got shape \(2,\)"),
    ),
    Case(
        "sharpness: loss_fn returns int tensor",
        lambda ns: S(ns, loss_fn=lambda: torch.tensor(3)),
        TypeError,
        ("loss_fn", "floating-point", "torch.int64"),
    ),
    Case(
        "sharpness: loss_fn without grad",
        lambda ns: S(ns, loss_fn=lambda: ns.loss_fn().detach()),
        ValueError,
        ("loss_fn", "depend on the optimizer's parameters", "does not require grad"),
    ),
    Case(
        "sharpness: loss of another model",
        lambda ns: S(ns, loss_fn=lambda: nn.Linear(3, 1)(ns.x).sum()),
        ValueError,
        ("loss_fn", "any of the optimizer's parameters", "the model this optimizer was built for"),
    ),
    Case(
        "sharpness before step()",
        lambda ns: ns.fresh.sharpness(lambda: torch.zeros((), requires_grad=True)),
        RuntimeError,
        ("sharpness", "call step", "first"),
    ),
    Case(
        "preconditioner() before step()",
        lambda ns: ns.fresh.preconditioner(),
        RuntimeError,
        ("preconditioner", "call step", "first"),
    ),
    # -- building blocks -------------------------------------------------------------------------
    Case(
        "make_hvp(loss_fn=None)",
        lambda ns: stableopt.make_hvp(None, list(ns.model.parameters())),
        TypeError,
        ("loss_fn", "callable", "got NoneType"),
    ),
    Case(
        "lanczos(k=0)",
        lambda ns: stableopt.lanczos(lambda v: v, n=3, k=0, generator=torch.Generator()),
        ValueError,
        ("k", "positive integer", "got 0"),
    ),
    Case(
        "lanczos(bound='x')",
        lambda ns: stableopt.lanczos(lambda v: v, n=3, bound="x", generator=torch.Generator()),
        ValueError,
        ("bound", "'residual' or 'gap'", "got 'x'"),
    ),
    Case(
        "distributed.configure(enabled='x')",
        lambda ns: stableopt.distributed.configure(enabled="x"),
        TypeError,
        ("enabled", "bool", "got str"),
    ),
]

if hasattr(stableopt.Adam, "monitor"):
    CASES += [
        Case(
            "monitor(loss_fn=None)", lambda ns: ns.opt.monitor(None), TypeError, ("loss_fn", "callable", "got NoneType")
        ),
        Case(
            "monitor(every=0)",
            lambda ns: ns.opt.monitor(ns.loss_fn, every=0),
            ValueError,
            ("every", "positive integer", "got 0"),
        ),
        Case(
            "monitor(every=2.5)",
            lambda ns: ns.opt.monitor(ns.loss_fn, every=2.5),
            ValueError,
            ("every", "positive integer", "got 2.5"),
        ),
        Case(
            "monitor(k=-1)",
            lambda ns: ns.opt.monitor(ns.loss_fn, k=-1),
            ValueError,
            ("k", "positive integer", "got -1"),
        ),
        Case(
            "monitor(tol=1.5)",
            lambda ns: ns.opt.monitor(ns.loss_fn, tol=1.5),
            ValueError,
            ("tol", r"in \(0, 1\)", "got 1.5"),
        ),
        Case("monitor(raw=1)", lambda ns: ns.opt.monitor(ns.loss_fn, raw=1), TypeError, ("raw", "bool", "got int")),
    ]

if hasattr(stableopt, "LRGuard"):
    G = stableopt.LRGuard
    CASES += [
        Case("LRGuard(mode='x')", lambda ns: G(mode="x"), ValueError, ("mode", "one of", "got 'x'")),
        Case(
            "LRGuard(trigger=-1)",
            lambda ns: G(trigger=-1.0),
            ValueError,
            ("trigger", "positive finite number", "got -1.0"),
        ),
        Case("LRGuard(trigger='a')", lambda ns: G(trigger="a"), TypeError, ("trigger", "number", "got str")),
        Case(
            "LRGuard(trigger=nan)",
            lambda ns: G(trigger=float("nan")),
            ValueError,
            ("trigger", "positive finite number", "got nan"),
        ),
        Case(
            "LRGuard(target>=trigger)",
            lambda ns: G(trigger=1.2, target=1.3),
            ValueError,
            ("target", "below trigger", "1.3"),
        ),
        Case("LRGuard(patience=0)", lambda ns: G(patience=0), ValueError, ("patience", ">= 1", "got 0")),
        Case("LRGuard(patience=1.5)", lambda ns: G(patience=1.5), TypeError, ("patience", "int", "got float")),
        Case("LRGuard(relax_rate=1)", lambda ns: G(relax_rate=1.0), ValueError, ("relax_rate", "> 1", "got 1.0")),
        Case("LRGuard(every=0)", lambda ns: G(every=0), ValueError, ("every", ">= 1", "got 0")),
        Case("LRGuard(loss_fn=3)", lambda ns: G(loss_fn=3), TypeError, ("loss_fn", "callable", "got int")),
        Case("LRGuard(cap, protect)", lambda ns: G(cap=2.0), ValueError, ("cap", "mode='edge'", "cap=2.0")),
        Case(
            "LRGuard bound to torch.optim",
            lambda ns: G().bind(torch.optim.Adam(ns.params())),
            TypeError,
            ("stableopt optimizer", "got Adam"),
        ),
    ]

if hasattr(stableopt, "History"):
    H = stableopt.History
    CASES += [
        Case(
            "History.load(missing)",
            lambda ns: H.load(ns.file("missing.safetensors", None)),
            ValueError,
            ("missing.safetensors", "no such file"),
        ),
        Case("History.load(directory)", lambda ns: H.load(str(ns.tmp)), ValueError, ("is a directory", "history")),
        Case(
            "History.load(empty)",
            lambda ns: H.load(ns.file("empty.safetensors", b"")),
            ValueError,
            ("empty.safetensors", "empty file", "history"),
        ),
        Case(
            "History.load(garbage)",
            lambda ns: H.load(ns.file("g.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")),
            ValueError,
            ("g.safetensors",),
        ),
        Case(
            "History.load(text)",
            lambda ns: H.load(ns.file("t.safetensors", b"hello world, not a tensor file")),
            ValueError,
            ("t.safetensors", "safetensors"),
        ),
        Case(
            "history.column(unknown)", lambda ns: ns.opt.history.column("nope"), KeyError, ("nope", "the columns are")
        ),
        Case(
            "history.to_dict(table)",
            lambda ns: ns.opt.history.to_dict("nope"),
            ValueError,
            ("table", "one of", "got 'nope'"),
        ),
    ]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path):
    ns = NS(tmp_path)
    params_before = [p.detach().clone() for p in ns.model.parameters()]
    with pytest.raises(case.exc) as info:
        case.call(ns)
    message = str(info.value.args[0]) if isinstance(info.value, KeyError) else str(info.value)
    for fragment in case.fragments:
        assert re.search(fragment, message), f"{case.id}: {fragment!r} not in {message!r}"
    # a refused call changes nothing
    assert all(torch.equal(a, p) for a, p in zip(params_before, ns.model.parameters()))


# -- the CLI: argparse errors exit with status 2 and name the option, the expectation, the value --
CLI_CASES = [
    (["demo", "--steps", "0"], ("--steps", "positive integer", "got 0")),
    (["demo", "--every", "-3"], ("--every", "positive integer", "got -3")),
    (["demo", "--steps", "ten"], ("--steps", "positive integer|int", "ten")),
    (["demo", "--lr", "fast"], ("--lr", "float", "fast")),
    (["nonsense"], ("invalid choice", "nonsense")),
]


@pytest.mark.parametrize("argv,fragments", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_bad_cli_arguments(argv, fragments, capsys):
    from stableopt.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert re.search(fragment, err), f"{fragment!r} not in {err!r}"


def test_bad_cli_report_file(tmp_path, capsys):
    from stableopt.cli import build_parser, main

    if "report" not in build_parser().format_help():
        pytest.skip("no report command")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a history")
    assert main(["report", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.safetensors" in err and "error" in err
    assert main(["report", str(tmp_path / "missing.safetensors")]) == 1
    assert "no such file" in capsys.readouterr().err
