"""Render the measured numbers in ``results/*.json`` as the Markdown tables of README.md.

``python benchmarks/summarize.py [--quick]`` rewrites the part of README.md between the
``<!-- results -->`` markers (full results by default, the ``-quick`` files with --quick).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICK = "--quick" in sys.argv


def load(name):
    p = HERE / "results" / (f"{name}-quick.json" if QUICK else f"{name}.json")
    return json.loads(p.read_text()) if p.exists() else None


def fmt_targets(lines, data, name):
    for t in (data or {}).get("targets", []):
        lines.append(
            f"| {'PASS' if t['pass'] else '**MISS**'} | {name} | {t['target']} | {t['value']:.4g} | {t['limit']:g} |"
        )


def main() -> None:
    L = []
    env = None
    names = [
        "step_overhead",
        "hvp",
        "sharpness",
        "peers",
        "end_to_end",
        "stopping_rules",
        "warm_replay",
        "start_vectors",
    ]
    data = {n: load(n) for n in names}
    for d in data.values():
        if d:
            env = d["environment"]
            break
    if env:
        L.append(
            f"Measured {env['time_utc']} on {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, "
            f"Python {env['python']}, {env['torch_threads']} intra-op thread(s), clock: {env.get('clock')}, "
            f"load average {tuple(round(x, 1) for x in env.get('load_average_1_5_15') or ())}; peers {env['peers']}."
        )
        mallocs = {n: (d or {}).get("environment", {}).get("malloc", "?") for n, d in data.items() if d}
        L.append(
            "Allocator per script: "
            + "; ".join(f"{n}: {m}" for n, m in mallocs.items())
            + ". BLAS threads in peers: "
            + str(((data.get("peers") or {}).get("environment") or {}).get("blas_threads"))
            + "."
        )
        L.append("")
    L += ["| verdict | benchmark | target | measured | limit |", "|---|---|---|---:|---:|"]
    for n in names:
        fmt_targets(L, data[n], n)
    L.append("")
    h = data["hvp"]
    if h:
        L += [
            "**HVP route** (time of one product in gradients, same batch; peak resident MB above baseline):",
            "",
            "| problem | params | gradient ms | reused graph | new forward per HVP | torch.func jvp(grad) | graph build | peak MB grad / reuse / fresh / func |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in h["rows"]:
            x, m = r["x_gradient"], r["peak_bytes"]
            L.append(
                f"| {r['problem']} | {r['n_params']} | {r['seconds']['grad'] * 1e3:.1f} | {x['reuse']:.2f} | {x['fresh']:.2f} | "
                f"{x['func']:.2f} | {x['reuse_build']:.2f} | {m['grad'] / 1e6:.1f} / {m['reuse_incl_graph'] / 1e6:.1f} / "
                f"{m['fresh'] / 1e6:.1f} / {m['func'] / 1e6:.1f} |"
            )
        L.append("")
        bk = h.get("backends")
        if bk:
            L += [
                '**HVP backends** (`hvp=` through the public operator `stableopt.measure(...).operator("raw")`; '
                "one product in gradients, — where the backend cannot differentiate the model):",
                "",
                "| problem | autograd | fd | forward |",
                "|---|---:|---:|---:|",
            ]
            for name, r in bk["costs"].items():
                x = r["x_gradient"]
                cells = " | ".join(f"{x[b]:.2f}" if b in x else "—" for b in ("autograd", "fd", "forward"))
                L.append(f"| {name} | {cells} |")
            L += [
                "",
                '| `hvp="fd"` vs float64 double backward | float32 max rel. error | float64 max rel. error |',
                "|---|---:|---:|",
            ]
            for name, a in bk["fd_accuracy"].items():
                L.append(f"| {name} | {a['float32']['max_rel_error']:.1e} | {a['float64']['max_rel_error']:.1e} |")
            L.append("")
            per = bk.get("fd_gradients_per_product")
            if per:
                L += [
                    '`hvp="fd"` gradients per product over a whole measurement (stencil, shortenings, probes, checks): '
                    + ", ".join(f"{k} {v:.2f}" for k, v in per.items())
                    + ".",
                    "",
                ]
            eig = bk.get("fd_eigen")
            if eig:
                L += [
                    '**`hvp="fd"` where transformers train**: the example transformer trained with AdamW (decay '
                    "on the matrices), measured at the default tol through the fused SDPA kernel against float64 "
                    "double backward (math kernel); the same with its matrix products in bfloat16:",
                    "",
                    "| step | compute | ratio | λ_max(P⁻¹H) error | ratio error | raw λ_max error | estimated (hvp_error) | converged | products | CPU s |",
                    "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
                ]
                for r in eig.values():
                    L.append(
                        f"| {r['steps']} | {r['compute']} | {r['ratio']:.2f} | {r['preconditioned_rel_error']:.1e} | "
                        f"{r['ratio_rel_error']:.1e} | {r['raw_rel_error']:.1e} | {r['hvp_error']:.1e} | "
                        f"{r['converged']} | {r['products']} | {r['cpu_seconds']:.1f} |"
                    )
                L.append("")
    s = data["sharpness"]
    if s:
        L += [
            f"**Stopping rules, cold** ({s['problem']}, {s['n_params']} params; reference λ_max(P⁻¹H) = "
            f"{s['reference_preconditioned'][0]:.6g}, λ2/λ1 = {s['reference_preconditioned'][1] / s['reference_preconditioned'][0]:.3f}; "
            f"λ_max(H) = {s['reference_raw'][0]:.6g}, λ2/λ1 = {s['reference_raw'][1] / s['reference_raw'][0]:.3f}):",
            "",
            "| quantity | rule | tol | HVPs | seconds | relative error |",
            "|---|---|---:|---|---|---|",
        ]

        def cold_rows(rows):
            groups = {}
            for r in rows:
                groups.setdefault((r["quantity"], r["bound"], r["tol"]), []).append(r)
            for (q, b, t), rs in groups.items():
                hv = ", ".join(str(r["hvps"]) for r in rs)
                secs = ", ".join("{:.2f}".format(r["seconds"]) for r in rs)
                errs = ", ".join("{:.1e}".format(r["rel_error"]) for r in rs)
                L.append(f"| {q} | {b} | {t:g} | {hv} | {secs} | {errs} |")

        cold_rows(s["cold"])
        c = s.get("crowded")
        if c:
            rp, rr = c["reference_preconditioned"], c["reference_raw"]
            L += [
                "",
                f"**Stopping rules, cold, crowded stress case** ({c['problem']}: same MLP and recipe on i.i.d. Gaussian "
                f"inputs; top eigenvalues / λ1: P⁻¹H {', '.join('%.4f' % (x / rp[0]) for x in rp)}; "
                f"H {', '.join('%.4f' % (x / rr[0]) for x in rr)}; not a target):",
                "",
                "| quantity | rule | tol | HVPs | seconds | relative error |",
                "|---|---|---:|---|---|---|",
            ]
            cold_rows(c["cold"])
        warm_default = s.get("default_warm_bound")
        L += [
            "",
            "**Warm starts along Adam training** (every estimate checked against a cold tol-1e-5 solve; "
            f"the library uses {warm_default!r} for warm solves):",
            "",
            "| rule | mean HVPs | mean seconds | worst relative error |",
            "|---|---:|---:|---:|",
        ]
        for b, v in s["warm_summary"].items():
            L.append(
                f"| {b}{' (default)' if b == warm_default else ''} | {v['warm_mean_hvps']:.1f} | {v['warm_mean_seconds']:.3f} | {v['warm_max_error']:.1e} |"
            )
        L += [
            "",
            "**Memory** (MB; extra = peak above the level with model, data, grads and Adam state held):",
            "",
            "| problem | training step extra | cold measurement extra | warm measurement extra | resident training state | in-use ratio |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for m in s["memory"]:
            L.append(
                f"| {m['problem']} | {m['train_step_extra'] / 1e6:.1f} | {m['cold_measurement_extra'] / 1e6:.1f} | "
                f"{m['warm_measurement_extra'] / 1e6:.1f} | {m['resident_training_state'] / 1e6:.1f} | {m['ratio_in_use']:.2f} |"
            )
        L.append("")
    p = data["peers"]
    if p:
        L += [
            f"**Peers** (measured {p['environment']['time_utc']}; {p['problem']} at Adam step {p['step']}, clock {p['clock']}; every setting run {p.get('repeat', 1)} times, "
            "interleaved round by round with the others, median time; ✓ = reached 1e-3 in every run; stableopt warm = the "
            f"monitor's measurement at step {p['step']}, warm-started from the vectors of the measurement 5 steps before):",
            "",
            "| quantity | tool | setting | HVPs | seconds (median) | relative error (worst) |",
            "|---|---|---|---|---:|---:|",
        ]
        for q in ("preconditioned", "raw"):
            for r in p[q]["rows"]:
                if "value" not in r:
                    L.append(f"| {q} | {r['tool']} | skipped: {r['skipped']} | | | |")
                    continue
                ok = "✓" if r["rel_error"] <= 1e-3 else ""
                name = (
                    f"**{r['tool']}**"
                    if r["tool"].startswith("stableopt") and r["setting"].get("tol") == 1e-3
                    else r["tool"]
                )
                setting = r["setting"]
                if r["tool"].startswith("stableopt"):
                    setting = (
                        "default (tol=1e-3)" if setting["tol"] == 1e-3 else f"tol={setting['tol']:g} (informational)"
                    )
                hv = ", ".join(str(x["hvps"]) for x in r["runs"])
                L.append(f"| {q} | {name} | {setting} | {hv} | {r['seconds']:.3f} | {r['rel_error']:.1e} {ok} |")
        runs = p.get("warm_runs", {})
        if runs:
            L += [
                "",
                "Warm measurements along the run (every 5 Adam steps, HVPs): "
                + "; ".join(f"tol {v['tol']:g}: {', '.join(map(str, v['hvps']))}" for v in runs.values())
                + ".",
            ]
        info = [(q, k, v) for q in ("preconditioned", "raw") for k, v in p[q].get("informational", {}).items()]
        if info:
            L += [
                "",
                "Informational ratios (not judged; ≥ 1 means stableopt is faster):",
                "",
                "| quantity | comparison | ratio |",
                "|---|---|---:|",
            ]
            L += [f"| {q} | {k} | {v:.2f} |" for q, k, v in info]
        L.append("")
    s = data["step_overhead"]
    if s:
        L += [
            "**Step overhead** (stableopt / torch.optim step time, min over interleaved rounds):",
            "",
            "| problem | optimizer | plain | monitor not due | guard on |",
            "|---|---|---:|---:|---:|",
        ]
        rows = {}
        for r in s["rows"]:
            rows.setdefault((r["problem"], r["optimizer"]), {})[r["variant"]] = r["ratio"]
        for (pb, o), v in rows.items():
            L.append(
                f"| {pb} | {o} | {v.get('plain', float('nan')):.3f} | {v.get('monitor-not-due', float('nan')):.3f} | {v.get('guard', float('nan')):.3f} |"
            )
        L.append("")
    e = data["end_to_end"]
    if e:
        L += [
            f"**End to end** (measured {e['environment']['time_utc']}; {e['problem']}, full-batch Adam; monitor via "
            f"{'opt.monitor' if e['has_monitor'] else 'opt.sharpness by hand'}):",
            "",
            "| monitor every | steps | measurements | HVPs per measurement | overhead |",
            "|---:|---:|---:|---|---:|",
        ]
        for r in e["rows"]:
            hv = ", ".join(map(str, r.get("hvps", []))) or "—"
            L.append(f"| {r['every']} | {r['steps']} | {r['measurements']} | {hv} | {r['overhead'] * 100:+.1f}% |")
        L.append("")
        every100 = e["rows"][0]
        if every100.get("windows"):
            L += ["Monitor every 100 steps, by part of the run:", "", "| steps | overhead |", "|---|---:|"]
            for w in every100["windows"]:
                note = " without the first (cold) measurement" if w["without_first_measurement"] else ""
                L.append(f"| {w['steps']}{note} | {w['overhead'] * 100:+.1f}% |")
            L.append("")
        o = e.get("oracle")
        if o:
            L += [
                f"Every measurement of that run replayed (tol {e.get('tol', 1e-3):g}): products used, products an oracle rule "
                f"needs (first Lanczos step within tol of a tight reference, same start vector), and the monitor's error; "
                f"graph build {o['build_seconds'] * 1e3:.0f} ms, one HVP {o['hvp_seconds'] * 1e3:.0f} ms, one training step "
                f"{o['step_seconds'] * 1e3:.0f} ms:",
                "",
                "| step | start | HVPs used | oracle HVPs | rel. error |",
                "|---:|---|---:|---:|---:|",
            ]
            for x in o["rows"]:
                need = x["oracle_hvps"] if x["oracle_hvps"] is not None else "—"
                L.append(
                    f"| {x['step']} | {'cold' if x['cold'] else 'warm'} | {x['hvps_used']} | {need} | {x['rel_error']:.1e} |"
                )
            L += [
                "",
                f"With oracle stopping the every-100 overhead would still be {o['lower_bound_overhead'] * 100:.1f}% over the run, "
                f"{o['lower_bound_overhead_first_half'] * 100:.1f}% over its first half "
                f"({o['lower_bound_overhead_warm_first_half'] * 100:.1f}% without the cold first measurement).",
                "",
            ]
            if "lower_bound_overhead_loose" in o:
                need = ", ".join(str(x["oracle_hvps_loose"]) for x in o["rows"])
                L += [
                    f"At tol 1e-2 the oracle would need {need} products at those states (same start vectors): "
                    f"{o['lower_bound_overhead_loose'] * 100:.1f}% over the run.",
                    "",
                ]
        lo = e.get("loose")
        if lo:
            w = "; ".join(
                f"steps {x['steps']}{' without the first measurement' if x['without_first_measurement'] else ''}: "
                f"{x['overhead'] * 100:+.1f}%"
                for x in lo["windows"]
            )
            L += [
                f"Informational: the every-100 run with the monitor at tol {lo['tol']:g}: {lo['overhead'] * 100:+.1f}% over "
                f"{lo['steps']} steps ({w}); HVPs per measurement {', '.join(map(str, lo['hvps']))}.",
                "",
            ]
    r = data["stopping_rules"]
    if r:
        L += [
            f"**Stopping rules on synthetic spectra** (n = {r['n']}, tol 1e-3; wrong = λ_max more than 1e-3 from eigvalsh):",
            "",
            "| λ2/λ1 | case | rule | wrong | mean products |",
            "|---:|---|---|---:|---:|",
        ]
        for x in r["rows"]:
            rule = x["bound"] + ("" if x["cap"] is None else f" (cap {x['cap']:g})")
            if x["cap"] is not None and "guard" in x:
                rule = rule[:-1] + (", no start guard)" if x["guard"] is None else ")")
            L.append(
                f"| {x['spectrum'][1]:g} | {x['case']} | {rule} | {x['fails']}/{x['solves']} | {x['mean_products']:.1f} |"
            )
        L.append("")
    w = data["warm_replay"]
    if w:
        L += [
            f"**Warm measurements through the edge** (measured {w['environment']['time_utc']}; {w['problem']}, "
            f"full-batch Adam lr {w['lr']:g} for {w['steps']} steps from the GD state, through the edge and its loss spikes; every "
            'schedule replayed from the saved states with one warm-start dict, the first measurement cold; "after" = '
            'the states after steps t ≡ 0 (mod every), "before" = one step later; error against a float64 Lanczos '
            f'reference at residual {w["ref_tol"]:g}; bound = tol cold, 2·tol warm; "no start guard" = '
            "`GAP_START_SHIFT` = ∞, the rules before issue 20):",
            "",
            "| rules | every | tol | states | measurements | worst error (step) | worst / bound | over tol | out of bound "
            "| warm HVPs mean / max | HVPs in all |",
            "|---|---:|---:|---|---:|---|---:|---:|---:|---|---:|",
        ]
        for x in w["table"]:
            L.append(
                f"| {x['variant']} | {x['every']} | {x['tol']:g} | {x['states']} | {x['measurements']} | "
                f"{x['worst_error']:.1e} ({x['worst_step']}) | {x['worst_over_bound']:.2f} | {x['over_tol']} | "
                f"{x['out_of_bound']} | {x['warm_mean_hvps']:.1f} / {x['warm_max_hvps']} | {x['total_hvps']} |"
            )
        L.append("")
    v = data["start_vectors"]
    if v:
        L += [
            f"**Cold start vectors** (measured {v['environment']['time_utc']}; tol {v['tol']:g}, basis {v['max_basis']}, {v['seeds']} random vectors per case, each also "
            "used as r in unit(D·∇L) + r; |cos| of the gradient direction D·∇L with the top three eigenvectors; wrong = λ_max "
            "more than tol from the float64 reference):",
            "",
            "| state | quantity | λ2/λ1 | \\|cos\\| u1, u2, u3 | start | HVPs | mean | wrong |",
            "|---|---|---:|---|---|---|---:|---:|",
        ]
        for x in v["rows"]:
            cos = ", ".join(f"{c:.3f}" for c in x["cos_top3"])
            hv = ", ".join(str(s["hvps"]) for s in x["solves"])
            L.append(
                f"| {x['case']} | {x['quantity']} | {x['top'][1]:.4f} | {cos} | {x['start']} | {hv} | {x['mean_hvps']:.1f} | "
                f"{x['wrong']}/{len(x['solves'])} |"
            )
        L.append("")
    text = "\n".join(L)
    readme = HERE / "README.md"
    body = readme.read_text() if readme.exists() else "<!-- results -->\n<!-- /results -->\n"
    a, b = body.index("<!-- results -->"), body.index("<!-- /results -->")
    readme.write_text(body[: a + len("<!-- results -->")] + "\n" + text + "\n" + body[b:])
    print(text)


if __name__ == "__main__":
    main()
