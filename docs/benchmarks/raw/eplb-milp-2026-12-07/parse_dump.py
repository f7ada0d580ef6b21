"""Parses exact_sweep's SWEEP_VERBOSE stderr (dump/*.err) into JSON instances."""
import json, os, re, sys

d = sys.argv[1]
out = []
for f in sorted(os.listdir(d)):
    if not f.endswith(".err"):
        continue
    cls, e, slots, r = f[:-4].split("_")
    g = int(r[1:])
    lines = open(os.path.join(d, f)).read().splitlines()
    idx = 0
    for i in range(0, len(lines), 2):
        m = re.match(r"loads LoadHistory \{ windows: (.*) \}$", lines[i])
        loads = [w[0] for w in json.loads(m.group(1))]
        m2 = re.match(r"(\d+) ranks: objective ([\d.]+) bound ([\d.]+) gap (\S+) optimal (\w+) ([\d.]+) ms", lines[i + 1])
        assert int(m2.group(1)) == g
        out.append(dict(
            name=f"{cls}_{e}_{slots}_{g}x{int(slots)//g}_i{idx}", cls=cls, experts=int(e), slots=int(slots),
            ranks=g, windows=loads, our_objective=float(m2.group(2)), our_bound=float(m2.group(3)),
            our_gap=float(m2.group(4)), our_optimal=m2.group(5) == "true", our_ms=float(m2.group(6))))
        idx += 1
json.dump(out, sys.stdout, indent=1)
