// The server's decoder (SPEC §7): payloads are validated on the device first (indices in
// range and strictly ascending, values finite); every writing kernel then reads the `any`
// flag and does nothing if a payload was bad, so `out` is untouched without a host round
// trip. Workers are added one launch each, in order k = 0..K-1: one f32 add per worker per
// coordinate, the same bits as the CPU.
#ifndef GRADSIFT_NVRTC
#include "common.cuh"
#endif

struct AggItem {
    u32 group, lo, len, pad;
};

struct AggArgs {
    u64 out;        // float[n]
    u64 counts;     // u32[n] senders per coordinate (OverSenders), else 0
    u64 idx;        // u32* this payload's indices
    u64 val;        // float* this payload's values
    u64 err_idx;    // u32[K]: first position with a bad index, per worker
    u64 err_val;    // u32[K]: first position with a non-finite value, per worker
    u64 any;        // u32*: nonzero once any payload is bad
    u64 inv;        // float[K + 1]: f32(1 / c)
    u64 scales;     // float* a sign or QSGD payload's scales
    u64 words;      // u32* a sign payload's bits, or signed char* a QSGD payload's codes
    u64 items;      // AggItem*
    u32 len;        // entries of this payload (sparse), its levels (QSGD)
    u32 n;
    u32 worker;
    u32 workers;
};

extern "C" __global__ void __launch_bounds__(256) agg_check_sparse(AggArgs a) {
    const u32* idx = (const u32*)a.idx;
    const float* val = (const float*)a.val;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < a.len; j += stride) {
        const u32 i = idx[j];
        if (i >= a.n || (j > 0 && idx[j - 1] >= i)) {
            atomicMin(&((u32*)a.err_idx)[a.worker], (u32)j);
            atomicOr((u32*)a.any, 1u);
        }
        if (!is_finite(val[j])) {
            atomicMin(&((u32*)a.err_val)[a.worker], (u32)j);
            atomicOr((u32*)a.any, 1u);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) agg_zero(AggArgs a) {
    if (*(const volatile u32*)a.any) return;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    float* out = (float*)a.out;
    u32* counts = (u32*)a.counts;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < a.n; i += stride) {
        out[i] = 0.0f;
        if (counts) counts[i] = 0;
    }
}

// Indices are distinct within a payload (checked), so the adds of one launch never race.
extern "C" __global__ void __launch_bounds__(256) agg_scatter(AggArgs a) {
    if (*(const volatile u32*)a.any) return;
    const u32* idx = (const u32*)a.idx;
    const float* val = (const float*)a.val;
    float* out = (float*)a.out;
    u32* counts = (u32*)a.counts;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < a.len; j += stride) {
        const u32 i = idx[j];
        out[i] = __fadd_rn(out[i], val[j]);
        if (counts) counts[i] += 1u;
    }
}

extern "C" __global__ void __launch_bounds__(256) agg_sign(AggArgs a) {
    if (*(const volatile u32*)a.any) return;
    const AggItem it = ((const AggItem*)a.items)[blockIdx.x];
    const float s = ((const float*)a.scales)[it.group];
    const u32* words = (const u32*)a.words;
    float* out = (float*)a.out;
    u32* counts = (u32*)a.counts;
    for (u32 j = threadIdx.x; j < it.len; j += blockDim.x) {
        const u32 i = it.lo + j;
        const bool neg = (words[i >> 5] >> (i & 31u)) & 1u;
        out[i] = __fadd_rn(out[i], neg ? -s : s);
        if (counts) counts[i] += 1u;
    }
}

// Codes within -levels..=levels (the scales and the lengths were checked on the host).
extern "C" __global__ void __launch_bounds__(256) agg_check_qsgd(AggArgs a) {
    const signed char* codes = (const signed char*)a.words;
    const int s = (int)a.len;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < a.n; i += stride) {
        const int c = codes[i];
        if (c < -s || c > s) {
            atomicMin(&((u32*)a.err_val)[a.worker], (u32)i);
            atomicOr((u32*)a.any, 1u);
        }
    }
}

// SPEC §13: decode = f32(code) * (scale / f32(s)), one correctly rounded division per group.
extern "C" __global__ void __launch_bounds__(256) agg_qsgd(AggArgs a) {
    if (*(const volatile u32*)a.any) return;
    const AggItem it = ((const AggItem*)a.items)[blockIdx.x];
    const float step = __fdiv_rn(((const float*)a.scales)[it.group], (float)a.len);
    const signed char* codes = (const signed char*)a.words;
    float* out = (float*)a.out;
    u32* counts = (u32*)a.counts;
    for (u32 j = threadIdx.x; j < it.len; j += blockDim.x) {
        const u32 i = it.lo + j;
        out[i] = __fadd_rn(out[i], __fmul_rn((float)codes[i], step));
        if (counts) counts[i] += 1u;
    }
}

extern "C" __global__ void __launch_bounds__(256) agg_finalize(AggArgs a) {
    if (*(const volatile u32*)a.any) return;
    const float* inv = (const float*)a.inv;
    float* out = (float*)a.out;
    const u32* counts = (const u32*)a.counts;
    const float inv_k = inv[a.workers];
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < a.n; i += stride)
        out[i] = __fmul_rn(out[i], counts ? inv[counts[i]] : inv_k);
}

static_assert(sizeof(AggItem) == 16, "AggItem layout");
static_assert(sizeof(AggArgs) == 104, "AggArgs layout");
