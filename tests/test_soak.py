"""Long-run soak: a monitor every 10 steps for thousands of steps, and memory does not grow.

No graph or tensor leaks (live tensor count flat, RSS flat, Python heap growth explained by the
history alone) and the history's memory per record is bounded (tracemalloc over a window).

The in-suite run is the full 20 000 steps (2 000 measurements, ~15 s on an idle 2-core CPU);
``STABLEOPT_SOAK_STEPS=N`` shortens or lengthens it, ``python tests/test_soak.py [N]`` runs it
standalone with a summary line.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import tracemalloc

import pytest
import torch
from torch import nn

import stableopt

STEPS = int(os.environ.get("STABLEOPT_SOAK_STEPS", "20000"))
EVERY = 10
WARMUP = min(2000, STEPS // 5)
WINDOW = 1000  # steps traced by tracemalloc (it slows Python allocations several-fold)
#: bytes of Python memory one history record may take (≈ 20 columns of Python floats)
PER_RECORD = 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _live_tensors() -> int:
    gc.collect()
    # issubclass(type(o)): isinstance would call __class__ on deprecated proxies (warnings)
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.mark.slow
def test_soak_monitor_every_10_steps_memory_flat():
    if not hasattr(stableopt.Adam, "monitor"):
        pytest.skip("monitors not available")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        x, y = torch.randn(8, 3), torch.randn(8, 1)
        opt = stableopt.Adam(model.parameters(), lr=1e-2)
        loss_fn = lambda: ((model(x) - y) ** 2).mean()  # noqa: E731
        opt.monitor(loss_fn, every=EVERY, tol=1e-2)

        def train(n: int) -> None:
            for _ in range(n):
                opt.zero_grad(set_to_none=False)
                loss_fn().backward()
                opt.step()

        t0 = time.perf_counter()
        train(WARMUP)
        tensors0, rss0, records0 = _live_tensors(), _rss_bytes(), len(opt.history)
        blocks0 = sys.getallocatedblocks()
        tracemalloc.start()
        try:
            traced0 = tracemalloc.get_traced_memory()[0]
            train(WINDOW)
            per_record = (tracemalloc.get_traced_memory()[0] - traced0) / (WINDOW // EVERY)
        finally:
            tracemalloc.stop()
        train(STEPS - WARMUP - WINDOW)
        gc.collect()
        tensors1, rss1, records1 = _live_tensors(), _rss_bytes(), len(opt.history)
        blocks = sys.getallocatedblocks() - blocks0
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)

    assert opt.steps_taken == STEPS
    assert records1 == STEPS // EVERY
    new_records = records1 - records0
    assert tensors1 <= tensors0 + 5, f"live tensors grew from {tensors0} to {tensors1}"
    assert per_record <= PER_RECORD, f"{per_record:.0f} B of Python memory per history record"
    # Python heap blocks: a history record is a few dozen small objects at most
    assert blocks <= 64 * new_records + 10_000, f"{blocks} new Python blocks for {new_records} records"
    assert rss1 - rss0 <= 32 * 1024 * 1024, f"RSS grew {(rss1 - rss0) / 2**20:.1f} MiB"
    print(
        f"soak: {STEPS} steps, {records1} measurements in {seconds:.1f} s; {per_record:.0f} B/record "
        f"(tracemalloc); {blocks / max(new_records, 1):.1f} Python blocks/record; "
        f"RSS {(rss1 - rss0) / 2**20:+.1f} MiB; live tensors {tensors0}->{tensors1}"
    )


if __name__ == "__main__":  # the full soak: python tests/test_soak.py [STEPS]
    STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    WARMUP = min(2000, STEPS // 5)
    test_soak_monitor_every_10_steps_memory_flat()
