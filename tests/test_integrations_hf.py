"""stableopt.integrations.huggingface: a real ``transformers.Trainer`` training a tiny GPT-2 (built
from a config, no download) with ``stableopt.AdamW``, gradient accumulation and the callback."""

from __future__ import annotations

import pytest
import torch

import stableopt

transformers = pytest.importorskip(
    "transformers", reason='pip install "stableopt[hf]" to test the transformers integration'
)
pytest.importorskip("accelerate", reason='pip install "stableopt[hf]" (transformers.Trainer needs accelerate)')

from stableopt.integrations.huggingface import SharpnessCallback  # noqa: E402

VOCAB, SEQ = 48, 16


class Tokens(torch.utils.data.Dataset):
    """Seeded token sequences with a learnable pattern (each token is the previous one + 1 mod V)."""

    def __init__(self, n=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.ids = (start + torch.arange(SEQ)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=SEQ)
    return transformers.GPT2LMHeadModel(config)


def _trainer(
    tmp_path, model, optimizer=None, callbacks=None, steps=6, scheduler=None, logging_steps=1000, report_to=()
):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        weight_decay=0.01,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to=list(report_to),
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    optimizers = (optimizer, scheduler) if optimizer is not None else (None, None)
    return transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(), optimizers=optimizers, callbacks=callbacks
    )


def _adamw(model):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return stableopt.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3
    )


def _probe():
    batch = Tokens(n=4, seed=1)
    return {"input_ids": batch.ids, "labels": batch.ids}


def test_trainer_with_stableopt_adamw_logs_the_measurements_through_trainer_log(tmp_path):
    model = _model()
    opt = _adamw(model)
    trainer = _trainer(tmp_path, model, opt)
    callback = SharpnessCallback(_probe(), every=2, raw=True, max_iters=20).attach(trainer)
    trainer.train()
    logged = [row for row in trainer.state.log_history if "stableopt/ratio" in row]
    assert [row["step"] for row in logged] == [2, 4, 6]  # optimizer steps, accumulation counted once
    history = opt.history.to_dict()
    assert history["step"].tolist() == [2, 4, 6]
    assert [row["stableopt/ratio"] for row in logged] == history["ratio"].tolist()
    assert [row["stableopt/raw"] for row in logged] == history["raw"].tolist()
    assert all(row["stableopt/threshold"] > 0 and row["stableopt/hvps"] > 0 for row in logged)
    assert callback.optimizer is opt and callback.monitor is None  # removed at the end of training


def test_with_the_users_scheduler_each_measurement_uses_the_lr_of_its_step(tmp_path):
    model = _model()
    opt = _adamw(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    trainer = _trainer(tmp_path, model, opt, scheduler=scheduler)
    SharpnessCallback(_probe(), every=2, max_iters=10).attach(trainer)
    trainer.train()
    assert trainer.lr_scheduler is scheduler
    history = opt.history.to_dict()
    # measured in the post hook of step t, before scheduler.step(): step t used lr·1/(1 + t − 1)
    assert history["lr_0"].tolist() == pytest.approx([1e-3 / t for t in (2, 4, 6)], rel=1e-12)
    assert history["threshold_0"].tolist() == pytest.approx(
        [stableopt.adam_threshold(1e-3 / t, 0.9, weight_decay=0.01, decoupled=True) for t in (2, 4, 6)], rel=1e-12
    )


def test_measuring_inside_the_trainer_does_not_change_training(tmp_path):
    finals = []
    for measure in (False, True):
        model = _model()
        opt = _adamw(model)
        trainer = _trainer(tmp_path / str(measure), model, opt, steps=4)
        if measure:
            SharpnessCallback(_probe(), every=1, max_iters=10).attach(trainer)
        trainer.train()
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


TIMINGS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


def _tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = folder.rglob("events.out.tfevents.*")  # the Trainer's TensorBoardCallback writes one file
    accumulator = EventAccumulator(str(events)).Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.mark.parametrize(("logging_steps", "every"), [(2, 2), (3, 2), (2, 3)])
def test_the_trainers_own_logs_are_all_kept_and_the_measurements_logged_beside_them(tmp_path, logging_steps, every):
    pytest.importorskip("tensorboard", reason="pip install tensorboard: the Trainer's TensorBoardCallback")
    runs = {}
    for measure in (False, True):
        model = _model()
        opt = _adamw(model)
        folder = tmp_path / str(measure)
        trainer = _trainer(folder, model, opt, logging_steps=logging_steps, report_to=["tensorboard"])
        if measure:
            SharpnessCallback(_probe(), every=every, max_iters=10).attach(trainer)
        trainer.train()
        runs[measure] = trainer.state.log_history, _tensorboard_scalars(folder), opt.history.to_dict()
    (plain, plain_board, _), (measured, board, history) = runs[False], runs[True]

    def own(rows):  # the Trainer's rows, less the wall-clock timings of its final summary
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows if "stableopt/ratio" not in row]

    # every row of the run without the callback, with bitwise the same loss, grad_norm, lr, epoch
    assert [row["step"] for row in own(plain) if "loss" in row] == list(range(logging_steps, 7, logging_steps))
    assert own(measured) == own(plain)
    ours = [row for row in measured if "stableopt/ratio" in row]
    assert [row["step"] for row in ours] == history["step"].tolist() == list(range(every, 7, every))
    assert [row["stableopt/ratio"] for row in ours] == history["ratio"].tolist()
    # and what the Trainer reported to TensorBoard: its own scalars as before, stableopt's at their step
    # (train/epoch also has a point per measurement row: Trainer.log adds the epoch to every row)
    for tag, points in plain_board.items():
        if tag.removeprefix("train/") not in TIMINGS and tag != "train/epoch":
            assert board[tag] == points, tag
    assert set(plain_board["train/epoch"]) <= set(board["train/epoch"])
    assert [step for step, _ in plain_board["train/loss"]] == list(range(logging_steps, 7, logging_steps))
    assert board["train/stableopt/ratio"] == [
        (step, pytest.approx(ratio, rel=1e-6)) for step, ratio in zip(history["step"].tolist(), history["ratio"])
    ]


def test_a_plain_torch_optimizer_is_refused_with_how_to_switch(tmp_path):
    model = _model()
    trainer = _trainer(tmp_path, model)  # the Trainer's own torch.optim.AdamW
    SharpnessCallback(_probe(), every=2).attach(trainer)
    with pytest.raises(TypeError, match=r"training uses torch\.optim\..*AdamW.*optimizers=\(opt, None\)"):
        trainer.train()


def test_callback_without_attach_says_how_to_add_it(tmp_path):
    model = _model()
    trainer = _trainer(tmp_path, model, _adamw(model), callbacks=[SharpnessCallback(_probe())])
    with pytest.raises(RuntimeError, match=r"\.attach\(trainer\)"):
        trainer.train()


@pytest.mark.parametrize(("kwargs", "error"), [({"every": 0}, ValueError), ({"loss_fn": 3}, TypeError)])
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        SharpnessCallback(_probe(), **kwargs)
