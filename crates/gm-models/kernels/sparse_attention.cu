// Sparse attention, forward and backward, on [B, H, N, D] f32 tensors: the
// CUDA twin of the CPU op in src/attention/sparse.rs. Compiled at run time by
// NVRTC (no #include: NVRTC has no C++ standard headers), launched from
// src/cuda.rs.
//
// # Which keys
//
// `SparsePattern::for_each_key` (src/attention/sparse.rs) is the spec. A
// query's keys are at most five arithmetic runs, visited in this order:
//
//   global query (i < g): [0, hi_all)                              (one run)
//   otherwise:            [0, min(g, lo))          global keys before the window
//                         j ≡ s−1 (mod s) in [g, lo)   strided keys before it
//                         [lo, hi)                 the window
//                         [hi, min(g, hi_all))     global keys after it
//                         j ≡ s−1 (mod s) in [max(g, hi), hi_all)
//
// with hi_all = causal ? min(i + 1, nk) : nk, lo = min(max(i − w, 0), nk),
// hi = min(i + w + 1, hi_all). Position p of a query's key list maps to its
// key by walking the runs (gm_run_at), so a warp can hand 32 consecutive
// positions to its 32 lanes and still visit the keys in the spec's order.
//
// The backward pass also needs the transpose: the queries that see key j,
// in increasing order. From the predicate `allows(i, j)`:
//
//   c0 = causal ? j : 0
//   j < g or j ≡ s−1 (mod s):  [c0, nq)                            (one run)
//   otherwise:                 [c0, a)  with a = max(c0, min(g, nq))  (global queries)
//                              [max(c0, j − w, a), min(j + w + 1, nq))  (the window)
//
// The host clamps the pattern into int range without changing it: window
// to max(nq, nk), stride to nk + 1 (a stride above nk selects no key), global
// tokens to max(nq, nk); stride 0 means none.
//
// # Thread mapping
//
// One warp per row (a (batch·head, query) pair forward and for dQ, a
// (batch·head, key) pair for dK/dV); 4 warps per block, a 1-D grid over
// rows. A warp walks its row's list in chunks of 32 entries: lane t scores
// entry t of the chunk (a lane-serial dot product over D, 4 partial sums,
// float4 loads when D % 4 == 0), the warp reduces with shuffles, then the
// chunk's 32 weights are broadcast one by one (shfl) while every lane
// accumulates its own output dimensions (dd = lane + 32·c, c < NC) from a
// coalesced read of the key/query row. Each lane keeps NC ≤ 8 accumulators
// in registers, so D ≤ 32·NC ≤ 256; the host picks the entry point with the
// smallest NC ∈ {1, 2, 4, 8} that fits D.
//
// Forward: online softmax (running max m and sum l, the accumulator rescaled
// by exp(m_old − m_new) per chunk); writes O and lse = m + log l (−inf and
// a zero row for a query that sees no key, as on the CPU).
//
// Backward, without atomics and deterministic (every output element is
// written by one lane, in a fixed order):
//   1. gm_sparse_attn_bwd_dq_*: query-major. Per query: delta = dO·O (saved
//      for pass 2), then for each key recompute p = exp(q·k·scale − lse),
//      dp = dO·v, ds = p (dp − delta) scale, and dQ += ds k.
//   2. gm_sparse_attn_bwd_dkdv_*: key-major over the transposed pattern. Per
//      key: for each query that sees it, recompute p and ds as above;
//      dV += p dO, dK += ds q.
// The scores are recomputed in both passes (about twice the backward's dot
// products) in exchange for no atomics and run-to-run identical results. A
// key seen by every query (global or strided) makes its warp walk all nq
// queries; the other warps finish early (load imbalance, not extra work).

#define GM_WARP 32
#define GM_FULL_MASK 0xffffffffu

typedef long long gm_i64;

// Up to five arithmetic runs start, start + step, ... (count entries each).
struct GmRuns {
    int start[5];
    int step[5];
    int count[5];
    int total;
};

__device__ __forceinline__ float gm_neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ gm_i64 gm_min64(gm_i64 a, gm_i64 b) { return a < b ? a : b; }
__device__ __forceinline__ gm_i64 gm_max64(gm_i64 a, gm_i64 b) { return a > b ? a : b; }

// Run `slot` = [from, to) with step 1 (empty when to ≤ from).
__device__ __forceinline__ void gm_set_range(GmRuns& r, int slot, gm_i64 from, gm_i64 to) {
    r.start[slot] = (int)from;
    r.step[slot] = 1;
    r.count[slot] = to > from ? (int)(to - from) : 0;
}

// Run `slot` = the j ≡ s − 1 (mod s) in [from, to); none when s == 0.
__device__ __forceinline__ void gm_set_strided(GmRuns& r, int slot, int s, gm_i64 from, gm_i64 to) {
    r.start[slot] = 0;
    r.step[slot] = 1;
    r.count[slot] = 0;
    if (s > 0 && from < to) {
        gm_i64 first = from + (s - 1 - from % s);
        if (first < to) {
            r.start[slot] = (int)first;
            r.step[slot] = s;
            r.count[slot] = (int)((to - 1 - first) / s + 1);
        }
    }
}

__device__ __forceinline__ void gm_clear(GmRuns& r) {
#pragma unroll
    for (int t = 0; t < 5; ++t) {
        r.start[t] = 0;
        r.step[t] = 1;
        r.count[t] = 0;
    }
}

__device__ __forceinline__ void gm_finish(GmRuns& r) {
    r.total = r.count[0] + r.count[1] + r.count[2] + r.count[3] + r.count[4];
}

// The keys of query i, in `for_each_key` order.
__device__ __forceinline__ GmRuns gm_keys_of_query(int i, int nk, int window, int stride, int global_tokens,
                                                   int causal) {
    GmRuns r;
    gm_clear(r);
    const gm_i64 g = global_tokens;
    const gm_i64 hi_all = causal ? gm_min64((gm_i64)i + 1, nk) : (gm_i64)nk;
    if (i < g) {
        gm_set_range(r, 0, 0, hi_all);
    } else {
        const gm_i64 lo = gm_min64(gm_max64((gm_i64)i - window, 0), nk);
        const gm_i64 hi = gm_min64((gm_i64)i + window + 1, hi_all);
        gm_set_range(r, 0, 0, gm_min64(g, lo));
        gm_set_strided(r, 1, stride, g, lo);
        gm_set_range(r, 2, lo, hi);
        gm_set_range(r, 3, hi, gm_min64(g, hi_all));
        gm_set_strided(r, 4, stride, gm_max64(g, hi), hi_all);
    }
    gm_finish(r);
    return r;
}

// The queries that see key j, in increasing order (the transpose).
__device__ __forceinline__ GmRuns gm_queries_of_key(int j, int nq, int window, int stride, int global_tokens,
                                                    int causal) {
    GmRuns r;
    gm_clear(r);
    const gm_i64 g = global_tokens;
    const gm_i64 c0 = causal ? (gm_i64)j : 0;
    const bool strided = stride > 0 && j % stride == stride - 1;
    if (j < g || strided) {
        gm_set_range(r, 0, c0, nq);
    } else {
        const gm_i64 a = gm_max64(c0, gm_min64(g, nq));
        gm_set_range(r, 0, c0, a);
        const gm_i64 b_lo = gm_max64(gm_max64(c0, (gm_i64)j - window), a);
        gm_set_range(r, 1, b_lo, gm_min64((gm_i64)j + window + 1, nq));
    }
    gm_finish(r);
    return r;
}

// Entry p (< r.total) of the runs.
__device__ __forceinline__ int gm_run_at(const GmRuns& r, int p) {
    int out = -1;
#pragma unroll
    for (int t = 0; t < 5; ++t) {
        if (out < 0) {
            if (p < r.count[t]) {
                out = r.start[t] + p * r.step[t];
            } else {
                p -= r.count[t];
            }
        }
    }
    return out;
}

__device__ __forceinline__ float gm_warp_sum(float x) {
#pragma unroll
    for (int o = GM_WARP / 2; o > 0; o >>= 1) x += __shfl_xor_sync(GM_FULL_MASK, x, o);
    return x;
}

__device__ __forceinline__ float gm_warp_max(float x) {
#pragma unroll
    for (int o = GM_WARP / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(GM_FULL_MASK, x, o));
    return x;
}

// a · b over d elements, by one thread (rows start 16-byte aligned when
// d % 4 == 0: device buffers are 256-byte aligned).
__device__ __forceinline__ float gm_dot(const float* __restrict__ a, const float* __restrict__ b, int d) {
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    if ((d & 3) == 0) {
        const float4* a4 = reinterpret_cast<const float4*>(a);
        const float4* b4 = reinterpret_cast<const float4*>(b);
        for (int c = 0; c < (d >> 2); ++c) {
            const float4 x = a4[c];
            const float4 y = b4[c];
            s0 = fmaf(x.x, y.x, s0);
            s1 = fmaf(x.y, y.y, s1);
            s2 = fmaf(x.z, y.z, s2);
            s3 = fmaf(x.w, y.w, s3);
        }
    } else {
        int c = 0;
        for (; c + 4 <= d; c += 4) {
            s0 = fmaf(a[c], b[c], s0);
            s1 = fmaf(a[c + 1], b[c + 1], s1);
            s2 = fmaf(a[c + 2], b[c + 2], s2);
            s3 = fmaf(a[c + 3], b[c + 3], s3);
        }
        for (; c < d; ++c) s0 = fmaf(a[c], b[c], s0);
    }
    return (s0 + s1) + (s2 + s3);
}

// This warp's row (batch·head · n + position), or −1 past the end; lane.
__device__ __forceinline__ gm_i64 gm_warp_row(gm_i64 rows) {
    const gm_i64 w = (gm_i64)blockIdx.x * (blockDim.x / GM_WARP) + threadIdx.x / GM_WARP;
    return w < rows ? w : -1;
}

// ---- forward -------------------------------------------------------------

template <int NC>
__device__ __forceinline__ void gm_fwd(const float* __restrict__ q, const float* __restrict__ k,
                                       const float* __restrict__ v, float* __restrict__ out,
                                       float* __restrict__ lse, int bh, int nq, int nk, int d, float scale,
                                       int window, int stride, int global_tokens, int causal) {
    const gm_i64 row = gm_warp_row((gm_i64)bh * nq);
    if (row < 0) return;  // uniform across the warp
    const int lane = threadIdx.x % GM_WARP;
    const int i = (int)(row % nq);
    const gm_i64 head = row / nq;
    const float* qi = q + row * d;
    const float* kh = k + head * nk * d;
    const float* vh = v + head * nk * d;
    const GmRuns r = gm_keys_of_query(i, nk, window, stride, global_tokens, causal);

    float acc[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[c] = 0.f;
    float m = gm_neg_inf();
    float l = 0.f;
    for (int base = 0; base < r.total; base += GM_WARP) {
        const int p = base + lane;
        const int j = p < r.total ? gm_run_at(r, p) : -1;
        const float s = j >= 0 ? gm_dot(qi, kh + (gm_i64)j * d, d) * scale : gm_neg_inf();
        const float m_new = fmaxf(m, gm_warp_max(s));  // finite: lane 0 holds a key
        const float alpha = expf(m - m_new);           // 0 on the first chunk
        const float pj = j >= 0 ? expf(s - m_new) : 0.f;
        l = l * alpha + gm_warp_sum(pj);
#pragma unroll
        for (int c = 0; c < NC; ++c) acc[c] *= alpha;
        const int cnt = min(GM_WARP, r.total - base);
        for (int t = 0; t < cnt; ++t) {
            const float pt = __shfl_sync(GM_FULL_MASK, pj, t);
            const int jt = __shfl_sync(GM_FULL_MASK, j, t);
            const float* vj = vh + (gm_i64)jt * d;
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                const int dd = c * GM_WARP + lane;
                if (dd < d) acc[c] = fmaf(pt, vj[dd], acc[c]);
            }
        }
        m = m_new;
    }
    const float inv = r.total > 0 ? 1.f / l : 0.f;
    float* oi = out + row * d;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
        const int dd = c * GM_WARP + lane;
        if (dd < d) oi[dd] = acc[c] * inv;
    }
    if (lane == 0) lse[row] = r.total > 0 ? m + logf(l) : gm_neg_inf();
}

// ---- backward, pass 1: delta and dQ (query-major) ------------------------

template <int NC>
__device__ __forceinline__ void gm_bwd_dq(const float* __restrict__ q, const float* __restrict__ k,
                                          const float* __restrict__ v, const float* __restrict__ out,
                                          const float* __restrict__ dout, const float* __restrict__ lse,
                                          float* __restrict__ dq, float* __restrict__ delta, int bh, int nq,
                                          int nk, int d, float scale, int window, int stride,
                                          int global_tokens, int causal) {
    const gm_i64 row = gm_warp_row((gm_i64)bh * nq);
    if (row < 0) return;
    const int lane = threadIdx.x % GM_WARP;
    const int i = (int)(row % nq);
    const gm_i64 head = row / nq;
    const float* qi = q + row * d;
    const float* doi = dout + row * d;
    const float* oi = out + row * d;
    const float* kh = k + head * nk * d;
    const float* vh = v + head * nk * d;

    float part = 0.f;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
        const int dd = c * GM_WARP + lane;
        if (dd < d) part = fmaf(doi[dd], oi[dd], part);
    }
    const float delta_i = gm_warp_sum(part);
    if (lane == 0) delta[row] = delta_i;

    float acc[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[c] = 0.f;
    const float lse_i = lse[row];
    if (lse_i != gm_neg_inf()) {  // a query that sees no key has no gradient
        const GmRuns r = gm_keys_of_query(i, nk, window, stride, global_tokens, causal);
        for (int base = 0; base < r.total; base += GM_WARP) {
            const int p = base + lane;
            const int j = p < r.total ? gm_run_at(r, p) : -1;
            float ds = 0.f;
            if (j >= 0) {
                const float pr = expf(gm_dot(qi, kh + (gm_i64)j * d, d) * scale - lse_i);
                const float dp = gm_dot(doi, vh + (gm_i64)j * d, d);
                ds = pr * (dp - delta_i) * scale;
            }
            const int cnt = min(GM_WARP, r.total - base);
            for (int t = 0; t < cnt; ++t) {
                const float dst = __shfl_sync(GM_FULL_MASK, ds, t);
                const int jt = __shfl_sync(GM_FULL_MASK, j, t);
                const float* kj = kh + (gm_i64)jt * d;
#pragma unroll
                for (int c = 0; c < NC; ++c) {
                    const int dd = c * GM_WARP + lane;
                    if (dd < d) acc[c] = fmaf(dst, kj[dd], acc[c]);
                }
            }
        }
    }
    float* dqi = dq + row * d;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
        const int dd = c * GM_WARP + lane;
        if (dd < d) dqi[dd] = acc[c];
    }
}

// ---- backward, pass 2: dK and dV (key-major) -----------------------------

template <int NC>
__device__ __forceinline__ void gm_bwd_dkdv(const float* __restrict__ q, const float* __restrict__ k,
                                            const float* __restrict__ v, const float* __restrict__ dout,
                                            const float* __restrict__ lse, const float* __restrict__ delta,
                                            float* __restrict__ dk, float* __restrict__ dv, int bh, int nq,
                                            int nk, int d, float scale, int window, int stride,
                                            int global_tokens, int causal) {
    const gm_i64 row = gm_warp_row((gm_i64)bh * nk);
    if (row < 0) return;
    const int lane = threadIdx.x % GM_WARP;
    const int j = (int)(row % nk);
    const gm_i64 head = row / nk;
    const float* kj = k + row * d;
    const float* vj = v + row * d;
    const float* qh = q + head * nq * d;
    const float* doh = dout + head * nq * d;
    const float* lseh = lse + head * nq;
    const float* deltah = delta + head * nq;
    const GmRuns r = gm_queries_of_key(j, nq, window, stride, global_tokens, causal);

    float acc_k[NC];
    float acc_v[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) {
        acc_k[c] = 0.f;
        acc_v[c] = 0.f;
    }
    for (int base = 0; base < r.total; base += GM_WARP) {
        const int p = base + lane;
        const int i = p < r.total ? gm_run_at(r, p) : -1;
        float pr = 0.f;
        float ds = 0.f;
        if (i >= 0) {
            const float lse_i = lseh[i];  // finite: query i sees key j
            if (lse_i != gm_neg_inf()) {
                pr = expf(gm_dot(qh + (gm_i64)i * d, kj, d) * scale - lse_i);
                const float dp = gm_dot(doh + (gm_i64)i * d, vj, d);
                ds = pr * (dp - deltah[i]) * scale;
            }
        }
        const int cnt = min(GM_WARP, r.total - base);
        for (int t = 0; t < cnt; ++t) {
            const float pt = __shfl_sync(GM_FULL_MASK, pr, t);
            const float dst = __shfl_sync(GM_FULL_MASK, ds, t);
            const int it = __shfl_sync(GM_FULL_MASK, i, t);
            const float* qi = qh + (gm_i64)it * d;
            const float* doi = doh + (gm_i64)it * d;
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                const int dd = c * GM_WARP + lane;
                if (dd < d) {
                    acc_v[c] = fmaf(pt, doi[dd], acc_v[c]);
                    acc_k[c] = fmaf(dst, qi[dd], acc_k[c]);
                }
            }
        }
    }
    float* dkj = dk + row * d;
    float* dvj = dv + row * d;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
        const int dd = c * GM_WARP + lane;
        if (dd < d) {
            dkj[dd] = acc_k[c];
            dvj[dd] = acc_v[c];
        }
    }
}

// ---- entry points: one per head-dim class (D ≤ 32, 64, 128, 256) --------

#define GM_PATTERN_PARAMS int window, int stride, int global_tokens, int causal
#define GM_PATTERN_ARGS window, stride, global_tokens, causal

#define GM_ENTRIES(DMAX, NC)                                                                            \
    extern "C" __global__ void __launch_bounds__(128)                                                   \
        gm_sparse_attn_fwd_d##DMAX(const float* __restrict__ q, const float* __restrict__ k,          \
                                   const float* __restrict__ v, float* __restrict__ out,               \
                                   float* __restrict__ lse, int bh, int nq, int nk, int d, float scale, \
                                   GM_PATTERN_PARAMS) {                                                 \
        gm_fwd<NC>(q, k, v, out, lse, bh, nq, nk, d, scale, GM_PATTERN_ARGS);                           \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(128) gm_sparse_attn_bwd_dq_d##DMAX(                  \
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,         \
        const float* __restrict__ out, const float* __restrict__ dout, const float* __restrict__ lse,  \
        float* __restrict__ dq, float* __restrict__ delta, int bh, int nq, int nk, int d, float scale, \
        GM_PATTERN_PARAMS) {                                                                            \
        gm_bwd_dq<NC>(q, k, v, out, dout, lse, dq, delta, bh, nq, nk, d, scale, GM_PATTERN_ARGS);      \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(128) gm_sparse_attn_bwd_dkdv_d##DMAX(                \
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,         \
        const float* __restrict__ dout, const float* __restrict__ lse,                                 \
        const float* __restrict__ delta, float* __restrict__ dk, float* __restrict__ dv, int bh,       \
        int nq, int nk, int d, float scale, GM_PATTERN_PARAMS) {                                        \
        gm_bwd_dkdv<NC>(q, k, v, dout, lse, delta, dk, dv, bh, nq, nk, d, scale, GM_PATTERN_ARGS);     \
    }

GM_ENTRIES(32, 1)
GM_ENTRIES(64, 2)
GM_ENTRIES(128, 4)
GM_ENTRIES(256, 8)
