// A tiny CPU emulation of the CUDA execution model, enough to run gradsift's kernels
// without a GPU: every thread of a block is a ucontext fiber on one OS thread,
// __syncthreads and the warp intrinsics are barriers that yield to a round-robin
// scheduler (warp intrinsics exchange through per-warp slots between two warp barriers),
// and atomics are std::atomic_ref. Blocks run one after another, so `static` stands in for
// __shared__ (every kernel initialises its shared memory before reading it).
//
// It checks the algorithms and the index arithmetic, not performance or memory-model
// subtleties a real GPU could expose (e.g. missing fences between blocks).
#pragma once
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <ucontext.h>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// One fiber per CUDA thread, all on one OS thread: a barrier is a yield back to the
// round-robin scheduler until every member of the group has arrived.
struct EmuFiber {
    ucontext_t ctx;
    dim3 tid;
    bool done = false;
};
struct EmuGroup {
    unsigned size = 0, arrived = 0, gen = 0;
};
struct EmuBlock {
    std::vector<EmuFiber> fibers;
    EmuGroup block;
    std::vector<EmuGroup> warps;
    std::vector<std::array<uint64_t, 32>> slots;
    ucontext_t sched;
};
inline EmuBlock* emu_block = nullptr;
inline EmuFiber* emu_cur = nullptr;
inline dim3 blockIdx, blockDim, gridDim;
#define threadIdx (emu_cur->tid)

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(n)

inline void emu_yield() { swapcontext(&emu_cur->ctx, &emu_block->sched); }

inline void emu_arrive(EmuGroup& g) {
    unsigned my = g.gen;
    if (++g.arrived == g.size) {
        g.arrived = 0;
        ++g.gen;
        return;
    }
    while (g.gen == my) emu_yield();
}

inline void __syncthreads() { emu_arrive(emu_block->block); }

inline unsigned emu_lane() { return threadIdx.x & 31u; }
inline unsigned emu_warp() { return threadIdx.x >> 5; }

template <typename T>
inline uint64_t emu_bits(T v) {
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
inline T emu_from(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

// Every lane publishes, all wait, each reads lane `src`, all wait again (slot reuse).
template <typename T>
inline T emu_shfl(T v, int src, bool valid) {
    auto& slot = emu_block->slots[emu_warp()];
    auto& bar = emu_block->warps[emu_warp()];
    slot[emu_lane()] = emu_bits(v);
    emu_arrive(bar);
    T r = valid ? emu_from<T>(slot[src]) : v;
    emu_arrive(bar);
    return r;
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned o) {
    int l = (int)emu_lane();
    return emu_shfl(v, l - (int)o, l >= (int)o);
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned o) {
    int l = (int)emu_lane();
    return emu_shfl(v, l + (int)o, l + (int)o < 32);
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src) {
    return emu_shfl(v, src, true);
}
inline unsigned __ballot_sync(unsigned, bool p) {
    auto& slot = emu_block->slots[emu_warp()];
    auto& bar = emu_block->warps[emu_warp()];
    slot[emu_lane()] = p ? 1 : 0;
    emu_arrive(bar);
    unsigned m = 0;
    for (unsigned i = 0; i < bar.size; ++i) m |= (unsigned)slot[i] << i;
    emu_arrive(bar);
    return m;
}

inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
inline unsigned atomicOr(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_or(v); }
inline unsigned atomicMin(unsigned* p, unsigned v) {
    std::atomic_ref<unsigned> a(*p);
    unsigned cur = a.load();
    while (v < cur && !a.compare_exchange_weak(cur, v)) {
    }
    return cur;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline unsigned __float_as_uint(float f) { return emu_from<unsigned>(emu_bits(f)); }
inline float __int_as_float(int i) { return emu_from<float>(emu_bits(i)); }
inline double __longlong_as_double(long long i) { return emu_from<double>(emu_bits(i)); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
using std::fabs;
using std::fmax;
inline float fabsf(float x) { return std::fabs(x); }
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float fminf(float a, float b) { return std::fmin(a, b); }
inline float copysignf(float a, float b) { return std::copysign(a, b); }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }

// Launches `kernel(args)` over grid x block, blocks sequentially.
inline std::vector<std::unique_ptr<char[]>> emu_stacks;
constexpr size_t EMU_STACK = 128 * 1024;

template <typename A>
struct EmuEntry {
    static inline void (*kernel)(A) = nullptr;
    static inline const A* args = nullptr;
    static void run() {
        kernel(*args);
        emu_cur->done = true;
        // Returning lands in uc_link (the scheduler).
    }
};

template <typename A>
inline void emu_launch(void (*kernel)(A), unsigned grid, unsigned block, const A& args) {
    if (grid == 0) return;
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    while (emu_stacks.size() < block) emu_stacks.emplace_back(new char[EMU_STACK]);
    EmuEntry<A>::kernel = kernel;
    EmuEntry<A>::args = &args;
    for (unsigned b = 0; b < grid; ++b) {
        EmuBlock eb;
        eb.fibers.resize(block);
        eb.block.size = block;
        unsigned nw = (block + 31) / 32;
        eb.warps.resize(nw);
        for (unsigned w = 0; w < nw; ++w) eb.warps[w].size = std::min(32u, block - 32 * w);
        eb.slots.resize(nw);
        emu_block = &eb;
        blockIdx = {b, 0, 0};
        for (unsigned t = 0; t < block; ++t) {
            EmuFiber& f = eb.fibers[t];
            f.tid = {t, 0, 0};
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = emu_stacks[t].get();
            f.ctx.uc_stack.ss_size = EMU_STACK;
            f.ctx.uc_link = &eb.sched;
            makecontext(&f.ctx, (void (*)())EmuEntry<A>::run, 0);
        }
        for (bool live = true; live;) {
            live = false;
            for (auto& f : eb.fibers) {
                if (f.done) continue;
                emu_cur = &f;
                swapcontext(&eb.sched, &f.ctx);
                live |= !f.done;
            }
        }
        emu_block = nullptr;
        emu_cur = nullptr;
    }
}
