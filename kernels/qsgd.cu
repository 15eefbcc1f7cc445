// QSGD (SPEC §13): scale_g = max |p| per group as a segmented maximum over work items (the
// bits of |p| order as u32, and a maximum is exact in any order, so every backend gets the
// same scale), then one sweep that writes each element's signed level and leaves
// p - decode(level) in the residual.
#ifndef GRADSIFT_NVRTC
#include "common.cuh"
#endif

struct QsgdArgs {
    StepBuffers b;
    u64 items;        // Item*
    u64 partial;      // u32 per item: bits of max |p|
    u64 group_items;  // u32[G + 1]: first item of each group
    u64 scales;       // float[G]
    u64 codes;        // u32[ceil(n / 4)]: the signed levels, one byte each
    u32 ngroups;
    u32 levels;       // s, 1..=127
    u32 worker;
    u32 t_lo, t_hi, s_lo, s_hi;
    u32 feedback;     // 1: e = p - decode; 0: QSGD without error feedback, e = 0
};

// Block-wide maximum, valid in thread 0. `scratch` holds 32 words.
__device__ __forceinline__ u32 block_max_u32(u32 v, u32* scratch) {
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_down_sync(0xFFFFFFFFu, v, o));
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0)
        for (u32 w = 1; w < ((blockDim.x + 31u) >> 5); ++w) v = max(v, scratch[w]);
    return v;
}

// Also zeroes the code words this item shares with a neighbour (qsgd_apply ORs its bytes
// into those and stores the words it has to itself).
extern "C" __global__ void __launch_bounds__(256) qsgd_partial(QsgdArgs a) {
    __shared__ u32 scratch[32];
    const Item it = ((const Item*)a.items)[blockIdx.x];
    const StepStatus* st = (const StepStatus*)a.b.status;
    const float* p = next_residual(a.b, st->cur);
    u32 m = 0;
    for (u32 j = threadIdx.x; j < it.len; j += blockDim.x) m = max(m, __float_as_uint(p[it.lo + j]) & 0x7FFFFFFFu);
    m = block_max_u32(m, scratch);
    if (threadIdx.x == 0) {
        ((u32*)a.partial)[blockIdx.x] = m;
        u32* words = (u32*)a.codes;
        const u32 end = it.lo + it.len;
        if (it.lo & 3u) atomicAnd(&words[it.lo >> 2], 0u);
        if (end & 3u) atomicAnd(&words[(end - 1) >> 2], 0u);
    }
}

// One block per group; an empty group has no item and scale 0.
extern "C" __global__ void __launch_bounds__(256) qsgd_merge(QsgdArgs a) {
    __shared__ u32 scratch[32];
    const u32 g = blockIdx.x;
    const u32 i0 = ((const u32*)a.group_items)[g], i1 = ((const u32*)a.group_items)[g + 1];
    u32 m = 0;
    for (u32 j = i0 + threadIdx.x; j < i1; j += blockDim.x) m = max(m, ((const u32*)a.partial)[j]);
    m = block_max_u32(m, scratch);
    if (threadIdx.x == 0) ((float*)a.scales)[g] = __uint_as_float(m);
}

// SPEC §13's level of one element, in the operations the CPU's codec::qsgd::level uses.
__device__ __forceinline__ int qsgd_level(float x, float inv, u32 s, float u) {
    if (x == 0.0f) return 0;
    const float a = __fmul_rn(fabsf(x), inv);
    int l;
    if (a >= (float)s) {
        l = (int)s;  // a = +inf (a subnormal scale) included
    } else {
        const float f = floorf(a);
        l = (int)f + (u < __fsub_rn(a, f) ? 1 : 0);
    }
    return x < 0.0f ? -l : l;
}

// One thread per word of 4 codes (little-endian: element 4w + j in byte j), so that a
// warp's stores are whole words; a word shared with the neighbouring item is ORed in.
extern "C" __global__ void __launch_bounds__(256) qsgd_apply(QsgdArgs a) {
    const Item it = ((const Item*)a.items)[blockIdx.x];
    const StepStatus* st = (const StepStatus*)a.b.status;
    const u32 cur = st->cur;
    float* p = next_residual(a.b, cur);
    float* un = a.b.u0 ? next_momentum(a.b, cur) : nullptr;
    const float scale = ((const float*)a.scales)[it.group];
    const float fs = (float)a.levels;
    const float inv = scale > 0.0f ? __fdiv_rn(fs, scale) : 0.0f;
    const float step = __fdiv_rn(scale, fs);
    u32* words = (u32*)a.codes;
    const u32 end = it.lo + it.len;
    for (u32 w = (it.lo >> 2) + threadIdx.x; w <= ((end - 1) >> 2); w += blockDim.x) {
        u32 packed = 0;
        for (u32 j = 0; j < 4; ++j) {
            const u32 i = 4 * w + j;
            if (i < it.lo || i >= end) continue;
            u32 w0, w1;
            philox_words(i, a.worker, a.t_lo, a.t_hi, a.s_lo, a.s_hi, &w0, &w1);
            const float u = __fmul_rn((float)(w1 >> 8), 5.9604644775390625e-8f);  // 2^-24, exact
            const float x = p[i];
            const int q = qsgd_level(x, inv, a.levels, u);
            packed |= ((u32)q & 0xFFu) << (8 * j);
            p[i] = a.feedback ? __fsub_rn(x, __fmul_rn((float)q, step)) : 0.0f;
            if (un) un[i] = 0.0f;  // every element sent a code: momentum masking clears all
        }
        if (4 * w >= it.lo && 4 * w + 4 <= end) {
            words[w] = packed;
        } else {
            atomicOr(&words[w], packed);
        }
    }
}

static_assert(sizeof(QsgdArgs) == 120, "QsgdArgs layout");
