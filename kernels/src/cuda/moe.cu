// CUDA kernels of the expert-parallel MoE layer. Compiled at run time with NVRTC
// (see src/cuda/mod.rs). bf16 values travel as raw 16-bit words and are converted by hand
// (round to nearest even), so no CUDA header is needed and the rounding matches the CPU
// reference (`half::bf16::from_f32`) bit for bit.

typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ float bf2f(u16 v) { return __uint_as_float(((u32)v) << 16); }

__device__ __forceinline__ u16 f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u); // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

// The replica hash; identical to `moe_kernels::replica_hash` (src/routing.rs).
__device__ __forceinline__ u32 moe_replica_hash(u32 token, u32 expert) {
    u32 h = (token * 0x9E3779B1u) ^ (expert * 0x85EBCA77u);
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    h ^= h >> 16;
    return h;
}

// a ranks before b: larger value first, ties to the lower index, NaN as -inf.
__device__ __forceinline__ bool better(float va, int ia, float vb, int ib) {
    if (va != va) va = -__int_as_float(0x7f800000);
    if (vb != vb) vb = -__int_as_float(0x7f800000);
    return va > vb || (va == vb && ia < ib);
}

// ---------------------------------------------------------------------------------------
// Gating: one warp per token. Dynamic shared memory per warp: choice[E], score[E],
// gscore[G] floats and masked[E] bytes.
// scoring: 0 softmax, 1 sigmoid, 2 softmax over the chosen top-k logits (gpt-oss).
// lbias (optional) is added to the logits first (gpt-oss's router bias); bias (optional) to
// the scores for the choice only (DeepSeek-V3's correction bias). group_max: a group scores
// its largest choice (DeepSeek-V2) instead of the sum of its two largest (V3).
extern "C" __global__ void moe_gating(const float* __restrict__ logits, const float* __restrict__ lbias,
                                      const float* __restrict__ bias, int T, int E, int K, int scoring,
                                      int renorm, int G, int topk_groups, int group_max, float scale,
                                      u32* __restrict__ ids, float* __restrict__ weights) {
    extern __shared__ float smem[];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int wpb = blockDim.x >> 5;
    const int stride_f = 2 * E + G + (E + 3) / 4;
    float* choice = smem + warp * stride_f;
    float* score = choice + E;
    float* gscore = score + E;
    unsigned char* masked = (unsigned char*)(gscore + G);
    const float NEG_INF = -__int_as_float(0x7f800000);

    for (int t = blockIdx.x * wpb + warp; t < T; t += gridDim.x * wpb) {
        const float* l = logits + (size_t)t * E;
#define LOGIT(i) (lbias ? l[i] + lbias[i] : l[i])
        if (scoring == 2) {
            for (int i = lane; i < E; i += 32) {
                float v = LOGIT(i);
                score[i] = v;
                choice[i] = bias ? v + bias[i] : v;
                masked[i] = 0;
            }
        } else if (scoring == 1) {
            for (int i = lane; i < E; i += 32) {
                float v = LOGIT(i);
                float s = 1.0f / (1.0f + expf(-v));
                score[i] = s;
                choice[i] = bias ? s + bias[i] : s;
                masked[i] = 0;
            }
        } else {
            float m = NEG_INF;
            for (int i = lane; i < E; i += 32) m = fmaxf(m, LOGIT(i));
            for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
            float s = 0.f;
            for (int i = lane; i < E; i += 32) {
                float e = expf(LOGIT(i) - m);
                score[i] = e;
                s += e;
            }
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            for (int i = lane; i < E; i += 32) {
                float p = score[i] / s;
                score[i] = p;
                choice[i] = bias ? p + bias[i] : LOGIT(i);
                masked[i] = 0;
            }
        }
#undef LOGIT
        __syncwarp();
        if (G > 1) {
            const int per = E / G;
            for (int g = lane; g < G; g += 32) {
                const float* grp = choice + g * per;
                int b1 = 0;
                for (int i = 1; i < per; ++i)
                    if (better(grp[i], i, grp[b1], b1)) b1 = i;
                float v;
                if (per == 1 || group_max) {
                    v = grp[b1];
                } else {
                    int b2 = -1;
                    for (int i = 0; i < per; ++i)
                        if (i != b1 && (b2 < 0 || better(grp[i], i, grp[b2], b2))) b2 = i;
                    v = grp[b1] + grp[b2];
                }
                gscore[g] = v;
            }
            __syncwarp();
            if (lane == 0) {
                // selected groups are marked by setting gscore to NaN after picking
                unsigned char* keep = masked; // reuse: masked[g] as group keep flags first
                for (int g = 0; g < G; ++g) keep[g] = 0;
                for (int r = 0; r < topk_groups; ++r) {
                    int best = -1;
                    for (int g = 0; g < G; ++g)
                        if (!keep[g] && (best < 0 || better(gscore[g], g, gscore[best], best))) best = g;
                    keep[best] = 1;
                }
                // store keep flags in gscore as 1/0 before masked[] is rewritten
                for (int g = 0; g < G; ++g) gscore[g] = keep[g] ? 1.f : 0.f;
            }
            __syncwarp();
            for (int i = lane; i < E; i += 32) masked[i] = gscore[i / per] == 0.f;
            __syncwarp();
        }
        float wsum = 0.f;
        float myw = 0.f;
        int myid = 0;
        for (int j = 0; j < K; ++j) {
            float bv = NEG_INF;
            int bi = -1;
            for (int i = lane; i < E; i += 32) {
                if (!masked[i] && (bi < 0 || better(choice[i], i, bv, bi))) {
                    bv = choice[i];
                    bi = i;
                }
            }
            for (int o = 16; o > 0; o >>= 1) {
                float ov = __shfl_xor_sync(0xffffffffu, bv, o);
                int oi = __shfl_xor_sync(0xffffffffu, bi, o);
                if (oi >= 0 && (bi < 0 || better(ov, oi, bv, bi))) {
                    bv = ov;
                    bi = oi;
                }
            }
            __syncwarp();
            if (lane == 0) masked[bi] = 1;
            float s = score[bi];
            wsum += s;
            if (lane == j) {
                myw = s;
                myid = bi;
            }
            __syncwarp();
        }
        if (scoring == 2) {
            // softmax over the k chosen logits (lanes >= K hold nothing)
            float m = lane < K ? myw : NEG_INF;
            for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
            float e = lane < K ? expf(myw - m) : 0.f;
            float z = e;
            for (int o = 16; o > 0; o >>= 1) z += __shfl_xor_sync(0xffffffffu, z, o);
            myw = e / z;
        }
        if (lane < K) {
            float w = myw;
            if (renorm) w = w / (wsum + 1e-20f);
            if (scale != 1.0f) w = w * scale;
            ids[(size_t)t * K + lane] = (u32)myid;
            weights[(size_t)t * K + lane] = w;
        }
        __syncwarp();
    }
}

// ---------------------------------------------------------------------------------------
// Logical -> physical replica choice fused with load counting. One thread per (t, j).
extern "C" __global__ void moe_map_physical(const u32* __restrict__ ids, int n, int K, u32 token_base,
                                            const int* __restrict__ log2phy, const u32* __restrict__ logcnt,
                                            int num_logical, int max_rep, u32* __restrict__ phys,
                                            u32* __restrict__ load) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u32 e = ids[i];
    if (e >= (u32)num_logical) {
        phys[i] = 0xffffffffu;
        return;
    }
    u32 t = token_base + (u32)(i / K);
    u32 r = moe_replica_hash(t, e) % logcnt[e];
    u32 p = (u32)log2phy[e * max_rep + r];
    phys[i] = p;
    atomicAdd(load + p, 1u);
}

// ---------------------------------------------------------------------------------------
// Dispatch layout (stable counting sort by physical slot).
// Pass 1: per chunk of LAYOUT_CHUNK rows, each row's rank among equal slots in its chunk,
// and the chunk's per-slot histogram (row `chunk` of `hist`, fully written).
#define LAYOUT_CHUNK 256
extern "C" __global__ void moe_layout_count(const u32* __restrict__ phys, int n, int ns,
                                            u32* __restrict__ local_rank, u32* __restrict__ hist) {
    __shared__ u32 s[LAYOUT_CHUNK];
    const int tid = threadIdx.x;
    const int i = blockIdx.x * LAYOUT_CHUNK + tid;
    u32* h = hist + (size_t)blockIdx.x * ns;
    for (int c = tid; c < ns; c += LAYOUT_CHUNK) h[c] = 0;
    u32 p = i < n ? phys[i] : 0xffffffffu;
    s[tid] = p;
    __syncthreads();
    if (i < n) {
        u32 before = 0, total = 0;
        for (int j = 0; j < LAYOUT_CHUNK; ++j) {
            u32 eq = s[j] == p;
            total += eq;
            before += (j < tid) ? eq : 0u;
        }
        local_rank[i] = before;
        if (before + 1 == total && p < (u32)ns) h[p] = total;
    }
}

// Pass 2: one block per slot: exclusive scan of the slot's column over chunks; the total
// goes to rows_per_slot.
extern "C" __global__ void moe_layout_colscan(u32* __restrict__ hist, int nchunks, int ns,
                                              u32* __restrict__ rows_per_slot) {
    __shared__ u32 part[256];
    const int s = blockIdx.x;
    const int tid = threadIdx.x;
    const int per = (nchunks + 255) / 256;
    const int c0 = tid * per;
    u32 sum = 0;
    for (int c = c0; c < c0 + per && c < nchunks; ++c) sum += hist[(size_t)c * ns + s];
    part[tid] = sum;
    __syncthreads();
    for (int o = 1; o < 256; o <<= 1) {
        u32 v = tid >= o ? part[tid - o] : 0u;
        __syncthreads();
        part[tid] += v;
        __syncthreads();
    }
    u32 run = part[tid] - sum; // exclusive prefix of this thread's range
    for (int c = c0; c < c0 + per && c < nchunks; ++c) {
        u32 v = hist[(size_t)c * ns + s];
        hist[(size_t)c * ns + s] = run;
        run += v;
    }
    if (tid == 255) rows_per_slot[s] = part[255];
}

// Pass 3: one block: slot offsets (exclusive scan, ns + 1 entries) and rows per rank.
extern "C" __global__ void moe_layout_slotscan(const u32* __restrict__ rows_per_slot, int ns, int spr,
                                               u32* __restrict__ slot_offsets, u32* __restrict__ rows_per_rank) {
    __shared__ u32 part[1024];
    const int tid = threadIdx.x;
    const int per = (ns + 1023) / 1024;
    const int c0 = tid * per;
    u32 sum = 0;
    for (int c = c0; c < c0 + per && c < ns; ++c) sum += rows_per_slot[c];
    part[tid] = sum;
    __syncthreads();
    for (int o = 1; o < 1024; o <<= 1) {
        u32 v = tid >= o ? part[tid - o] : 0u;
        __syncthreads();
        part[tid] += v;
        __syncthreads();
    }
    u32 run = part[tid] - sum;
    for (int c = c0; c < c0 + per && c < ns; ++c) {
        slot_offsets[c] = run;
        run += rows_per_slot[c];
    }
    if (tid == 1023) slot_offsets[ns] = part[1023];
    __syncthreads();
    const int nr = ns / spr;
    for (int r = tid; r < nr; r += 1024) rows_per_rank[r] = slot_offsets[(r + 1) * spr] - slot_offsets[r * spr];
}

// Pass 4: scatter: perm[row] = flat, inv[flat] = row.
extern "C" __global__ void moe_layout_scatter(const u32* __restrict__ phys, int n, int ns,
                                              const u32* __restrict__ local_rank, const u32* __restrict__ hist,
                                              const u32* __restrict__ slot_offsets, u32* __restrict__ perm,
                                              u32* __restrict__ inv) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    u32 p = phys[i];
    if (p >= (u32)ns) return;
    u32 chunk = (u32)i / LAYOUT_CHUNK;
    u32 row = slot_offsets[p] + hist[(size_t)chunk * ns + p] + local_rank[i];
    perm[row] = (u32)i;
    inv[i] = row;
}

// Whole layout in one block for small batches (n <= 1024 rows): counts, scans, stable ranks,
// scatter and tokens per rank in shared memory. Dynamic shared memory: (ns + nr) u32.
extern "C" __global__ void moe_layout_small(const u32* __restrict__ phys, int n, int T, int K, int ns, int spr,
                                            int nr, u32* __restrict__ rows_per_slot, u32* __restrict__ slot_offsets,
                                            u32* __restrict__ rows_per_rank, u32* __restrict__ tokens_per_rank,
                                            u32* __restrict__ perm, u32* __restrict__ inv) {
    extern __shared__ u32 dyn[];
    u32* cnt = dyn;       // [ns]: counts, then exclusive offsets
    u32* tpr = dyn + ns;  // [nr]
    __shared__ u32 sp[1024];
    __shared__ u32 part[1024];
    const int tid = threadIdx.x;
    for (int c = tid; c < ns; c += 1024) cnt[c] = 0;
    for (int r = tid; r < nr; r += 1024) tpr[r] = 0;
    const u32 p = tid < n ? phys[tid] : 0xffffffffu;
    sp[tid] = p;
    __syncthreads();
    if (p < (u32)ns) atomicAdd(cnt + p, 1u);
    if (tid < T) {
        for (int j = 0; j < K; ++j) {
            const u32 r = sp[tid * K + j] / (u32)spr;
            if (r >= (u32)nr) continue;
            bool seen = false;
            for (int q = 0; q < j; ++q) seen |= (sp[tid * K + q] / (u32)spr) == r;
            if (!seen) atomicAdd(tpr + r, 1u);
        }
    }
    __syncthreads();
    // exclusive scan of cnt (each thread a contiguous range, then a scan of the partials)
    const int per = (ns + 1023) / 1024;
    const int c0 = tid * per;
    u32 sum = 0;
    for (int c = c0; c < c0 + per && c < ns; ++c) {
        rows_per_slot[c] = cnt[c];
        sum += cnt[c];
    }
    part[tid] = sum;
    __syncthreads();
    for (int o = 1; o < 1024; o <<= 1) {
        u32 v = tid >= o ? part[tid - o] : 0u;
        __syncthreads();
        part[tid] += v;
        __syncthreads();
    }
    u32 run = part[tid] - sum;
    for (int c = c0; c < c0 + per && c < ns; ++c) {
        const u32 v = cnt[c];
        cnt[c] = run;
        slot_offsets[c] = run;
        run += v;
    }
    if (tid == 1023) slot_offsets[ns] = part[1023];
    for (int r = tid; r < nr; r += 1024) tokens_per_rank[r] = tpr[r];
    __syncthreads();
    for (int r = tid; r < nr; r += 1024) {
        const u32 hi = (r + 1) * spr < ns ? cnt[(r + 1) * spr] : part[1023];
        rows_per_rank[r] = hi - cnt[r * spr];
    }
    if (p < (u32)ns) {
        u32 before = 0;
        for (int j = 0; j < tid; ++j) before += sp[j] == p;
        const u32 row = cnt[p] + before;
        perm[row] = (u32)tid;
        inv[tid] = row;
    }
}

// Distinct tokens per destination rank: one thread per token.
extern "C" __global__ void moe_tokens_per_rank(const u32* __restrict__ phys, int T, int K, int spr, int nr,
                                               u32* __restrict__ tokens_per_rank) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const u32* p = phys + (size_t)t * K;
    for (int j = 0; j < K; ++j) {
        u32 r = p[j] / (u32)spr;
        if (r >= (u32)nr) continue;
        bool seen = false;
        for (int q = 0; q < j; ++q) seen |= (p[q] / (u32)spr) == r;
        if (!seen) atomicAdd(tokens_per_rank + r, 1u);
    }
}

// ---------------------------------------------------------------------------------------
// Row gather: out[r] = x[idx[r] / div]. `hv` = row length in 16-byte vectors (8 bf16).
extern "C" __global__ void moe_gather_rows_v8(const uint4* __restrict__ x, const u32* __restrict__ idx, int div,
                                              int rows, int hv, uint4* __restrict__ out) {
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const uint4* src = x + (size_t)(idx[r] / (u32)div) * hv;
        uint4* dst = out + (size_t)r * hv;
        for (int c = threadIdx.x; c < hv; c += blockDim.x) dst[c] = src[c];
    }
}

// Permute by scatter: each token row is read once and written to its K send rows
// (out[inv[t*K+j]] = x[t]); reads T*H, writes T*K*H values (a gather reads x K times).
extern "C" __global__ void moe_scatter_rows_v8(const uint4* __restrict__ x, const u32* __restrict__ inv, int T,
                                               int K, int hv, uint4* __restrict__ out) {
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        const u32* it = inv + (size_t)t * K;
        for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < hv; c += gridDim.y * blockDim.x) {
            const uint4 v = x[(size_t)t * hv + c];
            for (int j = 0; j < K; ++j) out[(size_t)it[j] * hv + c] = v;
        }
    }
}

// Scalar fallback for rows whose length is not a multiple of 8 elements.
extern "C" __global__ void moe_gather_rows_s(const u16* __restrict__ x, const u32* __restrict__ idx, int div,
                                             int rows, int h, u16* __restrict__ out) {
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const u16* src = x + (size_t)(idx[r] / (u32)div) * h;
        u16* dst = out + (size_t)r * h;
        for (int c = threadIdx.x; c < h; c += blockDim.x) dst[c] = src[c];
    }
}

// ---------------------------------------------------------------------------------------
// Unpermute + weighted combine: out[t] = bf16(sum_j w[t,j] * y[inv[t*K+j]]) (fma chain in j order).
// Grid: x over tokens, y over column chunks (so that few tokens still fill the GPU).
// Rows are loaded four at a time before their fmas (more loads in flight); the fma order
// stays j = 0, 1, ..., K-1.
__device__ __forceinline__ void fma8(float* acc, float w, uint4 v) {
    const u32 vv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        acc[2 * q] = fmaf(w, __uint_as_float(vv[q] << 16), acc[2 * q]);
        acc[2 * q + 1] = fmaf(w, __uint_as_float(vv[q] & 0xffff0000u), acc[2 * q + 1]);
    }
}

// With `shared` (the shared experts' output [T, H], optional) the fp32 sum gets
// `g[t] * shared[t]` as a last fma before the single rounding, where g is `sgate[t]`
// (Qwen2-MoE's sigmoid gate, optional) or 1.
__device__ __forceinline__ void shared8(float* acc, const uint4* __restrict__ shared,
                                        const float* __restrict__ sgate, int t, size_t at) {
    if (shared) fma8(acc, sgate ? sgate[t] : 1.0f, shared[at]);
}

extern "C" __global__ void moe_combine_v8(const uint4* __restrict__ y, const u32* __restrict__ inv,
                                          const float* __restrict__ w, int T, int K, int hv,
                                          const uint4* __restrict__ shared, const float* __restrict__ sgate,
                                          uint4* __restrict__ out) {
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        const u32* it = inv + (size_t)t * K;
        const float* wt = w + (size_t)t * K;
        for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < hv; c += gridDim.y * blockDim.x) {
            float acc[8];
#pragma unroll
            for (int q = 0; q < 8; ++q) acc[q] = 0.f;
            int j = 0;
            for (; j + 4 <= K; j += 4) {
                const uint4 v0 = y[(size_t)it[j] * hv + c];
                const uint4 v1 = y[(size_t)it[j + 1] * hv + c];
                const uint4 v2 = y[(size_t)it[j + 2] * hv + c];
                const uint4 v3 = y[(size_t)it[j + 3] * hv + c];
                fma8(acc, wt[j], v0);
                fma8(acc, wt[j + 1], v1);
                fma8(acc, wt[j + 2], v2);
                fma8(acc, wt[j + 3], v3);
            }
            for (; j < K; ++j) fma8(acc, wt[j], y[(size_t)it[j] * hv + c]);
            shared8(acc, shared, sgate, t, (size_t)t * hv + c);
            uint4 o;
            o.x = (u32)f2bf(acc[0]) | ((u32)f2bf(acc[1]) << 16);
            o.y = (u32)f2bf(acc[2]) | ((u32)f2bf(acc[3]) << 16);
            o.z = (u32)f2bf(acc[4]) | ((u32)f2bf(acc[5]) << 16);
            o.w = (u32)f2bf(acc[6]) | ((u32)f2bf(acc[7]) << 16);
            out[(size_t)t * hv + c] = o;
        }
    }
}

extern "C" __global__ void moe_combine_s(const u16* __restrict__ y, const u32* __restrict__ inv,
                                         const float* __restrict__ w, int T, int K, int h,
                                         const u16* __restrict__ shared, const float* __restrict__ sgate,
                                         u16* __restrict__ out) {
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        for (int c = threadIdx.x; c < h; c += blockDim.x) {
            float acc = 0.f;
            for (int j = 0; j < K; ++j)
                acc = fmaf(w[(size_t)t * K + j], bf2f(y[(size_t)inv[(size_t)t * K + j] * h + c]), acc);
            if (shared) acc = fmaf(sgate ? sgate[t] : 1.0f, bf2f(shared[(size_t)t * h + c]), acc);
            out[(size_t)t * h + c] = f2bf(acc);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Fused SiLU-and-multiply: gate_up [n, 2I] -> h [n, I], h = bf16(silu(g) * u).
__device__ __forceinline__ float silu_mul(float g, float u) { return (g / (1.0f + expf(-g))) * u; }

extern "C" __global__ void moe_silu_mul_v8(const uint4* __restrict__ gu, int n, int iv, uint4* __restrict__ h) {
    const size_t total = (size_t)n * iv;
    for (size_t v = (size_t)blockIdx.x * blockDim.x + threadIdx.x; v < total; v += (size_t)gridDim.x * blockDim.x) {
        const size_t r = v / iv, c = v % iv;
        const uint4 g = gu[r * 2 * iv + c];
        const uint4 u = gu[r * 2 * iv + iv + c];
        const u32 gg[4] = {g.x, g.y, g.z, g.w};
        const u32 uu[4] = {u.x, u.y, u.z, u.w};
        u32 o[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            float lo = silu_mul(__uint_as_float(gg[q] << 16), __uint_as_float(uu[q] << 16));
            float hi = silu_mul(__uint_as_float(gg[q] & 0xffff0000u), __uint_as_float(uu[q] & 0xffff0000u));
            o[q] = (u32)f2bf(lo) | ((u32)f2bf(hi) << 16);
        }
        h[v] = make_uint4(o[0], o[1], o[2], o[3]);
    }
}

extern "C" __global__ void moe_silu_mul_s(const u16* __restrict__ gu, int n, int I, u16* __restrict__ h) {
    const size_t total = (size_t)n * I;
    for (size_t v = (size_t)blockIdx.x * blockDim.x + threadIdx.x; v < total; v += (size_t)gridDim.x * blockDim.x) {
        const size_t r = v / I, c = v % I;
        h[v] = f2bf(silu_mul(bf2f(gu[r * 2 * I + c]), bf2f(gu[r * 2 * I + I + c])));
    }
}

// Plain device copy (16-byte vectors), used to measure the copy bandwidth ceiling.
extern "C" __global__ void moe_copy_v8(const uint4* __restrict__ src, size_t n, uint4* __restrict__ dst) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = src[i];
}

// Seeded uniform bf16 fill in [-scale, scale) (benchmark weights generated on the device).
extern "C" __global__ void moe_fill_uniform(u16* __restrict__ out, size_t n, u32 seed, float scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        u32 h = moe_replica_hash((u32)i ^ (u32)(i >> 32) * 0x27d4eb2du, seed);
        float u = (float)(h >> 8) * (1.0f / 16777216.0f);
        out[i] = f2bf((2.0f * u - 1.0f) * scale);
    }
}


// ---------------------------------------------------------------------------------------
// Qwen2-MoE's shared-expert gate: g[t] = sigmoid(sum_c x[t,c] * w[c]) (fp32), one warp per token.
extern "C" __global__ void moe_shared_gate(const u16* __restrict__ x, const float* __restrict__ w, int T, int H,
                                           float* __restrict__ g) {
    const int lane = threadIdx.x & 31;
    const int wpb = blockDim.x >> 5;
    for (int t = blockIdx.x * wpb + (threadIdx.x >> 5); t < T; t += gridDim.x * wpb) {
        float z = 0.f;
        for (int c = lane; c < H; c += 32) z = fmaf(bf2f(x[(size_t)t * H + c]), w[c], z);
        for (int o = 16; o > 0; o >>= 1) z += __shfl_xor_sync(0xffffffffu, z, o);
        if (lane == 0) g[t] = 1.0f / (1.0f + expf(-z));
    }
}

// bf16 -> f32 (the fp32-router logits GEMM takes fp32 activations).
extern "C" __global__ void moe_bf16_to_f32(const u16* __restrict__ x, size_t n, float* __restrict__ out) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = bf2f(x[i]);
}

// ---------------------------------------------------------------------------------------
// FP8 E4M3 (e4m3fn: bias 7, no infinities, S.1111.111 = NaN).
__device__ __forceinline__ float e4m3_to_f32(unsigned char b) {
    const u32 e = (b >> 3) & 0xfu, m = b & 7u;
    float v;
    if (e == 0xfu && m == 7u) v = __int_as_float(0x7fc00000);
    else if (e == 0) v = (float)m * 0.001953125f; // m/8 * 2^-6
    else v = __uint_as_float(((e + 120u) << 23) | (m << 20));
    return (b & 0x80) ? -v : v;
}

// Two floats -> two E4M3 codes (round to nearest even, saturating to +-448), by the hardware
// conversion (sm_89 and newer; the FP8 GEMMs need those GPUs anyway).
__device__ __forceinline__ u32 f32x2_to_e4m3x2(float lo, float hi) {
#if __CUDA_ARCH__ >= 890
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return 0u;
#endif
}

// Weights: out[r, c] = bf16(e4m3(q[r, c]) * s[r / 128, c / 128]) with the scale rows `kbp`
// long (the block columns padded to a multiple of 4); the CPU's dequantisation, bit for bit.
extern "C" __global__ void moe_fp8_dequant(const unsigned char* __restrict__ q, const float* __restrict__ s,
                                           int rows, int cols, int kbp, u16* __restrict__ out) {
    const size_t n = (size_t)rows * cols;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / cols, c = i % cols;
        out[i] = f2bf(e4m3_to_f32(q[i]) * s[(r >> 7) * kbp + (c >> 7)]);
    }
}

// Activations quantised per 1x128 block, as DeepSeek-V3 inference does: s = amax / 448,
// q = e4m3(v / s) (s = 1 for an all-zero block). One warp per (row, block). Rows are grouped
// (offsets[g]..offsets[g+1], `groups` groups) and each group is padded to a multiple of 4 rows
// (cuBLASLt's block-scaled FP8 GEMMs want the row count a multiple of 4): row r of group g is
// padded row soff[g] + r - offsets[g] of the codes, and group g's scales live at
// `scales + soff[g] * kb` as [kb][rows rounded up to 4] (row index fastest: the layout
// cuBLASLt's VEC128_32F mode reads for the activation operand).
// mode 0: v = x[r, c] (x is [R, K], unpadded); mode 1: v = bf16(silu(gu[p, c]) * gu[p, K + c])
// (gu is [padded rows, 2K], p the padded row), the SwiGLU between the projections fused in.
extern "C" __global__ void moe_fp8_quant_rows(const u16* __restrict__ x, int mode, int R, int K,
                                              const u32* __restrict__ offsets, const u32* __restrict__ soff,
                                              int groups, int kmajor, unsigned char* __restrict__ q,
                                              float* __restrict__ scales) {
    const int lane = threadIdx.x & 31;
    const int wpb = blockDim.x >> 5;
    const int kb = (K + 127) / 128;
    const size_t nblk = (size_t)R * kb;
    for (size_t b = (size_t)blockIdx.x * wpb + (threadIdx.x >> 5); b < nblk; b += (size_t)gridDim.x * wpb) {
        const int r = (int)(b / kb), blk = (int)(b % kb);
        int g = 0;
        while (g + 1 < groups && offsets[g + 1] <= (u32)r) ++g;
        const size_t pr = (size_t)soff[g] + (u32)r - offsets[g];
        float v[4];
        float amax = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int c = blk * 128 + lane * 4 + i;
            float f = 0.f;
            if (c < K) {
                if (mode == 0) {
                    f = bf2f(x[(size_t)r * K + c]);
                } else {
                    const float gv = bf2f(x[pr * 2 * K + c]);
                    const float u = bf2f(x[pr * 2 * K + K + c]);
                    f = bf2f(f2bf((gv / (1.0f + expf(-gv))) * u));
                }
            }
            v[i] = f;
            amax = fmaxf(amax, fabsf(f));
        }
        for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        const float s = amax > 0.f ? amax / 448.0f : 1.0f;
        const u32 lo = f32x2_to_e4m3x2(v[0] / s, v[1] / s);
        const u32 hi = f32x2_to_e4m3x2(v[2] / s, v[3] / s);
        const u32 packed = lo | (hi << 16);
        const int c0 = blk * 128 + lane * 4;
        if (c0 + 3 < K) {
            *(u32*)(q + pr * K + c0) = packed;
        } else {
            for (int i = 0; i < 4; ++i)
                if (c0 + i < K) q[pr * K + c0 + i] = (unsigned char)(packed >> (8 * i));
        }
        if (lane == 0) {
            const u32 n = offsets[g + 1] - offsets[g];
            const u32 ld = (n + 3) & ~3u;
            const size_t at = kmajor ? (size_t)(r - offsets[g]) * kb + blk : (size_t)blk * ld + (r - offsets[g]);
            scales[(size_t)soff[g] * kb + at] = s;
        }
    }
}

// Seeded E4M3 codes of values uniform in [-448, 448) (benchmark weights on the device).
extern "C" __global__ void moe_fp8_fill(unsigned char* __restrict__ out, size_t n, u32 seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        u32 h = moe_replica_hash((u32)i ^ (u32)(i >> 32) * 0x27d4eb2du, seed);
        float u = (float)(h >> 8) * (1.0f / 16777216.0f);
        out[i] = (unsigned char)(f32x2_to_e4m3x2((2.0f * u - 1.0f) * 448.0f, 0.f) & 0xffu);
    }
}

// ---------------------------------------------------------------------------------------
// Decode-size expert projections without host round trips: C[r, o] = bf16(sum_k X[r, k] *
// W[s][o, k]) for the rows r of slot s (slot_offsets[s]..slot_offsets[s+1], read on the device),
// W slot-contiguous [slots][M][K]. One warp per (slot, output o), the slot's rows in chunks of
// 8 (each weight row is read once per chunk); K % 8 == 0 (`kv` = K / 8). Grid: x over output
// tiles, y over slots; empty slots return at once. Memory-bound by design: decode batches
// give each expert a handful of rows.
__device__ __forceinline__ float dot8(const float* wf, uint4 x) {
    const u32 xx[4] = {x.x, x.y, x.z, x.w};
    float s = 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        s = fmaf(wf[2 * q], __uint_as_float(xx[q] << 16), s);
        s = fmaf(wf[2 * q + 1], __uint_as_float(xx[q] & 0xffff0000u), s);
    }
    return s;
}

extern "C" __global__ void moe_expert_gemv(const uint4* __restrict__ X, const uint4* __restrict__ W,
                                           const u32* __restrict__ offs, int M, int kv, u16* __restrict__ C) {
    const int s = blockIdx.y;
    const u32 a = offs[s], b = offs[s + 1];
    if (a >= b) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpb = blockDim.x >> 5;
    for (int o = blockIdx.x * wpb + warp; o < M; o += gridDim.x * wpb) {
        const uint4* w = W + ((size_t)s * M + o) * kv;
        for (u32 r0 = a; r0 < b; r0 += 8) {
            const u32 nr = min(8u, b - r0);
            float acc[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] = 0.f;
            for (int c = lane; c < kv; c += 32) {
                const uint4 wv = w[c];
                const u32 ww[4] = {wv.x, wv.y, wv.z, wv.w};
                float wf[8];
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    wf[2 * q] = __uint_as_float(ww[q] << 16);
                    wf[2 * q + 1] = __uint_as_float(ww[q] & 0xffff0000u);
                }
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    if ((u32)j < nr) acc[j] += dot8(wf, X[(size_t)(r0 + j) * kv + c]);
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                float v = acc[j];
                for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
                if (lane == 0 && (u32)j < nr) C[(size_t)(r0 + j) * M + o] = f2bf(v);
            }
        }
    }
}

// The same for FP8 weights (E4M3 codes [slots][M][K] with 128x128 block scales
// [slots][M/128 rounded up][kbp]): weight-only dequantisation against the bf16 activations,
// half the weight bytes of bf16. Each code is decoded once and serves every row of a chunk:
// on sm_80 and newer one warp computes 16 outputs x 8 rows with bf16 tensor-core MMAs
// (m16n8k16, fp32 accumulation); E4M3 values are exact in bf16, so the products are exact and
// the block scale multiplies each 128-wide partial sum in fp32. K % 128 == 0, M % 16 == 0.

// Two E4M3 codes (bits 0-7 and 8-15 of v) -> two bf16 (low half from bits 0-7), exactly:
// every E4M3 value, NaN included, is a bf16 value. The hardware conversion needs sm_89.
__device__ __forceinline__ u32 e4m3x2_to_bf16x2(u32 v) {
#if __CUDA_ARCH__ >= 890
    u32 r;
    asm("{\n\t.reg .b32 h2;\n\t.reg .b16 lo, hi;\n\t.reg .f32 flo, fhi;\n\t"
        "cvt.rn.f16x2.e4m3x2 h2, %1;\n\t"
        "mov.b32 {lo, hi}, h2;\n\t"
        "cvt.f32.f16 flo, lo;\n\t"
        "cvt.f32.f16 fhi, hi;\n\t"
        "cvt.rn.bf16x2.f32 %0, fhi, flo;\n\t}"
        : "=r"(r)
        : "h"((unsigned short)v));
    return r;
#else
    return (u32)f2bf(e4m3_to_f32((unsigned char)v)) | ((u32)f2bf(e4m3_to_f32((unsigned char)(v >> 8))) << 16);
#endif
}

// 16-byte load of streamed weights: read once, kept out of L1 so the activations stay there.
__device__ __forceinline__ uint4 ld_stream(const unsigned char* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

#if __CUDA_ARCH__ >= 800
// c (16x8, fp32) += a (16x16, bf16, row-major) * b (16x8, bf16, column-major).
__device__ __forceinline__ void mma_bf16_16816(float* c, const u32* a, const u32* b) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// NB consecutive 128-wide K blocks (kb..kb+NB-1) of one warp's tile: acc += s[kb] * (W x X^T)
// per block. Lane (g = lane / 4, t = lane % 4) holds weight rows g and g + 8 and activation
// row g; the MMA's K order is permuted so that each lane reads 16 contiguous codes per row
// and 64-wide step (K = 64 * step + 16 * t + 0..15): MMA k-step i takes bytes 4i..4i+3 of
// them, as the fragment's k-slots {2t, 2t+1} and {2t+8, 2t+9}, for the weights and the
// activations alike, so the products pair up exactly as in the unpermuted sum. All loads of
// the NB blocks are issued before the first MMA (bytes in flight for a memory-bound kernel).
template <int NB>
__device__ __forceinline__ void fp8_mma_blocks(const unsigned char* w0, const unsigned char* w8,
                                               const u16* x, bool row_live, const float* srow, int kb,
                                               float* acc) {
    uint4 wa[NB][2], wb[NB][2], xv[NB][4];
    float sc[NB];
#pragma unroll
    for (int n = 0; n < NB; ++n) {
#pragma unroll
        for (int st = 0; st < 2; ++st) {
            const int k = (kb + n) * 128 + st * 64;
            wa[n][st] = ld_stream(w0 + k);
            wb[n][st] = ld_stream(w8 + k);
            if (row_live) {
                xv[n][2 * st] = *(const uint4*)(x + k);
                xv[n][2 * st + 1] = *(const uint4*)(x + k + 8);
            } else {
                xv[n][2 * st] = xv[n][2 * st + 1] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
        sc[n] = srow[kb + n];
    }
#pragma unroll
    for (int n = 0; n < NB; ++n) {
        float p[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int st = 0; st < 2; ++st) {
            const u32 ra[4] = {wa[n][st].x, wa[n][st].y, wa[n][st].z, wa[n][st].w};
            const u32 rb[4] = {wb[n][st].x, wb[n][st].y, wb[n][st].z, wb[n][st].w};
            const uint4 x0 = xv[n][2 * st], x1 = xv[n][2 * st + 1];
            const u32 xx[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const u32 a[4] = {e4m3x2_to_bf16x2(ra[i]), e4m3x2_to_bf16x2(rb[i]), e4m3x2_to_bf16x2(ra[i] >> 16),
                                  e4m3x2_to_bf16x2(rb[i] >> 16)};
                const u32 b[2] = {xx[2 * i], xx[2 * i + 1]};
                mma_bf16_16816(p, a, b);
            }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[j] = fmaf(p[j], sc[n], acc[j]);
    }
}
#else
// Before sm_80 (no bf16 MMA): 16 codes, one scale, 16 activations per lane, decoded per row.
__device__ __forceinline__ float dot16_fp8(const uint4 w, float s, const uint4* __restrict__ x) {
    const uint4 x0 = x[0], x1 = x[1];
    const u32 ww[4] = {w.x, w.y, w.z, w.w};
    const u32 xx[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
    float acc = 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            const float wf = e4m3_to_f32((unsigned char)(ww[q] >> (8 * b)));
            const u32 xv = xx[2 * q + (b >> 1)];
            const float xf = (b & 1) ? __uint_as_float(xv & 0xffff0000u) : __uint_as_float(xv << 16);
            acc = fmaf(wf, xf, acc);
        }
    }
    return acc * s;
}
#endif

// C[r, o] = bf16(sum_k X[r, k] * e4m3(W[s][o, k]) * S[s][o / 128, k / 128]) for the rows r of
// slot s (slot_offsets[s]..slot_offsets[s+1], read on the device). One warp per (slot, 16
// outputs), the slot's rows in chunks of 8. Grid: x over 16-output tiles (grid-stride),
// y over slots; empty slots return at once.
extern "C" __global__ void moe_expert_gemv_fp8(const u16* __restrict__ X, const unsigned char* __restrict__ W,
                                               const float* __restrict__ S, int kbp, const u32* __restrict__ offs,
                                               int M, int K, u16* __restrict__ C) {
    const int s = blockIdx.y;
    const u32 a = offs[s], b = offs[s + 1];
    if (a >= b) return;
    const int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
    const size_t sblk = (size_t)((M + 127) >> 7) * kbp; // scales per slot
    for (int tile = blockIdx.x * wpb + (threadIdx.x >> 5); tile < (M >> 4); tile += gridDim.x * wpb) {
        const int o0 = tile << 4;
        const float* srow = S + (size_t)s * sblk + (size_t)(o0 >> 7) * kbp;
#if __CUDA_ARCH__ >= 800
        const int g = lane >> 2, t = lane & 3, nkb = K >> 7;
        const unsigned char* w0 = W + ((size_t)s * M + o0 + g) * K + t * 16;
        const unsigned char* w8 = w0 + (size_t)8 * K;
        for (u32 r0 = a; r0 < b; r0 += 8) {
            const bool row_live = r0 + g < b;
            const u16* x = X + (size_t)(row_live ? r0 + g : r0) * K + t * 16;
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
            int kb = 0;
            for (; kb + 2 <= nkb; kb += 2) fp8_mma_blocks<2>(w0, w8, x, row_live, srow, kb, acc);
            if (kb < nkb) fp8_mma_blocks<1>(w0, w8, x, row_live, srow, kb, acc);
            // acc[0], acc[1]: output o0 + g, rows r0 + 2t and + 1; acc[2], acc[3]: output o0 + g + 8.
            const u32 r = r0 + 2 * t;
            if (r < b) {
                C[(size_t)r * M + o0 + g] = f2bf(acc[0]);
                C[(size_t)r * M + o0 + g + 8] = f2bf(acc[2]);
            }
            if (r + 1 < b) {
                C[(size_t)(r + 1) * M + o0 + g] = f2bf(acc[1]);
                C[(size_t)(r + 1) * M + o0 + g + 8] = f2bf(acc[3]);
            }
        }
#else
        const int kv = K >> 4;
        for (int o = o0; o < o0 + 16; ++o) {
            const uint4* w = (const uint4*)(W + ((size_t)s * M + o) * K);
            for (u32 r = a; r < b; ++r) {
                const uint4* x = (const uint4*)(X + (size_t)r * K);
                float v = 0.f;
                for (int c = lane; c < kv; c += 32) v += dot16_fp8(w[c], srow[c >> 3], x + 2 * c);
                for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
                if (lane == 0) C[(size_t)r * M + o] = f2bf(v);
            }
        }
#endif
    }
}
