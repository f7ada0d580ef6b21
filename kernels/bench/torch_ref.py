#!/usr/bin/env python3
"""PyTorch reference timings for the same shapes as `kernel-bench` (kernels/src/bin/kernel-bench.rs).

Usage: python3 torch_ref.py single | multi
Prints `RESULT torch:<section> <shape> <tokens> <metric> <value>` lines.
"""
import os
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch
import torch.nn.functional as F

TOKENS = [16, 128, 512, 2048, 8192, 16384]
SHAPES = [
    # name, hidden, inter, experts, top_k, ep, scoring
    ("dsv3", 7168, 2048, 256, 8, 8, "sigmoid"),
    ("h4096e64", 4096, 1536, 64, 8, 8, "softmax"),
]


def result(section, shape, tokens, metric, value):
    print(f"RESULT torch:{section} {shape} {tokens} {metric} {value:.3f}", flush=True)


def time_us(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    v = []
    for _ in range(5):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        e.synchronize()
        v.append(s.elapsed_time(e) * 1000.0 / reps)
    v.sort()
    return v[2]


def skewed_offsets(rows, n):
    w = [1.0 + 0.5 * (e % 4) for e in range(n)]
    s = sum(w)
    c = [int(rows * x / s) for x in w]
    c[0] += rows - sum(c)
    o = [0]
    for x in c:
        o.append(o[-1] + x)
    return o


def gating(logits, scoring, k, bias, groups=8, topk_groups=4, scale=2.5):
    t, e = logits.shape
    if scoring == "softmax":
        p = logits.softmax(-1)
        w, ids = p.topk(k, dim=-1)
        return ids, w / w.sum(-1, keepdim=True)
    scores = logits.sigmoid()
    s = scores + bias
    gs = s.view(t, groups, -1).topk(2, dim=-1)[0].sum(-1)
    gidx = gs.topk(topk_groups, dim=-1)[1]
    mask = torch.zeros_like(gs).scatter_(1, gidx, 1.0)
    smask = mask.unsqueeze(-1).expand(t, groups, e // groups).reshape(t, e)
    ids = s.masked_fill(smask == 0, float("-inf")).topk(k, dim=-1)[1]
    w = scores.gather(1, ids)
    return ids, w / (w.sum(-1, keepdim=True) + 1e-20) * scale


def route(ids, log2phy, logcnt, ns):
    t, k = ids.shape
    tok = torch.arange(t, device=ids.device).unsqueeze(1)
    rep = (tok * 2654435761 + ids) % logcnt[ids]
    phys = log2phy[ids, rep].flatten()
    counts = torch.bincount(phys, minlength=ns)
    perm = torch.argsort(phys, stable=True)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return phys, counts, perm, inv


def ffn_loop(x, offs, w1, w2, inter):
    out = torch.empty_like(x)
    for e in range(len(offs) - 1):
        a, b = offs[e], offs[e + 1]
        if b > a:
            gu = F.linear(x[a:b], w1[e])
            out[a:b] = F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], w2[e])
    return out


def ffn_grouped(x, offs_t, w1t, w2t, inter):
    gu = torch._grouped_mm(x, w1t, offs=offs_t)
    h = F.silu(gu[:, :inter]) * gu[:, inter:]
    return torch._grouped_mm(h, w2t, offs=offs_t)


def single():
    dev = torch.device("cuda")
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    t = time_us(lambda: b.copy_(a), 5)
    result("copy", "1GiB", 0, "copy_GBps", 2 * n / t / 1e3)
    del a, b
    for name, h, inter, e, k, ep, scoring in SHAPES:
        s_local = e // ep
        # same distributions as kernel-bench: x U(-1,1), router U(-0.05,0.05), bias U(-0.01,0.01)
        wg = (torch.rand(e, h, device=dev) * 0.1 - 0.05).bfloat16()
        bias = torch.rand(e, device=dev) * 0.02 - 0.01
        spr = s_local + max(s_local // 8, 1)
        ns = ep * spr
        phy2log = torch.arange(ns, device=dev) % e
        maxrep = (ns + e - 1) // e
        log2phy = torch.full((e, maxrep), -1, dtype=torch.long, device=dev)
        logcnt = torch.zeros(e, dtype=torch.long, device=dev)
        for p in range(ns):
            le = p % e
            log2phy[le, logcnt[le]] = p
            logcnt[le] += 1
        w1 = torch.rand(s_local, 2 * inter, h, device=dev, dtype=torch.bfloat16) * 0.04 - 0.02
        w2 = torch.rand(s_local, h, inter, device=dev, dtype=torch.bfloat16) * 0.04 - 0.02
        w1t = w1.transpose(-2, -1)
        w2t = w2.transpose(-2, -1)
        for T in TOKENS:
            x = (torch.rand(T, h, device=dev) * 2 - 1).bfloat16()
            result("kernel", name, T, "router_us", time_us(lambda: F.linear(x, wg).float(), 10))
            logits = F.linear(x, wg).float()
            result("kernel", name, T, "gating_us", time_us(lambda: gating(logits, scoring, k, bias), 10))
            ids, w = gating(logits, scoring, k, bias)
            result("kernel", name, T, "map_layout_us", time_us(lambda: route(ids, log2phy, logcnt, ns), 10))
            phys, counts, perm, inv = route(ids, log2phy, logcnt, ns)
            src = perm // k
            tp = time_us(lambda: x.index_select(0, src), 10)
            result("kernel", name, T, "permute_us", tp)
            result("kernel", name, T, "permute_GBps", (T + T * k) * h * 2 / tp / 1e3)
            y = x.index_select(0, src)
            wf = w.flatten()

            def comb_index_add():
                out = torch.zeros(T, h, device=dev, dtype=torch.float32)
                out.index_add_(0, src, y.float() * wf[perm].unsqueeze(1))
                return out.bfloat16()

            def comb_gather():
                return (y[inv].view(T, k, h).float() * w.unsqueeze(-1)).sum(1).bfloat16()

            tci = time_us(comb_index_add, 10)
            tcg = time_us(comb_gather, 10)
            bytes_c = (T * k * h + T * h) * 2 + T * k * 8
            result("kernel", name, T, "combine_index_add_us", tci)
            result("kernel", name, T, "combine_us", min(tci, tcg))
            result("kernel", name, T, "combine_GBps", bytes_c / min(tci, tcg) / 1e3)
            rows = T * k
            gu = torch.rand(rows, 2 * inter, device=dev, dtype=torch.bfloat16) * 8 - 4
            ts = time_us(lambda: F.silu(gu[:, :inter]) * gu[:, inter:], 10)
            result("kernel", name, T, "silu_us", ts)
            result("kernel", name, T, "silu_GBps", rows * 3 * inter * 2 / ts / 1e3)
            del gu
            offs = skewed_offsets(rows, s_local)
            offs_t = torch.tensor(offs[1:], device=dev, dtype=torch.int32)
            flops = 6.0 * rows * h * inter
            tl = time_us(lambda: ffn_loop(y, offs, w1, w2, inter), 3)
            result("ffn", name, T, "loop_us", tl)
            result("ffn", name, T, "loop_TFLOPs", flops / tl / 1e6)
            try:
                tg = time_us(lambda: ffn_grouped(y, offs_t, w1t, w2t, inter), 3)
                result("ffn", name, T, "grouped_mm_us", tg)
                result("ffn", name, T, "grouped_mm_TFLOPs", flops / tg / 1e6)
            except Exception as ex:  # noqa: BLE001
                print("grouped_mm failed:", ex, flush=True)
            del y, x
        del w1, w2, w1t, w2t
        torch.cuda.empty_cache()
    # whole layer, EP1 (all experts on this GPU)
    for name, h, inter, e, k, ep, scoring in SHAPES:
        # same distributions as kernel-bench: x U(-1,1), router U(-0.05,0.05), bias U(-0.01,0.01)
        wg = (torch.rand(e, h, device=dev) * 0.1 - 0.05).bfloat16()
        bias = torch.rand(e, device=dev) * 0.02 - 0.01
        w1 = torch.rand(e, 2 * inter, h, device=dev, dtype=torch.bfloat16) * 0.04 - 0.02
        w2 = torch.rand(e, h, inter, device=dev, dtype=torch.bfloat16) * 0.04 - 0.02
        w1t = w1.transpose(-2, -1)
        w2t = w2.transpose(-2, -1)
        log2phy = torch.arange(e, device=dev).unsqueeze(1)
        logcnt = torch.ones(e, dtype=torch.long, device=dev)
        for T in TOKENS:
            x = (torch.rand(T, h, device=dev) * 2 - 1).bfloat16()

            def layer():
                logits = F.linear(x, wg).float()
                ids, w = gating(logits, scoring, k, bias)
                phys, counts, perm, inv = route(ids, log2phy, logcnt, e)
                offs_t = torch.cumsum(counts, 0).to(torch.int32)
                y = ffn_grouped(x.index_select(0, perm // k), offs_t, w1t, w2t, inter)
                return (y[inv].view(T, k, h).float() * w.unsqueeze(-1)).sum(1).bfloat16()

            try:
                result("layer1", name, T, "layer_us", time_us(layer, 3))
            except Exception as ex:  # noqa: BLE001
                print("layer failed:", ex, flush=True)
        del w1, w2, w1t, w2t
        torch.cuda.empty_cache()


def multi_worker(rank, world, q):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(29500 + world)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    dev = torch.device("cuda", rank)
    res = []
    if world == 2:
        n = 1 << 29
        buf = torch.empty(n, dtype=torch.bfloat16, device=dev)

        def sr():
            if rank == 0:
                dist.send(buf, 1)
            else:
                dist.recv(buf, 0)

        t = time_us(sr, 5)
        if rank == 0:
            res.append(("nccl", "sendrecv", 2, "GBps", n * 2 / t / 1e3))
    h = 7168
    for tokens in [512, 4096, 16384]:
        base = tokens * 8 // world

        def cnt(r, p):
            return int(base * (0.5 + ((r * 3 + p * 5) % world) / max(world - 1, 1)))

        send_rows = [cnt(rank, p) for p in range(world)]
        recv_rows = [cnt(s, rank) for s in range(world)]
        send = torch.randn(sum(send_rows), h, device=dev, dtype=torch.bfloat16)
        recv = torch.empty(sum(recv_rows), h, device=dev, dtype=torch.bfloat16)
        t = time_us(lambda: dist.all_to_all_single(recv, send, recv_rows, send_rows), 5)
        off = sum(send_rows[p] for p in range(world) if p != rank) * h * 2
        tt = torch.tensor([t, off / t / 1e3], device=dev)
        dist.all_reduce(tt[:1], op=dist.ReduceOp.MAX)
        gb = torch.tensor([off], device=dev, dtype=torch.float64)
        dist.all_reduce(gb, op=dist.ReduceOp.MAX)
        if rank == 0:
            res.append(("a2a", f"G{world}", tokens, "us", tt[0].item()))
            res.append(("a2a", f"G{world}", tokens, "GBps_per_rank", gb.item() / tt[0].item() / 1e3))
    if rank == 0:
        q.put(res)
    dist.barrier()
    dist.destroy_process_group()


def multi():
    import torch.multiprocessing as mp

    n = torch.cuda.device_count()
    for world in [2, 4]:
        if world > n:
            continue
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        mp.spawn(multi_worker, args=(world, q), nprocs=world, join=True)
        for r in q.get():
            result(*r)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "single"
    single() if mode == "single" else multi()
