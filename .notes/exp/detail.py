import pickle, sys
from rules import *
d = pickle.load(open(sys.argv[1], "rb"))
rule = sys.argv[2]
for t in d["cold"]:
    res = evaluate([t], rule)
    stop, err = res[0]
    ref = t["ref"]
    line = []
    for m in range(max(1, stop-3), min(stop+4, len(t["al"])+1)):
        th, S, r = ritz(t["al"], t["be"], m)
        line.append(f"m{m}: th1err={(ref[0]-float(th[0]))/ref[0]:.1e} th2={float(th[1])/ref[0] if m>1 else 0:.4f} r1={float(r[0])/ref[0]:.1e} r2={float(r[1])/ref[0] if m>1 else 0:.1e} est={est(rule, th, S, r, 0, m)/ref[0]:.1e}")
    print(t["which"], "ref ratios", [round(x/ref[0],4) for x in ref], "stop", stop, f"err {err:.1e}")
    print("   " + "\n   ".join(line))
