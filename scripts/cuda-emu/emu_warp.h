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
// The mask checks are done by the callers (a full mask for __match_any_sync, one mask per
// group of lanes for __reduce_or_sync), so the arrival is unmasked.
EMU_NS inline std::array<uint64_t, 32> emu_exchange(uint64_t v, uintptr_t pc) {
    EmuQuiet q;
    auto& slot = emu_block->slots[emu_warp()];
    auto& bar = emu_block->warps[emu_warp()];
    slot[emu_lane()] = v;
    emu_arrive(bar, pc, false);
    std::array<uint64_t, 32> all{};
    for (unsigned i = 0; i < bar.size; ++i) all[i] = slot[i];
    emu_arrive(bar, pc, false);
    return all;
}

EMU_NOINLINE EMU_NS inline unsigned __match_any_sync(unsigned mask, unsigned v) {
    const uintptr_t pc = EMU_PC();
    const auto all = emu_exchange(((uint64_t)mask << 32) | v, pc);
    EmuQuiet q;
    const unsigned n = emu_block->warps[emu_warp()].size;
    unsigned m = 0;
    for (unsigned i = 0; i < n; ++i) {
        if (((mask >> i) & 1u) && (unsigned)(all[i] >> 32) != mask) {
            emu_report(EMU_SYNC, pc, 3, "__match_any_sync: lanes disagree on the mask at " + emu_where(pc));
            break;
        }
        if (((mask >> i) & 1u) && (unsigned)all[i] == v) m |= 1u << i;
    }
    if (!((m >> emu_lane()) & 1u))
        emu_report(EMU_SYNC, pc, 4, "__match_any_sync called by a lane outside its mask at " + emu_where(pc));
    return m;
}

EMU_NOINLINE EMU_NS inline unsigned __reduce_or_sync(unsigned mask, unsigned v) {
    // Publish (mask, value) pairs; each lane ORs the values of the lanes in its mask, and
    // checks that they all passed the same mask (disjoint groups, each with its own mask).
    const uintptr_t pc = EMU_PC();
    const auto all = emu_exchange(((uint64_t)mask << 32) | v, pc);
    EmuQuiet q;
    const unsigned n = emu_block->warps[emu_warp()].size;
    if (!((mask >> emu_lane()) & 1u))
        emu_report(EMU_SYNC, pc, 5, "__reduce_or_sync called by a lane outside its mask at " + emu_where(pc));
    unsigned r = 0;
    for (unsigned i = 0; i < n; ++i) {
        if (!((mask >> i) & 1u)) continue;
        if ((unsigned)(all[i] >> 32) != mask) {
            emu_report(EMU_SYNC, pc, 6, "__reduce_or_sync: lanes of one group disagree on the mask at " + emu_where(pc));
            break;
        }
        r |= (unsigned)all[i];
    }
    return r;
}
