import sys
def load(f):
    return [l.split() for l in open(f) if l.strip()]
base=load(sys.argv[1])
for f in sys.argv[2:]:
    o=load(f)
    better=worse=same=0; bw=bb=0; rel=[]
    groups={}
    for a,b in zip(base,o):
        fa,fb=float(a[1]),float(b[1]); la,lb=float(a[2]),float(b[2])
        d=fb/fa-1; rel.append(d)
        if fb<fa-1e-9: better+=1
        elif fb>fa+1e-9: worse+=1
        else: same+=1
        if lb<la-1e-9: bw+=1
        if lb>la+1e-9: bb+=1
        g=groups.setdefault(a[0],[[],[],[],[]]); g[0].append(fa); g[1].append(fb); g[2].append(float(a[3])); g[3].append(float(b[3]))
    print(f"{f}: n={len(o)} better {better} worse {worse} same {same}; bound worse {bw} better {bb}; mean rel {100*sum(rel)/len(rel):+.4f}%")
    for k,(A,B,TA,TB) in groups.items():
        TA.sort(); TB.sort()
        print(f"   {k}: mean F {sum(A)/len(A):.6f} -> {sum(B)/len(B):.6f}; ms p50 {TA[len(TA)//2]:.0f}->{TB[len(TB)//2]:.0f} max {TA[-1]:.0f}->{TB[-1]:.0f}")
