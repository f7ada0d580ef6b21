import sys,re
def load(d):
    out=[]
    for c in ("zipf","pareto"):
        for l in open(f"{d}/layers_{c}.txt"):
            t=l.split()
            # c E S g ranks: objective X bound Y gap Z optimal B T ms
            out.append(((t[0],t[1],t[2],t[3]), float(t[6]), float(t[8]), t[12]=="true", float(t[13])))
    return out
a=load(sys.argv[1]); b=load(sys.argv[2])
assert len(a)==len(b)
for x,y in zip(a,b):
    assert x[0]==y[0]
    if abs(x[1]-y[1])>1e-9 or abs(x[2]-y[2])>1e-9 or x[3]!=y[3]:
        tag = "BETTER" if y[1]<x[1]-1e-9 else ("WORSE" if y[1]>x[1]+1e-9 else "")
        btag = "bound-worse" if y[2]<x[2]-1e-9 else ("bound-better" if y[2]>x[2]+1e-9 else "")
        print(x[0], f"F {x[1]:.6f} -> {y[1]:.6f} bound {x[2]:.6f} -> {y[2]:.6f} opt {x[3]}->{y[3]}", tag, btag)
print(len(a),"layers")
