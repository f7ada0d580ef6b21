import re,sys,json,datetime as dt
def ts(s): return dt.datetime.strptime(s.strip('"'),"%Y-%m-%dT%H:%M:%SZ")
for f in sys.argv[1:]:
    seen={}
    for line in open(f):
        if not line.startswith("SAMPLE"): continue
        name=line.split()[1]
        m=re.search(r'last gen=(\S+) start=(\S+) fin=(\S+) before=(\S+) pred=(\S+) after=(\S+)',line)
        if not m or m.group(1)=='null': continue
        g=int(m.group(1))
        if (name,g) in seen: continue
        d=(ts(m.group(3))-ts(m.group(2))).total_seconds() if m.group(3)!='null' else None
        seen[(name,g)]=(d,float(m.group(4)),float(m.group(5)),None if m.group(6)=='null' else float(m.group(6)))
    for name in sorted(set(k[0] for k in seen)):
        rows=[v for k,v in seen.items() if k[0]==name]
        ds=[r[0] for r in rows if r[0] is not None]; af=[r[3] for r in rows if r[3]]
        print(f, name, "remaps",len(rows),"mean dur %.2f"%(sum(ds)/len(ds)), "before %.3f"%(sum(r[1] for r in rows)/len(rows)), "pred %.3f"%(sum(r[2] for r in rows)/len(rows)), "after %.3f (n=%d)"%(sum(af)/len(af),len(af)))
