"""stableopt inside DistributedDataParallel training.

    torchrun --nproc_per_node 2 examples/ddp.py            # CPU (gloo) or GPUs (nccl)
    torchrun --nproc_per_node 2 examples/ddp.py --quick    # a few seconds
    python examples/ddp.py --quick                         # no torchrun: spawns 2 CPU processes

Each rank trains on its own shard of a synthetic regression problem with a DDP-wrapped MLP and
``stableopt.Adam``. A monitor measures the preconditioned sharpness every ``--every`` steps: each
rank computes Hessian-vector products on its shard, stableopt all-reduces them, and every rank
gets the same report, the measurement of the full (union) data set. Nothing in the training loop
is distributed-specific: the loss function calls the DDP module as usual.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import stableopt


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run with torchrun --nproc_per_node N, or plainly (spawns --nproc CPU processes).",
    )
    parser.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    parser.add_argument("--every", type=int, default=50, help="measure every N steps (default 50)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    parser.add_argument("--samples", type=int, default=1024, help="samples in the whole data set (default 1024)")
    parser.add_argument("--quick", action="store_true", help="60 steps, measure every 20 (a smoke test)")
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn without torchrun (default 2)")
    parser.add_argument("--backend", default=None, help="gloo or nccl (default: nccl on GPUs, else gloo)")
    parser.add_argument(
        "--out", type=Path, default=Path("out"), help="folder for rank 0's history ddp.safetensors (default ./out)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.every = 60, 20
    for name in ("steps", "every", "samples", "nproc"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    return args


def data(n: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 4, generator=g)
    return x, torch.tanh(x @ w) + 0.1 * torch.randn(n, 4, generator=g)


def train(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    x_all, y_all = data(args.samples)
    shard = slice(rank * args.samples // world, (rank + 1) * args.samples // world)  # DistributedSampler-like
    x, y = x_all[shard].to(device), y_all[shard].to(device)

    torch.manual_seed(0)  # DDP broadcasts rank 0's parameters anyway
    model = DDP(nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4)).to(device))
    opt = stableopt.Adam(model.parameters(), lr=args.lr)
    loss_fn = lambda: 0.5 * ((model(x) - y) ** 2).sum(1).mean()  # noqa: E731 - the usual DDP call

    opt.monitor(loss_fn, every=args.every, raw=True)  # a collective: runs on every rank in step()
    for _ in range(args.steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()

    # every rank holds the same history; show it once and check it
    cols = {k: v for k, v in opt.history.to_dict().items() if k not in ("seconds", "elapsed")}
    gathered = [None] * world
    dist.all_gather_object(gathered, cols)
    same = all(
        all(torch.equal(torch.as_tensor(g[k]).nan_to_num(), torch.as_tensor(cols[k]).nan_to_num()) for k in cols)
        for g in gathered
    )
    if rank == 0:
        print(f"stableopt + DDP: {world} ranks × {x.shape[0]} samples, backend {dist.get_backend()}")
        print(f"{'step':>6} {'loss':>9} {'λ_max(P⁻¹H)':>12} {'threshold':>10} {'ratio':>7} {'λ_max(H)':>9}")
        h = opt.history
        for s, loss, pre, thr, ratio, raw in zip(
            h["step"], h["loss"], h["preconditioned"], h["threshold"], h["ratio"], h["raw"]
        ):
            print(f"{s:6d} {loss:9.5f} {pre:12.2f} {thr:10.1f} {ratio:7.3f} {raw:9.4f}")
        print(f"histories identical on all {world} ranks: {same}")
        args.out.mkdir(parents=True, exist_ok=True)
        h.save(args.out / "ddp.safetensors")
        print(f"history: {args.out / 'ddp.safetensors'}")
    if not same:
        raise SystemExit("ranks disagree: this is a bug, please report it")


def _spawned(rank: int, world: int, init_file: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train(args)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        backend = args.backend or ("nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo")
        if backend == "gloo":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
        dist.init_process_group(backend)
        try:
            train(args)
        finally:
            dist.destroy_process_group()
        return 0
    fd, init_file = tempfile.mkstemp(prefix="stableopt-ddp-")
    os.close(fd)
    os.unlink(init_file)
    try:
        torch.multiprocessing.spawn(_spawned, args=(args.nproc, init_file, args), nprocs=args.nproc, join=True)
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
