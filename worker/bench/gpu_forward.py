"""Forward API on one GPU: a 1-rank CUDA worker vs a 1-rank CPU worker on fixture checkpoints
(same rows, per MoE layer), then round-trip latency through the pipelined stream on a
DeepSeek-V3-shaped synthetic layer. Prints tables; run by run.sh on the device."""
import json, os, subprocess, sys, time, urllib.request, socket
import numpy as np
sys.path.insert(0, "clients/python/src")
import moe_client

B = os.environ.get("WORKER", ".carry/fwd/moe-worker")
GPU = os.environ.get("GPU_BACKEND", "cuda")
OUT = os.environ.get("OUT", "/tmp")

def port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def start(backend, extra, tag):
    http, fwd, comm = port(), port(), port()
    env = dict(os.environ, MOE_RANK="0", MOE_WORLD_SIZE="1", MOE_COMM_PORT=str(comm), MOE_HTTP_PORT=str(http),
               MOE_FORWARD_PORT=str(fwd), MOE_ADVERTISE_ADDR="127.0.0.1", MOE_BACKEND=backend, MOE_TRAFFIC="api",
               MOE_LEADER_ADDR=f"127.0.0.1:{comm}", RUST_LOG="warn")
    log = open(f"{OUT}/{tag}.log", "wb")
    p = subprocess.Popen([B] + extra, env=env, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.time()
    while True:
        if p.poll() is not None:
            print(open(f"{OUT}/{tag}.log").read()[-3000:]); raise SystemExit(f"{tag} exited {p.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=2); break
        except Exception:
            if time.time() - t0 > 300: raise SystemExit(f"{tag} not ready")
            time.sleep(0.2)
    model = json.load(urllib.request.urlopen(f"http://127.0.0.1:{http}/v1/model"))
    model = model.get("model", model)
    return p, f"http://127.0.0.1:{fwd}", model, time.time() - t0

def moe_layers(model):
    for k in ("moeLayers", "moe_layers", "decoderLayers"):
        if k in model: return model[k]
    return None

print("## CUDA vs CPU worker, fixtures (64 rows, f32 in and out)")
print("| family | layer | rel. err (Frobenius) |")
print("|---|---|---|")
for fam in ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3", "deepseek_v3_fp8"]:
    d = f"fixtures/models/{fam}"
    try:
        pg, ug, model, _ = start(GPU, ["--weights", d], f"cuda_{fam}")
        pc, uc, _, _ = start("cpu", ["--weights", d], f"cpu_{fam}")
    except SystemExit as e:
        print(f"| {fam} | - | failed: {e} |"); continue
    gc, cc = moe_client.ExpertClient(ug), moe_client.ExpertClient(uc)
    hidden = model["hidden"]
    rng = np.random.default_rng(0)
    layers = model["moeLayers"]
    for layer in layers:
        x = rng.standard_normal((64, hidden)).astype(np.float32)
        try:
            a, b = gc.forward(layer, x), cc.forward(layer, x)
        except moe_client.ExpertError as e:
            if e.status == 400: continue  # dense layer
            raise
        err = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
        print(f"| {fam} | {layer} | {err:.2e} |")
    for p in (pg, pc): p.terminate(); p.wait()
sys.stdout.flush()

if os.environ.get("SKIP_LAT"): sys.exit(0)
print("\n## Round trip through the pipelined stream, one H200, DeepSeek-V3 layer shape (32 experts local, top-8, hidden 7168, I 2048, 1 shared)")
pg, ug, model, secs = start("cuda", ["--family", "deepseek_v3", "--weights", "synthetic:1", "--num-layers", "1",
                                     "--num-experts", "32", "--hidden", "7168", "--intermediate", "2048", "--top-k", "8",
                                     "--expert-groups", "8", "--topk-groups", "4", "--shared-experts", "1",
                                     "--max-request-rows", "4096"], "cuda_dsv3")
print(f"(ready after {secs:.1f} s)")
c = moe_client.ExpertClient(ug)
print("| rows | p50 µs | p99 µs | rows/s |")
print("|---|---|---|---|")
import torch
for rows in [1, 16, 256, 4096]:
    x = torch.randn(rows, 7168, dtype=torch.bfloat16)
    for _ in range(5): c.forward(0, x)
    n = 200 if rows < 4096 else 40
    ts = []
    for _ in range(n):
        t = time.perf_counter(); c.forward(0, x); ts.append(time.perf_counter() - t)
    ts = np.array(ts) * 1e6
    print(f"| {rows} | {np.percentile(ts,50):.0f} | {np.percentile(ts,99):.0f} | {rows/np.median(ts)*1e6:.0f} |")
pg.terminate(); pg.wait()
