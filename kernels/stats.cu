// Per-layer statistics and the K-worker variance estimator (SPEC §8): segmented
// reductions over work items of at most ITEM elements. Each block keeps its item in
// registers, so the centred second moment is a second pass over registers, not over DRAM;
// items merge per layer with Chan's formula in f64.
#ifndef GRADSIFT_NVRTC
#include "common.cuh"
#endif

#define STATS_THREADS 256u
#define STATS_PER_THREAD 16u
#define ITEM (STATS_THREADS * STATS_PER_THREAD)

struct StatsItem {
    u32 group, lo, len, pad;
};

struct Moments {
    double n, mean, m2;
};

__device__ __forceinline__ Moments chan_merge(Moments a, Moments b) {
    if (b.n == 0.0) return a;
    if (a.n == 0.0) return b;
    Moments r;
    r.n = a.n + b.n;
    const double d = b.mean - a.mean;
    r.mean = a.mean + d * b.n / r.n;
    r.m2 = a.m2 + b.m2 + d * d * a.n * b.n / r.n;
    return r;
}

struct StatsPartial {
    double mean, m2;
    float min, max, max_abs;
    u32 finite, non_finite, pad;
};

struct StatsOut {
    u64 finite, non_finite;
    double mean, var;
    float min, max, max_abs, pad;
};

struct StatsArgs {
    u64 x;            // T*
    u64 items;        // StatsItem*
    u64 partial;      // StatsPartial* per item
    u64 layer_items;  // u32[L + 1]
    u64 out;          // StatsOut[L]
    u32 nlayers, pad;
};

template <typename T>
__device__ __forceinline__ void stats_items_impl(const StatsArgs& a) {
    __shared__ double dscratch[32];
    __shared__ u32 uscratch[32];
    __shared__ float fscratch[3][32];
    const StatsItem it = ((const StatsItem*)a.items)[blockIdx.x];
    const T* x = (const T*)a.x;
    float v[STATS_PER_THREAD];
    double s = 0.0;
    u32 nf = 0, bad = 0;
    float mn = __int_as_float(0x7F800000), mx = -__int_as_float(0x7F800000), ma = 0.0f;
#pragma unroll
    for (u32 j = 0; j < STATS_PER_THREAD; ++j) {
        const u32 o = j * STATS_THREADS + threadIdx.x;
        float f = 0.0f;
        bool ok = false;
        if (o < it.len) {
            f = to_f32(x[(u64)it.lo + o]);
            ok = is_finite(f);
            bad += ok ? 0u : 1u;
        }
        if (ok) {
            ++nf;
            s += (double)f;
            mn = fminf(mn, f);
            mx = fmaxf(mx, f);
            ma = fmaxf(ma, fabsf(f));
        }
        v[j] = f;
        if (!ok) v[j] = __int_as_float(0x7FC00000);  // excluded below
    }
    const double sum = block_sum_f64(s, dscratch);
    const u32 nfin = block_sum_u32(nf, uscratch);
    const u32 nbad = block_sum_u32(bad, uscratch);
    const double mean = nfin ? sum / (double)nfin : 0.0;
    double m2 = 0.0;
#pragma unroll
    for (u32 j = 0; j < STATS_PER_THREAD; ++j) {
        if (is_finite(v[j])) {
            const double dv = (double)v[j] - mean;
            m2 += dv * dv;
        }
    }
    m2 = block_sum_f64(m2, dscratch);
    // min / max / max |x| across the block.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        mn = fminf(mn, __shfl_down_sync(0xFFFFFFFFu, mn, o));
        mx = fmaxf(mx, __shfl_down_sync(0xFFFFFFFFu, mx, o));
        ma = fmaxf(ma, __shfl_down_sync(0xFFFFFFFFu, ma, o));
    }
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    if (lane == 0) {
        fscratch[0][warp] = mn;
        fscratch[1][warp] = mx;
        fscratch[2][warp] = ma;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (u32 w = 1; w < blockDim.x / 32; ++w) {
            mn = fminf(mn, fscratch[0][w]);
            mx = fmaxf(mx, fscratch[1][w]);
            ma = fmaxf(ma, fscratch[2][w]);
        }
        StatsPartial r;
        r.mean = mean;
        r.m2 = m2;
        r.min = mn;
        r.max = mx;
        r.max_abs = ma;
        r.finite = nfin;
        r.non_finite = nbad;
        r.pad = 0;
        ((StatsPartial*)a.partial)[blockIdx.x] = r;
    }
}

extern "C" __global__ void __launch_bounds__(256) stats_items_f32(StatsArgs a) { stats_items_impl<float>(a); }
extern "C" __global__ void __launch_bounds__(256) stats_items_f16(StatsArgs a) { stats_items_impl<f16_t>(a); }
extern "C" __global__ void __launch_bounds__(256) stats_items_bf16(StatsArgs a) { stats_items_impl<bf16_t>(a); }

// One block per layer: its items' partials merged per thread, then thread results merged
// in a fixed tree (deterministic for a given layout).
extern "C" __global__ void __launch_bounds__(256) stats_merge(StatsArgs a) {
    __shared__ Moments sm[STATS_THREADS];
    __shared__ float sf[3][STATS_THREADS];
    __shared__ u64 sc[2][STATS_THREADS];
    const u32 l = blockIdx.x;
    const u32 i0 = ((const u32*)a.layer_items)[l], i1 = ((const u32*)a.layer_items)[l + 1];
    Moments m = {0.0, 0.0, 0.0};
    float mn = __int_as_float(0x7F800000), mx = -__int_as_float(0x7F800000), ma = 0.0f;
    u64 nf = 0, bad = 0;
    for (u32 j = i0 + threadIdx.x; j < i1; j += blockDim.x) {
        const StatsPartial q = ((const StatsPartial*)a.partial)[j];
        Moments b = {(double)q.finite, q.mean, q.m2};
        m = chan_merge(m, b);
        mn = fminf(mn, q.min);
        mx = fmaxf(mx, q.max);
        ma = fmaxf(ma, q.max_abs);
        nf += q.finite;
        bad += q.non_finite;
    }
    sm[threadIdx.x] = m;
    sf[0][threadIdx.x] = mn;
    sf[1][threadIdx.x] = mx;
    sf[2][threadIdx.x] = ma;
    sc[0][threadIdx.x] = nf;
    sc[1][threadIdx.x] = bad;
    __syncthreads();
    for (u32 h = blockDim.x / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) {
            const u32 o = threadIdx.x + h;
            sm[threadIdx.x] = chan_merge(sm[threadIdx.x], sm[o]);
            sf[0][threadIdx.x] = fminf(sf[0][threadIdx.x], sf[0][o]);
            sf[1][threadIdx.x] = fmaxf(sf[1][threadIdx.x], sf[1][o]);
            sf[2][threadIdx.x] = fmaxf(sf[2][threadIdx.x], sf[2][o]);
            sc[0][threadIdx.x] += sc[0][o];
            sc[1][threadIdx.x] += sc[1][o];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        StatsOut r;
        r.finite = sc[0][0];
        r.non_finite = sc[1][0];
        // Moments over the finite elements only; with none (an empty layer included) they
        // are NaN (SPEC §8).
        const double nan = __longlong_as_double(0x7FF8000000000000ll);
        r.mean = sm[0].n > 0.0 ? sm[0].mean : nan;
        r.var = sm[0].n > 0.0 ? sm[0].m2 / sm[0].n : nan;
        r.min = sf[0][0];
        r.max = sf[1][0];
        r.max_abs = sf[2][0];
        r.pad = 0.0f;
        ((StatsOut*)a.out)[l] = r;
    }
}

// ---- K-worker variance estimator ----------------------------------------------------------

struct VarPartial {
    double noise, mean, m2;
    u32 n, pad;
};

struct VarOut {
    double sigma_x2, sigma_n2;
};

struct VarArgs {
    u64 workers;      // u64[K]: device addresses of the K buffers (T*)
    u64 items;        // StatsItem*
    u64 partial;      // VarPartial* per item
    u64 layer_items;  // u32[L + 1]
    u64 layer_len;    // u32[L]
    u64 out;          // VarOut[L]
    u64 bad_count;    // u64[K]
    u64 bad_first;    // u32[K]
    u32 k, nlayers;
};

template <typename T>
__device__ __forceinline__ void var_items_impl(const VarArgs& a) {
    __shared__ double dscratch[32];
    const StatsItem it = ((const StatsItem*)a.items)[blockIdx.x];
    const u64* ptrs = (const u64*)a.workers;
    const double kf = (double)a.k;
    double ybar[STATS_PER_THREAD];
    double noise = 0.0, s = 0.0;
#pragma unroll
    for (u32 j = 0; j < STATS_PER_THREAD; ++j) {
        const u32 o = j * STATS_THREADS + threadIdx.x;
        ybar[j] = 0.0;
        if (o < it.len) {
            const u64 i = (u64)it.lo + o;
            double sum = 0.0;
            for (u32 w = 0; w < a.k; ++w) {
                const float y = to_f32(((const T*)ptrs[w])[i]);
                if (!is_finite(y)) {
                    atomicAdd(&((u64*)a.bad_count)[w], 1ull);
                    atomicMin(&((u32*)a.bad_first)[w], (u32)i);
                }
                sum += (double)y;
            }
            const double m = sum / kf;
            double q = 0.0;
            for (u32 w = 0; w < a.k; ++w) {
                const double dv = (double)to_f32(((const T*)ptrs[w])[i]) - m;
                q += dv * dv;
            }
            noise += q;
            ybar[j] = m;
            s += m;
        }
    }
    noise = block_sum_f64(noise, dscratch);
    const double mean = it.len ? block_sum_f64(s, dscratch) / (double)it.len : 0.0;
    double m2 = 0.0;
#pragma unroll
    for (u32 j = 0; j < STATS_PER_THREAD; ++j) {
        if (j * STATS_THREADS + threadIdx.x < it.len) {
            const double dv = ybar[j] - mean;
            m2 += dv * dv;
        }
    }
    m2 = block_sum_f64(m2, dscratch);
    if (threadIdx.x == 0) {
        VarPartial r;
        r.noise = noise;
        r.mean = mean;
        r.m2 = m2;
        r.n = it.len;
        r.pad = 0;
        ((VarPartial*)a.partial)[blockIdx.x] = r;
    }
}

extern "C" __global__ void __launch_bounds__(256) var_items_f32(VarArgs a) { var_items_impl<float>(a); }
extern "C" __global__ void __launch_bounds__(256) var_items_f16(VarArgs a) { var_items_impl<f16_t>(a); }
extern "C" __global__ void __launch_bounds__(256) var_items_bf16(VarArgs a) { var_items_impl<bf16_t>(a); }

extern "C" __global__ void __launch_bounds__(256) var_merge(VarArgs a) {
    __shared__ Moments sm[STATS_THREADS];
    __shared__ double sn[STATS_THREADS];
    const u32 l = blockIdx.x;
    const u32 i0 = ((const u32*)a.layer_items)[l], i1 = ((const u32*)a.layer_items)[l + 1];
    Moments m = {0.0, 0.0, 0.0};
    double noise = 0.0;
    for (u32 j = i0 + threadIdx.x; j < i1; j += blockDim.x) {
        const VarPartial q = ((const VarPartial*)a.partial)[j];
        Moments b = {(double)q.n, q.mean, q.m2};
        m = chan_merge(m, b);
        noise += q.noise;
    }
    sm[threadIdx.x] = m;
    sn[threadIdx.x] = noise;
    __syncthreads();
    for (u32 h = blockDim.x / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) {
            sm[threadIdx.x] = chan_merge(sm[threadIdx.x], sm[threadIdx.x + h]);
            sn[threadIdx.x] += sn[threadIdx.x + h];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        const u32 nl = ((const u32*)a.layer_len)[l];
        VarOut r = {0.0, 0.0};
        if (nl) {
            const double kf = (double)a.k;
            r.sigma_n2 = sn[0] / ((double)nl * (kf - 1.0));
            const double var_ybar = sm[0].m2 / (double)nl;
            r.sigma_x2 = fmax(var_ybar - r.sigma_n2 / kf, 0.0);
        }
        ((VarOut*)a.out)[l] = r;
    }
}

static_assert(sizeof(StatsItem) == 16, "StatsItem layout");
static_assert(sizeof(StatsPartial) == 40, "StatsPartial layout");
static_assert(sizeof(StatsOut) == 48, "StatsOut layout");
static_assert(sizeof(StatsArgs) == 48, "StatsArgs layout");
static_assert(sizeof(VarPartial) == 32, "VarPartial layout");
static_assert(sizeof(VarOut) == 16, "VarOut layout");
static_assert(sizeof(VarArgs) == 72, "VarArgs layout");
