"""stableopt.integrations.lightning: a real Lightning Trainer training a tiny LightningModule whose
``configure_optimizers`` returns a stableopt optimizer, under automatic optimization (closures,
gradient accumulation) and manual optimization."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

import stableopt

L = pytest.importorskip(
    "lightning.pytorch", reason='pip install "stableopt[lightning]" to test the Lightning integration'
)

from stableopt.integrations.lightning import SharpnessCallback  # noqa: E402


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, torch.sin(x @ torch.randn(6, 2, generator=g))


class Regression(L.LightningModule):
    def __init__(self, optimizer="stableopt", manual=False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
        self.which = optimizer
        self.automatic_optimization = not manual

    def loss(self, batch):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train_loss", loss)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        cls = stableopt.Adam if self.which == "stableopt" else torch.optim.Adam
        return cls(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=8, shuffle=False)


def _fit(tmp_path, module, callbacks=(), steps=6, accumulate=1):
    logger = L.loggers.CSVLogger(str(tmp_path), name="run", version=0)
    trainer = L.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module)
    return trainer, tmp_path / "run" / "version_0" / "metrics.csv"


def _probe():
    return _data(n=16, seed=1)


def _rows(path):
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("stableopt/ratio")]


def test_automatic_optimization_with_accumulation_measures_every_optimizer_step(tmp_path):
    module = Regression()
    callback = SharpnessCallback(_probe(), lambda m, b: m.loss(b), every=2, raw=True)
    trainer, metrics_csv = _fit(tmp_path, module, [callback], steps=6, accumulate=2)
    opt = callback.optimizer
    assert isinstance(opt, stableopt.Adam) and trainer.global_step == 6
    assert opt.history.column("step").tolist() == [2, 4, 6]  # optimizer steps, not batches
    rows = _rows(metrics_csv)
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert [float(r["stableopt/ratio"]) for r in rows] == pytest.approx(opt.history.column("ratio").tolist(), rel=1e-6)
    assert [float(r["stableopt/raw"]) for r in rows] == pytest.approx(opt.history.column("raw").tolist(), rel=1e-6)
    assert callback.monitor is None


def test_manual_optimization_is_measured_too(tmp_path):
    module = Regression(manual=True)
    callback = SharpnessCallback(_probe(), lambda m, b: m.loss(b), every=3)
    _fit(tmp_path, module, [callback], steps=6)
    assert callback.optimizer.history.column("step").tolist() == [3, 6]


def test_measuring_does_not_change_training(tmp_path):
    finals = []
    for measure in (False, True):
        module = Regression()
        callbacks = [SharpnessCallback(_probe(), lambda m, b: m.loss(b), every=1)] if measure else []
        _fit(tmp_path / str(measure), module, callbacks, steps=5, accumulate=2)
        finals.append([p.detach().clone() for p in module.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_a_plain_torch_optimizer_is_refused_with_how_to_switch(tmp_path):
    with pytest.raises(
        TypeError, match=r"training uses torch\.optim\.adam\.Adam.*return stableopt\.AdamW\(self\.parameters\(\)"
    ):
        _fit(tmp_path, Regression(optimizer="torch"), [SharpnessCallback(_probe(), lambda m, b: m.loss(b))])


@pytest.mark.parametrize(("kwargs", "error"), [({"every": 0}, ValueError), ({"loss_fn": None}, TypeError)])
def test_bad_arguments(kwargs, error):
    args = {"loss_fn": lambda m, b: m.loss(b), **kwargs}
    with pytest.raises(error):
        SharpnessCallback(_probe(), args.pop("loss_fn"), **args)
