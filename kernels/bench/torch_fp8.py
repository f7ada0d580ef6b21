"""PyTorch reference for the FP8 expert FFN benchmark (kernels/src/bin/fp8-bench.rs): the same
DeepSeek-V3 expert shapes (hidden 7168, intermediate 2048, 32 experts, 4096-16384 rows), a
loop over experts of bf16 F.linear and of torch._scaled_mm with DeepSeek's blockwise scales
(activations 1x128, quantised per call with torch ops; weights 128x128). Prints RESULT lines."""
import torch
import torch.nn.functional as F

torch.manual_seed(0)
dev = "cuda"
S, H, I = 32, 7168, 2048
E4 = torch.float8_e4m3fn


def bench(f, reps=5):
    for _ in range(2):
        f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            f()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000 / reps)
    ts.sort()
    return ts[2]


def quant_1x128(x):
    m, k = x.shape
    xb = x.float().view(m, k // 128, 128)
    s = xb.abs().amax(-1).clamp(min=1e-30) / 448.0
    q = (xb / s[..., None]).to(E4).view(m, k)
    return q, s


def weight_fp8(n, k):
    w = (torch.rand(n, k, device=dev) * 2 - 1) * 0.02
    wb = w.view(n // 128, 128, k // 128, 128)
    s = wb.abs().amax(dim=(1, 3)) / 448.0
    q = (wb / s[:, None, :, None]).to(E4).view(n, k)
    return q, s


w1 = [weight_fp8(2 * I, H) for _ in range(S)]
w2 = [weight_fp8(H, I) for _ in range(S)]
w1b = [(q.float().view(2 * I // 128, 128, H // 128, 128) * s[:, None, :, None]).view(2 * I, H).bfloat16() for q, s in w1]
w2b = [(q.float().view(H // 128, 128, I // 128, 128) * s[:, None, :, None]).view(H, I).bfloat16() for q, s in w2]


def scaled(xq, xs, wq, ws):
    # x [M, K] with scales [M, K/128] outer-dim-major; w^T [K, N] with scales [K/128, N/128]
    return torch._scaled_mm(xq, wq.t(), scale_a=xs.t().contiguous().t(), scale_b=ws.t(), out_dtype=torch.bfloat16)


for R in (4096, 8192, 16384):
    counts = torch.bincount(torch.randint(0, S, (R,)), minlength=S).tolist()
    # cuBLAS wants the 1x128 scales' row count a multiple of 4: pad each expert's rows
    x = torch.rand(R, H, device=dev).mul(2).sub(1).bfloat16()
    parts = list(torch.split(x, counts))
    flop = 2 * R * (2 * I * H + H * I)

    def ffn_bf16():
        for e, xe in enumerate(parts):
            if xe.shape[0] == 0:
                continue
            gu = F.linear(xe, w1b[e])
            h = F.silu(gu[:, :I]) * gu[:, I:]
            F.linear(h, w2b[e])

    def ffn_fp8():
        for e, xe in enumerate(parts):
            m = xe.shape[0]
            if m == 0:
                continue
            mp = (m + 3) // 4 * 4
            xp = F.pad(xe, (0, 0, 0, mp - m)) if mp != m else xe
            q, s = quant_1x128(xp)
            gu = scaled(q, s, *w1[e])
            h = (F.silu(gu[:, :I]) * gu[:, I:])
            q2, s2 = quant_1x128(h)
            scaled(q2, s2, *w2[e])[:m]

    tb = bench(ffn_bf16)
    print(f"RESULT fp8_torch dsv3_32experts {R} bf16_loop_us {tb:.1f}")
    print(f"RESULT fp8_torch dsv3_32experts {R} bf16_tflops {flop / tb / 1e6:.1f}")
    try:
        t8 = bench(ffn_fp8)
        print(f"RESULT fp8_torch dsv3_32experts {R} fp8_blockwise_us {t8:.1f}")
        print(f"RESULT fp8_torch dsv3_32experts {R} fp8_blockwise_tflops {flop / t8 / 1e6:.1f}")
    except Exception as ex:  # an older torch without blockwise _scaled_mm
        print(f"RESULT fp8_torch dsv3_32experts {R} fp8_blockwise_unavailable 0  # {type(ex).__name__}: {str(ex)[:200]}")
        break
print("torch", torch.__version__, torch.version.cuda, torch.cuda.get_device_name())
