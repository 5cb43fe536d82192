import json, subprocess, sys
exe = sys.argv[1]
traces = ["step","ramp","burst","diurnal","noisy","sparse","flash"]
base = [("keda",0.2),("keda-eqct",0.5),("kpa",0.5)]
rows = {}
for seed in range(1,6):
    out = json.loads(subprocess.check_output([exe,"simulate","--json","--seed",str(seed)]+sys.argv[2:]))
    for r in out: rows[(r["trace"],r["policy"],seed)] = r
print("| trace | baseline | over-target ratio, seeds 1-5 (worst) | replica-seconds ratio, seeds 1-5 (worst) | goal |")
print("|---|---|---|---|---|")
for t in traces:
    for b,g in base:
        ot=[];rs=[]
        for s in range(1,6):
            w=rows[(t,"warren",s)]; k=rows[(t,b,s)]
            a,c=w["over_target_fraction"],k["over_target_fraction"]
            ot.append(0.0 if a==0 else (float('inf') if c==0 else a/c))
            rs.append(w["replica_seconds"]/k["replica_seconds"])
        met = all(o<=g for o in ot) and all(r<=1.1 for r in rs)
        print(f"| `{t}` | `{b}` | {' '.join(f'{o:.2f}' for o in ot)} ({max(ot):.2f}) | {' '.join(f'{r:.2f}' for r in rs)} ({max(rs):.2f}) | {'met' if met else 'missed'} |")
print()
print("| trace | policy | over-target share, seeds 1-5 | replica-seconds, seeds 1-5 |")
print("|---|---|---|---|")
for t in traces:
    for p in ["warren","keda","keda-eqct","kpa"]:
        a=' '.join('%.1f%%' % (rows[(t,p,s)]['over_target_fraction']*100) for s in range(1,6))
        b=' '.join('%.0f' % rows[(t,p,s)]['replica_seconds'] for s in range(1,6))
        print(f"| `{t}` | `{p}` | {a} | {b} |")
