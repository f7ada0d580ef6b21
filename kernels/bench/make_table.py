#!/usr/bin/env python3
"""Builds the markdown tables of docs/benchmarks/kernels.md from the RESULT lines that
kernel-bench and torch_ref.py printed (kernels/bench/results/*.txt)."""
import sys
from collections import defaultdict

R = defaultdict(dict)  # (section, shape, tokens) -> metric -> value


def load(path):
    for line in open(path):
        p = line.split()
        if len(p) == 6 and p[0] == "RESULT":
            R[(p[1], p[2], int(p[3]))][p[4]] = float(p[5])


def g(sec, shape, t, m):
    return R.get((sec, shape, t), {}).get(m)


def f(v, d=0):
    return "-" if v is None else f"{v:,.{d}f}"


def single(out):
    copy = g("copy", "1GiB", 0, "memcpy_GBps")
    copyk = g("copy", "1GiB", 0, "kernel_GBps")
    tcopy = g("torch:copy", "1GiB", 0, "copy_GBps")
    out.append(f"Copy bandwidth (1 GiB, read + write): cuMemcpyDtoD {f(copy)} GB/s, our copy kernel {f(copyk)} GB/s, "
               f"torch `copy_` {f(tcopy)} GB/s. Percentages below are of cuMemcpyDtoD.\n")
    for shape in ["dsv3", "h4096e64"]:
        out.append(f"\n#### Routing and memory-bound kernels, `{shape}` (us; ours / torch)\n")
        out.append("| tokens | router | gating | map + layout | permute | permute GB/s (% copy) | combine | combine GB/s (% copy) | silu*mul | silu GB/s (% copy) |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in sorted({k[2] for k in R if k[0] == "kernel" and k[1] == shape}):
            row = [str(t)]
            for m in ["router_us", "gating_us", "map_layout_us", "permute_us"]:
                row.append(f"{f(g('kernel', shape, t, m), 1)} / {f(g('torch:kernel', shape, t, m), 1)}")
            pg = g("kernel", shape, t, "permute_GBps")
            row.append(f"{f(pg)} ({f(100 * pg / copy)}%) / {f(g('torch:kernel', shape, t, 'permute_GBps'))}")
            row.append(f"{f(g('kernel', shape, t, 'combine_us'), 1)} / {f(g('torch:kernel', shape, t, 'combine_us'), 1)}")
            cg = g("kernel", shape, t, "combine_GBps")
            row.append(f"{f(cg)} ({f(100 * cg / copy)}%) / {f(g('torch:kernel', shape, t, 'combine_GBps'))}")
            row.append(f"{f(g('kernel', shape, t, 'silu_us'), 1)} / {f(g('torch:kernel', shape, t, 'silu_us'), 1)}")
            sg = g("kernel", shape, t, "silu_GBps")
            row.append(f"{f(sg)} ({f(100 * sg / copy)}%) / {f(g('torch:kernel', shape, t, 'silu_GBps'))}")
            out.append("| " + " | ".join(row) + " |")
    for shape, experts in [("dsv3", 32), ("h4096e64", 8)]:
        out.append(f"\n#### Expert FFN, `{shape}`: one EP8 rank, {experts} local experts, tokens x 8 rows, skewed split (us / TFLOP/s)\n")
        out.append("| tokens | rows | ours: loop (4 streams) | serial loop | cuBLAS grouped | **auto** | torch: F.linear loop | torch._grouped_mm | auto / grouped_mm | auto / best loop |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in sorted({k[2] for k in R if k[0] == "ffn" and k[1] == shape}):
            def c(sec, m):
                us, tf = g(sec, shape, t, m + "_us"), g(sec, shape, t, m + "_TFLOPs")
                return f"{f(us)} / {f(tf)}"
            auto = g("ffn", shape, t, "auto_us")
            gm = g("torch:ffn", shape, t, "grouped_mm_us")
            best = min(x for x in [g("ffn", shape, t, "loop_us"), g("ffn", shape, t, "serial_loop_us")] if x)
            out.append(f"| {t} | {t * 8} | {c('ffn', 'loop')} | {c('ffn', 'serial_loop')} | {c('ffn', 'grouped')} | **{c('ffn', 'auto')}** | "
                       f"{c('torch:ffn', 'loop')} | {c('torch:ffn', 'grouped_mm')} | {f(auto / gm, 2) if gm else '-'} | {f(auto / best, 2)} |")
    out.append("\n#### Loop vs grouped crossover (uniform rows per expert, us)\n")
    out.append("| rows/expert | dsv3 loop | dsv3 grouped | h4096e64 loop | h4096e64 grouped |")
    out.append("|---:|---:|---:|---:|---:|")
    for per in sorted({k[2] for k in R if k[0] == "crossover"}):
        out.append(f"| {per} | {f(g('crossover', 'dsv3', per, 'loop_us'))} | {f(g('crossover', 'dsv3', per, 'grouped_us'))} | "
                   f"{f(g('crossover', 'h4096e64', per, 'loop_us'))} | {f(g('crossover', 'h4096e64', per, 'grouped_us'))} |")
    out.append("\n#### Whole layer on one GPU (EP1: all experts local; router, gating, replica choice + load, layout, permute, FFN auto, combine), us\n")
    out.append("| tokens | dsv3 ours | dsv3 torch | h4096e64 ours | h4096e64 torch |")
    out.append("|---:|---:|---:|---:|---:|")
    for t in sorted({k[2] for k in R if k[0] == "layer1"}):
        out.append(f"| {t} | {f(g('layer1', 'dsv3', t, 'layer_us'))} | {f(g('torch:layer1', 'dsv3', t, 'layer_us'))} | "
                   f"{f(g('layer1', 'h4096e64', t, 'layer_us'))} | {f(g('torch:layer1', 'h4096e64', t, 'layer_us'))} |")


def multi(out):
    sr = g("nccl", "sendrecv", 2, "GBps")
    out.append(f"NCCL send/recv GPU0 -> GPU1, 1 GiB: ours {f(sr)} GB/s, torch.distributed {f(g('torch:nccl', 'sendrecv', 2, 'GBps'))} GB/s "
               "(the reference for the percentages below).\n")
    out.append("#### Uneven all-to-all (hidden 7168 bf16 rows, tokens x 8 rows per rank split 0.5x..1.5x over peers)\n")
    out.append("| ranks | tokens/rank | ours us | ours GB/s per rank (% send/recv) | torch all_to_all_single us | torch GB/s per rank |")
    out.append("|---:|---:|---:|---:|---:|---:|")
    for gname in ["G2", "G4"]:
        for t in sorted({k[2] for k in R if k[0] == "a2a" and k[1] == gname}):
            b = g("a2a", gname, t, "GBps_per_rank")
            out.append(f"| {gname[1:]} | {t} | {f(g('a2a', gname, t, 'us'))} | {f(b)} ({f(100 * b / sr)}%) | "
                       f"{f(g('torch:a2a', gname, t, 'us'))} | {f(g('torch:a2a', gname, t, 'GBps_per_rank'))} |")
    out.append("\n#### Expert weight movement (one DeepSeek-V3 expert, 88 MB bf16, GPU0 -> GPU1 staging buffer)\n")
    out.append("| method | GB/s | % of NCCL send/recv |")
    out.append("|---|---:|---:|")
    for name, label in [("peer_copy_no_access", "peer copy, pool access not granted"), ("peer_copy", "peer copy after `enable_peer_access` (cuMemPoolSetAccess)"),
                        ("nccl_sendrecv_slot", "NCCL send/recv on side-stream communicators")]:
        v = g("weights", name, 1, "GBps")
        out.append(f"| {label} | {f(v)} | {f(100 * v / sr)}% |")
    v88 = g("nccl", "sendrecv_88MB", 2, "GBps")
    out.append(f"| plain NCCL send/recv of an 88 MB buffer (reference at this size) | {f(v88)} | {f(100 * v88 / sr) if v88 else '-'}% |")
    out.append(f"| staging -> slot commit on the destination (us) | {f(g('weights', 'commit_staging', 1, 'us'))} us | |")
    out.append("\n#### Whole layer on several GPUs (dsv3 shape, 256 experts over G ranks, identity placement), us per layer (slowest rank)\n")
    out.append("| ranks | tokens/rank | us |")
    out.append("|---:|---:|---:|")
    for gname in ["dsv3_G2", "dsv3_G4"]:
        for t in sorted({k[2] for k in R if k[0] == "layerG" and k[1] == gname}):
            out.append(f"| {gname[-1]} | {t} | {f(g('layerG', gname, t, 'layer_us'))} |")


if __name__ == "__main__":
    mode = sys.argv[1]
    for p in sys.argv[2:]:
        load(p)
    out = []
    single(out) if mode == "single" else multi(out)
    print("\n".join(out))
