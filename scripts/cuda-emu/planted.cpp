// Planted bugs: copies of pieces of the real kernels (kernels/*.cu), each with one bug of
// a class the sanitizer in emu.h must report. A case passes only when its bug IS reported
// (by the expected check) and fails when it goes unnoticed, so this file proves that the
// checks work; the real kernels stay in kernels/, untouched. Ends with `N passed, M failed`.
#include "emu.h"
#include "emu_warp.h"
#include <algorithm>
#include <cstdio>
#include <random>
#include <string>

#include "common.cuh"

static int failures = 0;
static int passes = 0;
static u64 A(const void* x) { return (u64)(uintptr_t)x; }

struct Args {
    u64 x;    // float[n] or u32[n] input
    u64 out;  // output
    u64 aux;  // u32 counter / histogram
    u32 n;
    u32 pad;
};

// ---- 1. missing barrier: block_sum_f64 without the __syncthreads between the warp
// leaders' writes to scratch and everybody's reads of it (common.cuh).
__device__ double planted_block_sum_no_barrier(double v, double* scratch) {
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 nwarps = (blockDim.x + 31u) >> 5;
    v = warp_sum_f64(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    // BUG: __syncthreads() missing here.
    double s = 0.0;
    for (u32 w = 0; w < nwarps; ++w) s += scratch[w];
    __syncthreads();
    return s;
}
extern "C" __global__ void planted_missing_barrier(Args a) {
    __shared__ double scratch[32];
    const float* x = (const float*)a.x;
    double s = 0.0;
    for (u32 j = threadIdx.x; j < a.n; j += blockDim.x) s += (double)fabsf(x[j]);
    s = planted_block_sum_no_barrier(s, scratch);
    if (threadIdx.x == 0) ((double*)a.out)[blockIdx.x] = s;
}

// ---- 2. racy histogram update: sel_pass's shared histogram with ++ instead of atomicAdd.
extern "C" __global__ void planted_racy_shared_hist(Args a) {
    __shared__ u32 hist[2048];
    for (u32 j = threadIdx.x; j < 2048; j += blockDim.x) hist[j] = 0;
    __syncthreads();
    const u32* x = (const u32*)a.x;
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < a.n; i += gridDim.x * blockDim.x)
        hist[digit_of(x[i], 0)] += 1u;  // BUG: not atomic
    __syncthreads();
    for (u32 j = threadIdx.x; j < 2048; j += blockDim.x)
        if (hist[j]) atomicAdd(&((u32*)a.aux)[j], hist[j]);
}

// ---- 2b. racy global flush: the per-block histograms added to the global one without
// atomics (two blocks write the same word in one launch).
extern "C" __global__ void planted_racy_global_flush(Args a) {
    __shared__ u32 hist[2048];
    for (u32 j = threadIdx.x; j < 2048; j += blockDim.x) hist[j] = 0;
    __syncthreads();
    const u32* x = (const u32*)a.x;
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < a.n; i += gridDim.x * blockDim.x)
        atomicAdd(&hist[digit_of(x[i], 0)], 1u);
    __syncthreads();
    u32* g = (u32*)a.aux;
    for (u32 j = threadIdx.x; j < 2048; j += blockDim.x)
        if (hist[j]) g[j] += hist[j];  // BUG: not atomic across blocks
}

// ---- 3. off-by-one on the tail: agg_zero's grid-stride loop with <= n.
extern "C" __global__ void planted_tail_off_by_one(Args a) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    float* out = (float*)a.out;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i <= a.n; i += stride)  // BUG: <=
        out[i] = 0.0f;
}

// ---- 4. wrong ballot mask: sign_apply's ballot with a half-warp mask, called by all lanes.
extern "C" __global__ void planted_ballot_mask(Args a) {
    const float* x = (const float*)a.x;
    u32* words = (u32*)a.out;
    const u32 lane = threadIdx.x & 31u;
    for (u64 base = (u64)blockIdx.x * blockDim.x + (threadIdx.x & ~31u); base < a.n; base += (u64)gridDim.x * blockDim.x) {
        const u64 i = base + lane;
        const bool neg = i < a.n && x[i] < 0.0f;
        const u32 m = __ballot_sync(0x0000FFFFu, neg);  // BUG: lanes 16..31 call it too
        if (lane == 0 && m) atomicOr(&words[base >> 5], m);
    }
}

// ---- 4b. divergent barrier: a __syncthreads only the lower half of the block reaches.
extern "C" __global__ void planted_divergent_barrier(Args a) {
    __shared__ float buf[256];
    const float* x = (const float*)a.x;
    if (threadIdx.x < blockDim.x / 2) {
        buf[threadIdx.x] = x[threadIdx.x];
        __syncthreads();  // BUG: the upper half never gets here (it returns)
        ((float*)a.out)[threadIdx.x] = buf[blockDim.x / 2 - 1 - threadIdx.x];
    }
}

// ---- 5. uninitialised shared read: block_sum_f64's final loop over all 32 scratch slots
// instead of the block's nwarps (only nwarps slots were written).
extern "C" __global__ void planted_uninit_shared(Args a) {
    __shared__ double scratch[32];
    const float* x = (const float*)a.x;
    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    double v = 0.0;
    for (u32 j = threadIdx.x; j < a.n; j += blockDim.x) v += (double)x[j];
    v = warp_sum_f64(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double s = 0.0;
    for (u32 w = 0; w < 32; ++w) s += scratch[w];  // BUG: w < nwarps
    if (threadIdx.x == 0) ((double*)a.out)[0] = s;
}

// ---- 6. order-dependent result: an unordered compaction (positions from an atomic
// counter) where the SPEC wants ascending indices. Race-free, so only the random
// schedule shows it, as a mismatch against the model.
extern "C" __global__ void planted_unordered_compaction(Args a) {
    const float* x = (const float*)a.x;
    u32* out = (u32*)a.out;
    u32* count = (u32*)a.aux;
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < a.n; i += gridDim.x * blockDim.x)
        if (x[i] < 0.0f) out[atomicAdd(count, 1u)] = i;  // BUG: order of the atomics
}

// ---- the cases --------------------------------------------------------------------------------

static std::vector<float> gauss(u32 n, u64 seed) {
    std::mt19937_64 r(seed);
    std::normal_distribution<float> nd;
    std::vector<float> v(n);
    for (auto& x : v) x = nd(r);
    return v;
}

// Runs `launch` and passes when check `kind` reported at least one error.
template <typename F>
static void expect(const char* name, int kind, F launch) {
    emu_dev_forget();
    emu_schedule_fixed();
    const unsigned long before = emu_san.count[kind], all = emu_san_errors();
    launch();
    const unsigned long got = emu_san.count[kind] - before;
    if (got == 0) {
        printf("FAIL planted %s: NOT reported by %s (%lu other reports)\n", name, emu_kind_name[kind],
               emu_san_errors() - all);
        ++failures;
        return;
    }
    ++passes;
    printf("ok   planted %s: reported by %s (%lu)\n", name, emu_kind_name[kind], got);
}

int main(int argc, char** argv) {
    emu_parse_args(argc, argv);
    const u32 n = 5000;
    auto xf = gauss(n, 1);
    std::vector<u32> xu(n);
    std::mt19937 r(2);
    for (auto& v : xu) v = r();
    std::vector<double> outd(64);
    std::vector<float> outf(n + 1);
    std::vector<u32> outu(n + 1), hist(2048);

    expect("missing barrier (block_sum_f64)", EMU_RACE, [&] {
        emu_dev(xf.data(), n, "x");
        emu_dev(outd.data(), 8, "out");
        emu_launch(planted_missing_barrier, 4, 256, Args{A(xf.data()), A(outd.data()), 0, n, 0});
    });
    expect("racy shared histogram (++ for atomicAdd)", EMU_RACE, [&] {
        emu_dev(xu.data(), n, "x");
        emu_dev(hist.data(), 2048, "hist");
        emu_launch(planted_racy_shared_hist, 4, 256, Args{A(xu.data()), 0, A(hist.data()), n, 0});
    });
    expect("racy global histogram flush (two blocks, one word)", EMU_RACE, [&] {
        emu_dev(xu.data(), n, "x");
        emu_dev(hist.data(), 2048, "hist");
        emu_launch(planted_racy_global_flush, 4, 256, Args{A(xu.data()), 0, A(hist.data()), n, 0});
    });
    expect("tail off-by-one (i <= n)", EMU_MEM, [&] {
        emu_dev(outf.data(), n, "out");  // the vector has one float of slack: still caught
        emu_launch(planted_tail_off_by_one, 4, 256, Args{0, A(outf.data()), 0, n, 0});
    });
    expect("wrong ballot mask (0x0000ffff called by 32 lanes)", EMU_SYNC, [&] {
        emu_dev(xf.data(), n, "x");
        emu_dev(outu.data(), (n + 31) / 32, "words");
        emu_launch(planted_ballot_mask, 2, 256, Args{A(xf.data()), A(outu.data()), 0, n, 0});
    });
    expect("divergent __syncthreads (half the block returns)", EMU_SYNC, [&] {
        emu_dev(xf.data(), n, "x");
        emu_dev(outf.data(), n, "out");
        emu_launch(planted_divergent_barrier, 1, 256, Args{A(xf.data()), A(outf.data()), 0, n, 0});
    });
    expect("uninitialised shared read (32 slots, 8 warps)", EMU_INIT, [&] {
        emu_dev(xf.data(), n, "x");
        emu_dev(outd.data(), 1, "out");
        emu_launch(planted_uninit_shared, 1, 256, Args{A(xf.data()), A(outd.data()), 0, n, 0});
    });
    // Global initcheck: a fresh (poisoned) allocation read before any write.
    expect("uninitialised global read (poisoned allocation)", EMU_INIT, [&] {
        emu_dev(xf.data(), n, "x", false);
        emu_dev(outd.data(), 8, "out");
        emu_launch(planted_missing_barrier, 1, 32, Args{A(xf.data()), A(outd.data()), 0, n, 0});
    });

    // The random schedule: the unordered compaction matches the ascending model under the
    // fixed schedule (so the fixed order alone hides the bug) and must not under random ones.
    {
        std::vector<u32> want;
        for (u32 i = 0; i < n; ++i)
            if (xf[i] < 0.0f) want.push_back(i);
        auto once = [&](bool random, u64 seed) {
            emu_dev_forget();
            if (random) emu_schedule_random(seed);
            else emu_schedule_fixed();
            u32 count = 0;
            std::fill(outu.begin(), outu.end(), 0u);
            emu_dev(xf.data(), n, "x");
            emu_dev(outu.data(), n, "out");
            emu_dev(&count, 1, "count");
            // One element per thread: blocks in order, threads round-robin = ascending.
            emu_launch(planted_unordered_compaction, (n + 255) / 256, 256,
                       Args{A(xf.data()), A(outu.data()), A(&count), n, 0});
            return count == want.size() && std::equal(want.begin(), want.end(), outu.begin());
        };
        const unsigned long e0 = emu_san_errors();
        const bool fixed_ok = once(false, 0);
        unsigned caught = 0;
        const unsigned seeds = 4;
        for (unsigned s = 1; s <= seeds; ++s) caught += !once(true, s);
        emu_schedule_fixed();
        if (emu_san_errors() != e0) {
            printf("FAIL planted unordered compaction: race-free but %lu sanitizer reports\n", emu_san_errors() - e0);
            ++failures;
        } else if (!caught) {
            printf("FAIL planted unordered compaction: no random schedule of %u shows the mismatch\n", seeds);
            ++failures;
        } else {
            ++passes;
            printf("ok   planted unordered compaction: mismatch under %u of %u random schedules (fixed schedule %s)\n",
                   caught, seeds, fixed_ok ? "matches: hides it" : "mismatches too");
        }
    }
    // The summary CI log readers look for: alone on the last line.
    printf("%d passed, %d failed\n", passes, failures);
    return failures ? 1 : 0;
}
