// Warp intrinsics of sm_70/sm_80 the kernels use beyond emu.h: __match_any_sync and
// __reduce_or_sync. Included by the harnesses right after emu.h (kept apart so emu.h's own
// evolution does not collide with these additions).
//
// Both are emulated for converged calls: every lane of the warp calls them at the same
// point (which is how the kernels use them, see warp_hist_add / warp_mark_bits in
// kernels/common.cuh). A lane outside the mask it passes, or a mask naming lanes that ask
// with another mask, is reported and aborts: that would be undefined on the GPU.
#pragma once
#include "emu.h"
#include <cstdio>
#include <cstdlib>

// Every lane publishes `v`, all wait, each reads the whole warp's values, all wait again.
inline std::array<uint64_t, 32> emu_exchange(uint64_t v) {
    auto& slot = emu_block->slots[emu_warp()];
    auto& bar = emu_block->warps[emu_warp()];
    slot[emu_lane()] = v;
    emu_arrive(bar);
    std::array<uint64_t, 32> all{};
    for (unsigned i = 0; i < bar.size; ++i) all[i] = slot[i];
    emu_arrive(bar);
    return all;
}

inline unsigned __match_any_sync(unsigned mask, unsigned v) {
    const auto all = emu_exchange(v);
    const unsigned n = emu_block->warps[emu_warp()].size;
    unsigned m = 0;
    for (unsigned i = 0; i < n; ++i)
        if (((mask >> i) & 1u) && (unsigned)all[i] == v) m |= 1u << i;
    if (!((m >> emu_lane()) & 1u)) {
        fprintf(stderr, "emu: __match_any_sync called by lane %u outside its mask %08x\n", emu_lane(), mask);
        abort();
    }
    return m;
}

inline unsigned __reduce_or_sync(unsigned mask, unsigned v) {
    // Publish (mask, value) pairs; each lane ORs the values of the lanes in its mask, and
    // checks that they all passed the same mask (disjoint groups, each with its own mask).
    const auto all = emu_exchange(((uint64_t)mask << 32) | v);
    const unsigned n = emu_block->warps[emu_warp()].size;
    if (!((mask >> emu_lane()) & 1u)) {
        fprintf(stderr, "emu: __reduce_or_sync called by lane %u outside its mask %08x\n", emu_lane(), mask);
        abort();
    }
    unsigned r = 0;
    for (unsigned i = 0; i < n; ++i) {
        if (!((mask >> i) & 1u)) continue;
        if ((unsigned)(all[i] >> 32) != mask) {
            fprintf(stderr, "emu: __reduce_or_sync lanes %u and %u disagree on the mask\n", emu_lane(), i);
            abort();
        }
        r |= (unsigned)all[i];
    }
    return r;
}
