"""Run every benchmark: ``python benchmarks/run.py [--quick] [--wall] [--threads N] [names...]``.

Each script runs in its own process (clean allocator and RNG state), writes
``benchmarks/results/<name>[-quick].json`` with the environment, and prints PASS/MISS per target;
this runner prints the collected PASS/MISS table at the end. ``--quick`` uses the small problem
variants (CI-sized, under two minutes on a 2-core CPU once the GD state is cached).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["step_overhead", "hvp", "sharpness", "peers", "end_to_end", "stopping_rules", "start_vectors"]
#: result files a script writes, where it writes more than its own (stopping_rules runs warm_replay)
RESULTS = {"stopping_rules": ["stopping_rules", "warm_replay"]}


def main(argv: list[str]) -> int:
    flags = [a for a in argv if a.startswith("--")]
    if "--threads" in argv:
        flags.append(argv[argv.index("--threads") + 1])
    names = [a for a in argv if not a.startswith("--") and a in SCRIPTS] or SCRIPTS
    quick = "--quick" in flags
    t0 = time.perf_counter()
    failed = []
    for name in names:
        print(f"== {name} ==", flush=True)
        t = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / f"{name}.py"), *flags], cwd=HERE)
        print(f"   ({time.perf_counter() - t:.0f} s)", flush=True)
        if rc:
            failed.append(name)
    print(f"\n== targets ({'quick' if quick else 'full'}; {time.perf_counter() - t0:.0f} s) ==")
    for name in [r for n in names for r in RESULTS.get(n, [n])]:
        path = HERE / "results" / (f"{name}-quick.json" if quick else f"{name}.json")
        if name in failed or not path.exists():
            print(f"  [ERROR] {name}: no result")
            continue
        for tg in json.loads(path.read_text()).get("targets", []):
            print(
                f"  [{'PASS' if tg['pass'] else 'MISS'}] {name}: {tg['target']}: {tg['value']:.4g} (limit {tg['limit']:g})"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
