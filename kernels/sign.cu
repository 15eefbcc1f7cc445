// Scaled sign (SPEC §6): scale_g = mean |p| per group as a segmented f64 reduction over
// work items (each at most ITEM elements of one group), then one sweep that sets the sign
// bits and leaves p - decode(c) in the residual.
#ifndef GRADSIFT_NVRTC
#include "common.cuh"
#endif

struct SignArgs {
    StepBuffers b;
    u64 items;        // Item*
    u64 partial;      // double* per item: sum |p|
    u64 group_items;  // u32[G + 1]: first item of each group
    u64 group_len;    // u32[G]: elements per group
    u64 scales;       // float[G]
    u64 words;        // u32[2 * ceil(n / 64)] sign bits (little-endian halves of u64 words)
    u32 ngroups;
    u32 pad;
};

extern "C" __global__ void __launch_bounds__(256) sign_partial(SignArgs a) {
    __shared__ double scratch[32];
    const Item it = ((const Item*)a.items)[blockIdx.x];
    const StepStatus* st = (const StepStatus*)a.b.status;
    const float* p = next_residual(a.b, st->cur);
    double s = 0.0;
    for (u32 j = threadIdx.x; j < it.len; j += blockDim.x) s += (double)fabsf(p[it.lo + j]);
    s = block_sum_f64(s, scratch);
    if (threadIdx.x == 0) ((double*)a.partial)[blockIdx.x] = s;
}

// One block per group, items summed in a fixed order: deterministic for a given layout.
extern "C" __global__ void __launch_bounds__(256) sign_merge(SignArgs a) {
    __shared__ double scratch[32];
    const u32 g = blockIdx.x;
    const u32 i0 = ((const u32*)a.group_items)[g], i1 = ((const u32*)a.group_items)[g + 1];
    double s = 0.0;
    for (u32 j = i0 + threadIdx.x; j < i1; j += blockDim.x) s += ((const double*)a.partial)[j];
    s = block_sum_f64(s, scratch);
    if (threadIdx.x == 0) {
        const u32 len = ((const u32*)a.group_len)[g];
        ((float*)a.scales)[g] = len ? (float)(s / (double)len) : 0.0f;
    }
}

extern "C" __global__ void __launch_bounds__(256) sign_apply(SignArgs a) {
    const Item it = ((const Item*)a.items)[blockIdx.x];
    const StepStatus* st = (const StepStatus*)a.b.status;
    const u32 cur = st->cur;
    float* p = next_residual(a.b, cur);
    float* un = a.b.u0 ? next_momentum(a.b, cur) : nullptr;
    const float s = ((const float*)a.scales)[it.group];
    u32* words = (u32*)a.words;
    const u32 lane = threadIdx.x & 31u;
    const u64 end = (u64)it.lo + it.len;
    // Word-aligned warp loop so one ballot is one word of sign bits.
    for (u64 base = (it.lo & ~31u) + (threadIdx.x & ~31u); base < end; base += blockDim.x) {
        const u64 i = base + lane;
        const bool valid = i >= it.lo && i < end;
        bool neg = false;
        if (valid) {
            const float x = p[i];
            neg = x < 0.0f;  // sign(0) = +1, -0.0 included
            p[i] = neg ? __fadd_rn(x, s) : __fsub_rn(x, s);
            if (un) un[i] = 0.0f;  // every element was sent: momentum masking clears all
        }
        const u32 m = __ballot_sync(0xFFFFFFFFu, neg);
        if (lane == 0 && m) atomicOr(&words[base >> 5], m);
    }
}

static_assert(sizeof(SignArgs) == 104, "SignArgs layout");
