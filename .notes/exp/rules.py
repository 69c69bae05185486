import pickle, sys, math, torch
def ritz(al, be, m):
    T = torch.diag(torch.tensor(al[:m], dtype=torch.float64))
    if m > 1:
        o = torch.tensor(be[:m-1], dtype=torch.float64); T += torch.diag(o, 1) + torch.diag(o, -1)
    th, S = torch.linalg.eigh(T); th, S = th.flip(0), S.flip(1)
    r = be[m-1] * S[-1].abs()
    return th, S, r

def est(rule, th, S, r, beta, m):
    r1 = float(r[0]); t1 = float(th[0])
    if rule == "residual" or m == 1: return r1
    if rule == "gap":
        return min(r1, r1**2 / max(float(th[0]-th[1]), 1e-300))
    if rule == "sgap":
        d = float(th[0] - th[1] - r[1])
        return min(r1, r1**2/d) if d > 0 else r1
    if rule.startswith("cluster"):
        C = m - 1
        best = r1
        s2 = 0.0
        for c in range(1, min(m, 8)):
            s2 += float(r[c-1])**2
            d = float(th[c-1] - th[c] - r[c])
            if d > 0: best = min(best, s2 / d)
        return best
    if rule.startswith("sg+inc"):
        return None
    raise ValueError(rule)

def evaluate(trajs, rule, tol=1e-3, min_iters=1):
    out = []
    for t in trajs:
        ref = t["ref"][0]; M = len(t["al"])
        stop = None
        for m in range(1, M + 1):
            th, S, r = ritz(t["al"], t["be"], m)
            if m >= min_iters and est(rule, th, S, r, t["be"][m-1], m) <= tol * abs(float(th[0])):
                stop = m; break
        if stop is None: out.append((M, float('nan'))); continue
        out.append((stop, abs(float(th[0]) - ref) / abs(ref)))
    return out

if __name__ == "__main__":
    d = pickle.load(open(sys.argv[1], "rb"))
    for rule in ["residual", "gap", "sgap", "cluster"]:
        for key in ["cold", "warm6", "warm100"]:
            tr = d[key] if key == "cold" else d[key][1:]
            for mi in ([1] if key == "cold" else [1, 4]):
                res = evaluate(tr, rule, min_iters=mi)
                hv = [a for a, _ in res]; er = [b for _, b in res]
                print(f"{rule:9s} {key:8s} min{mi} HVPs mean {sum(hv)/len(hv):5.1f} max {max(hv):3d} | err max {max(er):.1e}  {hv}")

def evaluate2(trajs, base, extra, tol=1e-3, min_iters=1, c=5.0, f=0.25):
    out = []
    for t in trajs:
        ref = t["ref"][0]; M = len(t["al"]); stop = None; prev = None
        for m in range(1, M + 1):
            th, S, r = ritz(t["al"], t["be"], m)
            t1 = abs(float(th[0]))
            ok = est(base, th, S, r, 0, m) <= tol * t1
            if extra == "inc": ok = ok and prev is not None and abs(float(th[0]) - prev) <= f * tol * t1
            if extra == "rc": ok = ok and float(r[0]) <= c * tol * t1
            if extra == "both": ok = ok and float(r[0]) <= c * tol * t1 and prev is not None and abs(float(th[0]) - prev) <= f * tol * t1
            prev = float(th[0])
            if m >= min_iters and ok: stop = m; break
        if stop is None: out.append((M, float('nan'))); continue
        out.append((stop, abs(float(th[0]) - ref) / abs(ref)))
    return out

def table(path):
    d = pickle.load(open(path, "rb"))
    for base in ["residual", "sgap", "cluster"]:
      for extra in (["none"] if base == "residual" else ["none", "inc", "rc", "both"]):
        for key in ["cold", "warm6", "warm100"]:
            tr = d[key] if key == "cold" else d[key][1:]
            for mi in ([1] if key == "cold" else [3, 4]):
                res = evaluate2(tr, base, extra, min_iters=mi)
                hv = [a for a, _ in res]; er = [b for _, b in res]
                print(f"{base:8s} {extra:5s} {key:8s} min{mi} HVPs mean {sum(hv)/len(hv):5.1f} max {max(hv):3d} | err max {max(er):.1e}  {hv}")
