"""Quick start: swap torch.optim.Adam for stableopt.Adam, add one monitor, print the report.

Full-batch training of a tanh MLP on scikit-learn's digits; every 20 steps the monitor measures
λ_max(P⁻¹H) against Adam's stability threshold 38/η. Run: python examples/quickstart.py
"""

import argparse
import pathlib

import torch

import stableopt
from stableopt.demo import digits_data, make_mlp, mse_loss

cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
cli.add_argument("--steps", type=int, default=600, help="full-batch steps (default 600)")
cli.add_argument("--quick", action="store_true", help="450 steps (CI)")
cli.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out"), help="output folder (default ./out)")
args = cli.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
steps = 450 if args.quick else args.steps

# ------------------------------------------------------------------ the 15 lines that matter
torch.manual_seed(0)
x, y, _ = digits_data()  # 1000 digits, one-hot targets
model = make_mlp((64, 128, 128, 10))  # tanh MLP
loss_fn = lambda: mse_loss(model(x), y)  # ½‖f(x) − y‖², full batch

opt = stableopt.Adam(model.parameters(), lr=1e-3)  # was: torch.optim.Adam
opt.monitor(loss_fn, every=20, raw=True)  # λ_max(P⁻¹H), ratio, λ_max(H)

for _ in range(steps):
    opt.zero_grad()
    loss_fn().backward()
    opt.step()

opt.report()  # where training stands vs. the edge
opt.history.save(args.out / "quickstart.safetensors")  # stableopt.History.load(...) reads it
stableopt.plot_history(opt.history, args.out / "quickstart.png", dpi=80)
# ------------------------------------------------------------------

ratio = opt.history.column("ratio")
print(
    f"ratio {ratio[0]:.2f} at step 20 → peak {ratio.max():.2f} → {ratio[-1]:.2f} at step {steps}; outputs in {args.out}"
)
assert ratio[0] < 0.5 and 0.9 <= ratio.max() <= 1.2, "expected Adam to climb to its edge (ratio ≈ 1) and stay near it"
