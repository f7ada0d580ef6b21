import sys,statistics
# median over rounds of p50 and max for selected rows; counts/gaps from round 1
sel=[("zipf","12","24","6 x 4"),("zipf","12","24","8 x 3"),("zipf","16","32","4 x 8"),("zipf","16","32","8 x 4"),("pareto","12","24","6 x 4"),("pareto","12","24","8 x 3"),("pareto","16","32","4 x 8"),("pareto","16","32","8 x 4")]
def rows(d):
    out={}
    for c in ("zipf","pareto"):
        for l in open(f"{d}/four_{c}.md"):
            t=[x.strip() for x in l.strip().strip('|').split('|')]
            out[(t[0],t[1],t[2],t[3])]=t
    return out
for lab,dirs in (("HEAD 963fb17",sys.argv[1].split(',')),("lns-counts",sys.argv[2].split(','))):
    R=[rows(d) for d in dirs]
    for k in sel:
        t=R[0][k]
        p50=statistics.median(float(r[k][10]) for r in R); mx=statistics.median(float(r[k][12]) for r in R)
        print(f"| {lab} | {k[0]} {k[1]}/{k[2]} {k[3]} | {t[5]} | {t[7]} | {t[8]} | {t[9]} | {p50:.0f} | {mx:.0f} |")
