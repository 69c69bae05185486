"""A small decoder-only transformer trained the usual way, with its edge of stability watched.

A character-level language model (causal scaled-dot-product attention, pre-LayerNorm blocks, GELU
MLPs, tied input/output embeddings) on a corpus generated in-process from a seeded toy grammar,
trained with the standard recipe: AdamW with two param groups (weight decay on the matrices, none
on norms, biases and positions), linear warmup then cosine decay, gradient clipping and gradient
accumulation. A monitor measures λ_max(P⁻¹H) of AdamW on a fixed probe batch, the lr guard
reacts to it, and the run ends with a Figure-1-style plot and the cost of a measurement counted
in training steps.

Run: python examples/transformer.py (--quick for CI). Writes transformer.safetensors and
transformer.png to --out.
"""

from __future__ import annotations

import math
import random
import time

import torch
from _common import Claims, console, parse, parser, save_history, table
from torch import Tensor, nn
from torch.nn import functional as F

import stableopt

# -- the corpus: sentences of a seeded toy grammar ---------------------------------------------
GRAMMAR = {
    "S": [["NP", "VP", "."], ["NP", "VP", "PP", "."], ["NP", "said that", "NP", "VP", "."]],
    "NP": [["the", "N"], ["the", "A", "N"], ["a", "N"], ["every", "N"]],
    "VP": [["V", "NP"], ["V"], ["V", "NP", "and", "V", "NP"]],
    "PP": [["P", "NP"]],
    "N": [["cat"], ["dog"], ["bird"], ["child"], ["river"], ["garden"], ["teacher"], ["stone"]],
    "A": [["small"], ["old"], ["green"], ["quiet"], ["bright"]],
    "V": [["sees"], ["follows"], ["finds"], ["likes"], ["carries"], ["sleeps"]],
    "P": [["near"], ["under"], ["behind"], ["with"]],
}


def sentence(rng: random.Random, symbol: str = "S") -> str:
    if symbol not in GRAMMAR:
        return symbol
    words = [sentence(rng, s) for s in rng.choice(GRAMMAR[symbol])]
    return " ".join(words).replace(" .", ".")


def corpus(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    text = []
    while sum(len(s) + 1 for s in text) < chars:
        text.append(sentence(rng))
    return " ".join(text)


# -- the model ----------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, context: int, d: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.positions = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tokens.weight  # tied embeddings
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tokens(idx) + self.positions[: idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices (2-D weights, tied embedding included) only."""
    decay = [p for p in model.parameters() if p.ndim >= 2 and p is not model.positions]
    rest = [p for p in model.parameters() if not (p.ndim >= 2 and p is not model.positions)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], steps=600, quick_steps=60)
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    p.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step (default 2)")
    args = parse(p, argv, every=20, quick_every=10)
    started = time.perf_counter()

    context, batch_size = 64, 16
    text = corpus(60_000 if not args.quick else 20_000, seed=args.seed)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    g = torch.Generator().manual_seed(args.seed)

    def windows(source: Tensor, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        start = torch.randint(0, len(source) - context - 1, (n,), generator=gen)
        x = torch.stack([source[s : s + context] for s in start])
        return x, torch.stack([source[s + 1 : s + context + 1] for s in start])

    model = TinyGPT(len(chars), context)
    probe = windows(val, 8, torch.Generator().manual_seed(12345))  # fixed: measurements comparable

    opt = stableopt.AdamW(param_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.99), guard=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup=max(5, args.steps // 20), total=args.steps))
    probe_loss = lambda: lm_loss(model, probe)  # noqa: E731
    # Attention runs through the default fused SDPA kernel, which has no double backward:
    # hvp="auto" (the default) finds that out on the first measurement and measures with finite
    # differences of gradients (report.hvp_backend == "fd"), with one RuntimeWarning saying so.
    opt.monitor(probe_loss, every=args.every, raw=True, hvp="auto")

    losses, step_seconds = [], 0.0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(args.accumulate):
            loss = lm_loss(model, windows(train, batch_size, g)) / args.accumulate
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()  # the monitor measures inside, after every --every steps
        schedule.step()
        step_seconds += time.perf_counter() - t0
        losses.append(total)

    history = opt.history
    measure_seconds = float(history.column("seconds").sum())
    train_step = (step_seconds - measure_seconds) / args.steps  # a training step without measuring
    cost = history.column("seconds") / train_step
    with torch.no_grad():
        val_loss = lm_loss(model, windows(val, 64, torch.Generator().manual_seed(7))).item()

    ratio, raw = history.column("ratio"), history.column("raw")
    table(
        f"{len(chars)} characters, {sum(p.numel() for p in model.parameters()):,} parameters, {args.steps} steps",
        ["step", "probe loss", "λ_max(P⁻¹H)", "threshold", "ratio", "raw λ_max(H)", "HVPs", "cost (steps)"],
        [
            (int(s), f"{lo:.3f}", f"{pre:,.0f}", f"{th:,.0f}", f"{r:.3f}", f"{rw:.2f}", int(h), f"{c:.1f}")
            for s, lo, pre, th, r, rw, h, c in zip(
                history.column("step"),
                history.column("loss"),
                history.column("preconditioned"),
                history.column("threshold"),
                ratio,
                raw,
                history.column("hvps"),
                cost,
            )
        ],
    )
    console.print(
        f"training step {train_step * 1e3:.1f} ms; a measurement costs {cost.mean():.1f} training steps on "
        f"average (median {float(sorted(cost)[len(cost) // 2]):.1f}, {history.column('hvps').mean():.0f} HVPs, "
        f"λ_max(P⁻¹H) and λ_max(H)); measuring took {measure_seconds / step_seconds:.0%} of the run; "
        f"guard actions: {len(history.events())}; validation loss {val_loss:.3f}"
    )

    save_history(history, args.out / "transformer.safetensors")
    stableopt.plot_history(
        history, args.out / "transformer.png", title="TinyGPT, AdamW (warmup + cosine, clipping, accumulation)", dpi=90
    )
    console.print(f"figure: {args.out / 'transformer.png'}")

    claims = Claims()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    claims.check("the model learns the grammar (training loss falls)", last < 0.7 * first, f"{first:.3f} → {last:.3f}")
    uniform = math.log(len(chars))
    claims.check(
        "validation loss below a uniform guess",
        val_loss < 0.8 * uniform,
        f"{val_loss:.3f} vs ln {len(chars)} = {uniform:.3f}",
    )
    claims.check(
        "every measurement converged and is finite",
        bool(history.column("converged").all()),
        f"{len(history)} measurements",
    )
    claims.check(
        "the preconditioned sharpness rises from the first measurement (progressive sharpening)",
        float(history.column("preconditioned").max()) > 1.5 * float(history.column("preconditioned")[0]),
        f"{history.column('preconditioned')[0]:,.0f} → max {history.column('preconditioned').max():,.0f}",
    )
    reach = 0.3 if args.quick else 0.9  # --quick stops while the ratio is still climbing
    claims.check(
        "the ratio climbs toward the edge (1 = AdamW's threshold)",
        float(ratio.max()) >= reach,
        f"first {ratio[0]:.2f}, max {ratio.max():.2f} (needs ≥ {reach})",
    )
    return claims.exit(started)


if __name__ == "__main__":
    raise SystemExit(main())
