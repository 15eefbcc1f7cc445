// Shared device code of every gradsift kernel: element types, exact conversions, the
// Philox keys of SPEC §3, the magnitude key of SPEC §1, block-wide scans, and the structs
// the host fills (their layout is mirrored by #[repr(C)] types in src/cuda/).
//
// NVRTC is run without any CUDA header (the PyPI NVRTC wheel ships none), so the 16-bit
// formats are plain bit containers converted with PTX `cvt`, which is exact when widening
// and round-to-nearest-even when narrowing, like the `half` crate on the host.
#ifndef GRADSIFT_COMMON_CUH
#define GRADSIFT_COMMON_CUH

typedef unsigned int u32;
typedef unsigned long long u64;

#define GS_INF_U32 0xFFFFFFFFu

struct f16_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

__device__ __forceinline__ float to_f32(float x) { return x; }
#ifdef GRADSIFT_CPU_EMU
// scripts/cuda-emu runs these kernels on the CPU, where IEEE _Float16 stands in for cvt.
__device__ __forceinline__ float emu_h2f(unsigned short b) {
    _Float16 h;
    __builtin_memcpy(&h, &b, 2);
    return (float)h;
}
__device__ __forceinline__ unsigned short emu_f2h(float f) {
    _Float16 h = (_Float16)f;
    unsigned short b;
    __builtin_memcpy(&b, &h, 2);
    return b;
}
__device__ __forceinline__ unsigned short emu_f2bf(float f) {
    u32 b = __float_as_uint(f);
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)((b >> 16) | 0x40u);
    return (unsigned short)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
#endif

__device__ __forceinline__ float to_f32(f16_t x) {
#ifdef GRADSIFT_CPU_EMU
    return emu_h2f(x.bits);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
#endif
}
__device__ __forceinline__ float to_f32(bf16_t x) {
    return __int_as_float(((int)x.bits) << 16);
}

__device__ __forceinline__ bool is_finite(float x) {
    return (__float_as_uint(x) & 0x7F800000u) != 0x7F800000u;
}

// DType::quantize: RNE to the wire format, saturating a finite value that overflows.
// dtype: 0 = f32, 1 = f16, 2 = bf16 (DType::code on the host).
__device__ __forceinline__ float quantize(float v, u32 dtype) {
    if (dtype == 1) {
#ifdef GRADSIFT_CPU_EMU
        float w = emu_h2f(emu_f2h(v));
#else
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
        float w;
        asm("cvt.f32.f16 %0, %1;" : "=f"(w) : "h"(h));
#endif
        if (!is_finite(w) && is_finite(v)) w = copysignf(65504.0f, v);
        return w;
    }
    if (dtype == 2) {
#ifdef GRADSIFT_CPU_EMU
        unsigned short h = emu_f2bf(v);
#else
        unsigned short h;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
#endif
        float w = __int_as_float(((int)h) << 16);
        // bf16::MAX = 0x7F7F.
        if (!is_finite(w) && is_finite(v)) w = copysignf(__int_as_float(0x7F7F0000), v);
        return w;
    }
    return v;
}

// SPEC §1 as "smaller key first": larger |x| bits give a smaller key.
__device__ __forceinline__ u32 magnitude_key(float x) {
    return 0x7FFFFFFFu ^ (__float_as_uint(x) & 0x7FFFFFFFu);
}

// A work item of the segmented kernels (sign.cu, qsgd.cu): a slice of one group; groups
// longer than an item span several, an empty group none.
struct Item {
    u32 group, lo, len, pad;
};
static_assert(sizeof(Item) == 16, "Item layout");

// Philox4x32-10, words 0 and 1 of the block, bit for bit as src/philox.rs.
__device__ __forceinline__ void philox_words(u32 i, u32 w, u32 t_lo, u32 t_hi, u32 s_lo, u32 s_hi, u32* w0,
                                             u32* w1) {
    u32 c0 = i, c1 = w, c2 = t_lo, c3 = t_hi, k0 = s_lo, k1 = s_hi;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        u32 hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        u32 hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    *w0 = c0;
    *w1 = c1;
}

// Word 0: random-k's key (SPEC §3).
__device__ __forceinline__ u32 philox_key(u32 i, u32 w, u32 t_lo, u32 t_hi, u32 s_lo, u32 s_hi) {
    u32 w0, w1;
    philox_words(i, w, t_lo, t_hi, s_lo, s_hi, &w0, &w1);
    return w0;
}

// Radix digits of a 32-bit key, most significant first (11 + 11 + 10 bits, as on the CPU).
__device__ __forceinline__ u32 digit_shift(int d) { return d == 0 ? 21u : (d == 1 ? 10u : 0u); }
__device__ __forceinline__ u32 digit_bits(int d) { return d == 2 ? 10u : 11u; }
__device__ __forceinline__ u32 digit_of(u32 key, int d) {
    return (key >> digit_shift(d)) & ((1u << digit_bits(d)) - 1u);
}
__device__ __forceinline__ u32 digit_mask(int d) {
    return ((1u << digit_bits(d)) - 1u) << digit_shift(d);
}

// Step status shared by every kernel of a compression step. `cur` selects which of the
// ping-pong residual/momentum buffers holds the committed state; it flips only in
// `ef_commit` when the step saw no non-finite value, which is what makes a rejected step
// leave the state untouched without a host round trip. `bad_count`/`first_bad` count the
// non-finite elements of p (accumulate); `val_bad`/`val_first` the sent values that only
// the unbiased scale made non-finite (the emitting kernels, SPEC §5), which `ef_commit`
// reports in their place when p was finite.
struct StepStatus {
    u64 bad_count;
    u32 first_bad;
    u32 cur;
    u32 steps_committed;
    u32 val_bad;
    u32 val_first;
    u32 pad;
};

// Buffers of one step; every field is a device address or a host-resolved constant.
struct StepBuffers {
    u64 e0, e1;       // residual ping-pong (f32)
    u64 u0, u1;       // momentum ping-pong (f32), 0 when momentum is off
    u64 status;       // StepStatus*
    u32 n;
    float momentum;
};

// SPEC §5: a sent value v = quantize(p * scale) that is not finite although p is (|p| *
// scale > f32::MAX; f16/bf16 saturation only applies to finite values) fails the step like
// a non-finite p. A non-finite p is already counted by the accumulate pass.
__device__ __forceinline__ void note_sent_value(const StepBuffers& b, float pi, float v, u32 i) {
    if (!is_finite(v) && is_finite(pi)) {
        StepStatus* st = (StepStatus*)b.status;
        atomicAdd(&st->val_bad, 1u);
        atomicMin(&st->val_first, i);
    }
}

__device__ __forceinline__ float* next_residual(const StepBuffers& b, u32 cur) {
    return (float*)(cur ? b.e0 : b.e1);
}
__device__ __forceinline__ const float* cur_residual(const StepBuffers& b, u32 cur) {
    return (const float*)(cur ? b.e1 : b.e0);
}
__device__ __forceinline__ float* next_momentum(const StepBuffers& b, u32 cur) {
    return (float*)(cur ? b.u0 : b.u1);
}
__device__ __forceinline__ const float* cur_momentum(const StepBuffers& b, u32 cur) {
    return (const float*)(cur ? b.u1 : b.u0);
}

// Block-wide exclusive scan of one u32 per thread; returns the block total. `scratch`
// holds at least 32 words. Every thread of the block must call it.
__device__ __forceinline__ u32 block_exclusive_scan(u32 v, u32* scratch, u32* total) {
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 nwarps = (blockDim.x + 31u) >> 5;
    u32 x = v;
#pragma unroll
    for (u32 o = 1; o < 32; o <<= 1) {
        u32 y = __shfl_up_sync(0xFFFFFFFFu, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {
        u32 s = lane < nwarps ? scratch[lane] : 0u;
#pragma unroll
        for (u32 o = 1; o < 32; o <<= 1) {
            u32 y = __shfl_up_sync(0xFFFFFFFFu, s, o);
            if (lane >= o) s += y;
        }
        scratch[lane] = s;  // inclusive prefix of warp totals
    }
    __syncthreads();
    u32 warp_base = warp > 0 ? scratch[warp - 1] : 0u;
    *total = scratch[nwarps - 1];
    __syncthreads();
    return warp_base + x - v;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
    return v;
}

// Block-wide f64 sum; the result is valid in every thread. `scratch` holds 32 doubles.
__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 nwarps = (blockDim.x + 31u) >> 5;
    v = warp_sum_f64(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double s = 0.0;
    for (u32 w = 0; w < nwarps; ++w) s += scratch[w];
    __syncthreads();
    return s;
}

// Block-wide u32 sum valid in every thread.
__device__ __forceinline__ u32 block_sum_u32(u32 v, u32* scratch) {
    u32 total;
    block_exclusive_scan(v, scratch, &total);
    return total;
}

// Warp-aggregated atomics. Both must be called by all 32 lanes of a warp together (in
// converged, warp-uniform code); `valid` says which lanes take part.
//
// Histogram: lanes with the same bin are combined (__match_any_sync) and one lane per bin
// adds the group's count, so a warp whose keys fall into a few bins (real gradients'
// exponents: bit 31 of a magnitude key is always 0 and most values share a handful of
// exponents) sends one shared-memory atomic per distinct bin instead of 32 to one address.
__device__ __forceinline__ void warp_hist_add(u32* hist, u32 bin, bool valid) {
    const u32 lane = threadIdx.x & 31u;
    if (__ballot_sync(0xFFFFFFFFu, valid) == 0u) return;  // warp-uniform
    const u32 peers = __match_any_sync(0xFFFFFFFFu, valid ? bin : GS_INF_U32);
    if (valid && lane == (u32)(__ffs(peers) - 1)) atomicAdd(&hist[bin], (u32)__popc(peers));
}

// Bitmap marking: sets bit `i` of `bits` for every lane with `mark`; lanes whose elements
// share a 32-bit word OR their bits within the warp first (the groups are disjoint, each
// reduces under its own member mask), then one lane per word does the global atomicOr.
__device__ __forceinline__ void warp_mark_bits(u32* bits, u32 i, bool mark) {
    const u32 lane = threadIdx.x & 31u;
    if (__ballot_sync(0xFFFFFFFFu, mark) == 0u) return;  // warp-uniform
    const u32 w = mark ? (i >> 5) : GS_INF_U32;       // i >> 5 < 2^27: never the sentinel
    const u32 peers = __match_any_sync(0xFFFFFFFFu, w);
    const u32 word = __reduce_or_sync(peers, mark ? (1u << (i & 31u)) : 0u);
    if (mark && lane == (u32)(__ffs(peers) - 1)) atomicOr(&bits[w], word);
}

// Finds the digit holding the `need`-th smallest element of a histogram (1 <= need <=
// sum): the digit d with below(d) < need <= below(d) + hist[d]. Every thread of the block
// calls it; the result is valid in every thread.
__device__ __forceinline__ void find_pivot(const u32* hist, u32 nbins, u32 need, u32* scratch,
                                           u32* pivot, u32* below_out, u32* count_out) {
    // Each thread owns a contiguous run of bins so that one exclusive scan orders them.
    const u32 per = (nbins + blockDim.x - 1) / blockDim.x;
    const u32 b0 = threadIdx.x * per;
    u32 local = 0;
    for (u32 j = 0; j < per; ++j) {
        u32 b = b0 + j;
        if (b < nbins) local += hist[b];
    }
    u32 total;
    u32 base = block_exclusive_scan(local, scratch, &total);
    __shared__ u32 sh_found[3];
    if (threadIdx.x == 0) {
        sh_found[0] = GS_INF_U32;
        sh_found[1] = 0;
        sh_found[2] = 0;
    }
    __syncthreads();
    if (base < need && need <= base + local) {
        u32 run = base;
        for (u32 j = 0; j < per; ++j) {
            u32 b = b0 + j;
            if (b >= nbins) break;
            u32 c = hist[b];
            if (run < need && need <= run + c) {
                sh_found[0] = b;
                sh_found[1] = run;
                sh_found[2] = c;
                break;
            }
            run += c;
        }
    }
    __syncthreads();
    *pivot = sh_found[0];
    *below_out = sh_found[1];
    *count_out = sh_found[2];
    __syncthreads();
}

#endif  // GRADSIFT_COMMON_CUH
