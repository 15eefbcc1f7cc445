// Error-feedback accumulation (SPEC §5, §10): p = e + g or u' = m u + g, p = e + u', written
// to the *next* ping-pong buffers, counting non-finite elements. In global mode the first
// radix-select histogram of the magnitude keys is fused in, so the step's only full read
// of g and e is this one (the 12 bytes per element floor).
#ifndef GRADSIFT_NVRTC
#include "common.cuh"
#include "select.cuh"
#endif

struct AccArgs {
    StepBuffers b;
    u64 grad;       // T*
    u64 sel_state;  // SelState* whose pass-0 histogram is fused in, or 0
};

struct RefundArgs {
    StepBuffers b;
    u64 idx;    // const u32*, strictly ascending
    u64 val;    // const float*
    u32 count;
    u32 pad;
};

template <typename T>
__device__ __forceinline__ void ef_accumulate_impl(const AccArgs& a) {
    __shared__ u32 hist[2048];
    __shared__ u32 scratch[32];
    StepStatus* st = (StepStatus*)a.b.status;
    const u32 cur = st->cur;
    const T* g = (const T*)a.grad;
    const float* e = cur_residual(a.b, cur);
    float* p = next_residual(a.b, cur);
    const bool mom = a.b.u0 != 0;
    const float* u = mom ? cur_momentum(a.b, cur) : nullptr;
    float* un = mom ? next_momentum(a.b, cur) : nullptr;
    const float m = a.b.momentum;
    const bool fuse = a.sel_state != 0;
    if (fuse) {
        for (u32 j = threadIdx.x; j < 2048; j += blockDim.x) hist[j] = 0;
        __syncthreads();
    }
    u32 bad = 0, first = GS_INF_U32;
    const u64 n = a.b.n;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    // Indices visited by a thread only grow, so its first non-finite one is its smallest.
    auto finish = [&](u64 i, float gi, float ei, float ui) {
        float pi;
        if (mom) {
            // Two roundings, as the CPU reference (no contraction: --fmad=false and _rn).
            const float un_i = __fadd_rn(__fmul_rn(m, ui), gi);
            un[i] = un_i;
            pi = __fadd_rn(ei, un_i);
        } else {
            pi = __fadd_rn(ei, gi);
        }
        p[i] = pi;
        if (!is_finite(pi)) {
            ++bad;
            if (first == GS_INF_U32) first = (u32)i;
        }
        return pi;
    };
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    // Both loops run warp-uniformly (the fused histogram combines a warp's lanes): `i - lane`
    // is the index of the warp's lane 0, and the stride is a multiple of 32.
    const u64 lane = threadIdx.x & 31u;
    // Four independent loads of each input in flight per thread: at full occupancy that is
    // what it takes to cover DRAM latency at H100 bandwidth. The whole warp's four elements
    // are in range here.
    for (; (i - lane) + 31 + 3 * stride < n; i += 4 * stride) {
        float gv[4], ev[4], uv[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            gv[q] = to_f32(g[i + q * stride]);
            ev[q] = e[i + q * stride];
            uv[q] = mom ? u[i + q * stride] : 0.0f;
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const float pi = finish(i + q * stride, gv[q], ev[q], uv[q]);
            if (fuse) warp_hist_add(hist, digit_of(magnitude_key(pi), 0), true);
        }
    }
    for (; i - lane < n; i += stride) {
        const bool valid = i < n;
        const float pi = valid ? finish(i, to_f32(g[i]), e[i], mom ? u[i] : 0.0f) : 0.0f;
        if (fuse) warp_hist_add(hist, digit_of(magnitude_key(pi), 0), valid);
    }
    u32 total_bad = block_sum_u32(bad, scratch);
    if (bad) atomicMin(&st->first_bad, first);
    if (threadIdx.x == 0 && total_bad) atomicAdd(&st->bad_count, (u64)total_bad);
    if (fuse) {
        __syncthreads();
        SelState* s = (SelState*)a.sel_state;
        for (u32 j = threadIdx.x; j < 2048; j += blockDim.x)
            if (hist[j]) atomicAdd(&s->hist[j], hist[j]);
    }
}

extern "C" __global__ void __launch_bounds__(256) ef_accumulate_f32(AccArgs a) { ef_accumulate_impl<float>(a); }
extern "C" __global__ void __launch_bounds__(256) ef_accumulate_f16(AccArgs a) { ef_accumulate_impl<f16_t>(a); }
extern "C" __global__ void __launch_bounds__(256) ef_accumulate_bf16(AccArgs a) { ef_accumulate_impl<bf16_t>(a); }

// Opens a step: the non-finite counters restart; `cur` is left alone.
extern "C" __global__ void __launch_bounds__(32) ef_begin(StepBuffers b) {
    StepStatus* st = (StepStatus*)b.status;
    st->bad_count = 0;
    st->first_bad = GS_INF_U32;
    st->val_bad = 0;
    st->val_first = GS_INF_U32;
}

// Closes a step: the next buffers become the state only when every p and every sent value
// was finite. With a finite p, overflowing scaled values are the step's report (SPEC §5).
extern "C" __global__ void __launch_bounds__(32) ef_commit(StepBuffers b) {
    StepStatus* st = (StepStatus*)b.status;
    if (st->bad_count == 0 && st->val_bad != 0) {
        st->bad_count = st->val_bad;
        st->first_bad = st->val_first;
    }
    if (st->bad_count == 0) {
        st->cur ^= 1u;
        st->steps_committed += 1u;
    }
}

// SPEC §12: entries a distributed reduction did not use return to the current residual,
// one f32 addition each. The host checked the indices (distinct, below n), so no two
// threads touch one element. `cur` is read on the device: the refund follows the step on
// the stream, and the host only waited to learn that the step was accepted.
extern "C" __global__ void __launch_bounds__(256) ef_refund(RefundArgs a) {
    const StepStatus* st = (const StepStatus*)a.b.status;
    float* e = (float*)(st->cur ? a.b.e1 : a.b.e0);
    const u32* idx = (const u32*)a.idx;
    const float* val = (const float*)a.val;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x; t < a.count; t += stride)
        e[idx[t]] += val[t];
}

// The host mirrors these layouts (src/cuda/abi.rs); a mismatch fails compilation here.
static_assert(sizeof(StepStatus) == 32, "StepStatus layout");
static_assert(sizeof(StepBuffers) == 48, "StepBuffers layout");
static_assert(sizeof(AccArgs) == 64, "AccArgs layout");
static_assert(sizeof(RefundArgs) == 72, "RefundArgs layout");
