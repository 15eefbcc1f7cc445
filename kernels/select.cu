// Selection of the m smallest (key, index) pairs, SPEC §1-4: top-r on magnitude keys, and
// random-k on Philox keys of the candidates.
//
// Big groups (grid-wide, in the spirit of AIR top-k): three radix passes of 11/11/10 bits,
// each a per-block shared histogram flushed to a global one, then `sel_find` scans it for
// the pivot digit. Elements whose digit lies below the pivot are certainly selected and
// are marked in a bitmap the pass after; once the elements sharing the pivot prefix fit
// the candidate buffer they are copied there and later passes read only the buffer. The
// last pass marks the ties at the exact pivot key in a second bitmap; an ordered
// compaction (count / scan / emit over the bitmaps) then yields ascending indices and
// keeps the lowest-indexed `need` ties, which is the tie rule of SPEC §1.
//
// Every big group of a step runs each of these passes in the same launch (blocks are
// dealt out group by group, `SelArgs::bpg` to each), so a step costs the same dozen
// launches for one big layer or two hundred.
//
// Block-sized groups (per-layer mode: up to 2^16 elements by default; global mode: up to
// 2^15): one block per group does the same digits with a shared histogram and an in-order
// block scan for ties and output positions, all of them in one launch.
#ifndef GRADSIFT_NVRTC
#include "common.cuh"
#include "select.cuh"
#endif

// A big group as the batched passes read it (src/cuda/abi.rs `BigGroup`): its range, counts,
// payload slot and its slices of the shared scratch buffers.
struct BigGroup {
    u32 lo, len, r, k, out_off;
    float scale;
    u32 cand_off, cand_cap;  // its candidate buffer
    u32 list_off;            // its top-r list (rTop-k groups)
    u32 tile_off, ntiles;    // its compaction tiles
    u32 pad;
};

// Which selection of each group a batched launch runs. A group takes part only in the
// stages its counts call for; the blocks of the others return at once.
#define STAGE_FIRST 0u  // top-r over the range (random-k over it when r = n_g)
#define STAGE_LIST 1u   // rTop-k's random-k over the top-r list
#define STAGE_ALL 2u    // groups that send everything (k = n_g): emit_range

__device__ __forceinline__ bool big_two_stage(const BigGroup& g) { return g.k < g.r && g.r < g.len; }

__device__ __forceinline__ bool big_in_stage(const BigGroup& g, u32 stage) {
    return stage == STAGE_FIRST ? g.k < g.len : stage == STAGE_LIST ? big_two_stage(g) : g.k == g.len;
}

// The group that a block of a batched launch serves (`bpg` blocks to a group), and the
// block's place among them.
struct BigBlock {
    BigGroup g;
    u32 gi, bx;
};

__device__ __forceinline__ BigBlock big_block(u64 groups, u32 bpg) {
    BigBlock b;
    b.gi = blockIdx.x / bpg;
    b.g = ((const BigGroup*)groups)[b.gi];
    b.bx = blockIdx.x - b.gi * bpg;
    return b;
}

// Every big group of a step goes through each pass in one launch: block b serves group
// b / bpg, as block b % bpg of bpg, so a 200-layer step costs the launches of one group.
// The bitmaps span all n elements; neighbouring groups share their boundary words, which
// is why marks are atomic ORs of in-range bits and the compaction masks to the range.
struct SelArgs {
    StepBuffers b;   // p lives in the next residual buffer
    u64 groups;      // BigGroup[ngroups]
    u64 state;       // SelState[ngroups]
    u64 cand;        // u32* candidate buffers (BigGroup::cand_off)
    u64 list;        // u32* top-r lists (BigGroup::list_off)
    u64 defbits;     // u32* bitmap of certainly selected elements
    u64 tiebits;     // u32* bitmap of elements equal to the pivot key
    u32 ngroups;
    u32 bpg;         // blocks per group
    u32 stage;       // STAGE_FIRST or STAGE_LIST
    u32 worker, t_lo, t_hi, s_lo, s_hi;
    int pass;        // 0..2: histogram digit `pass`; 3: mark
    u32 pad;
};

// One group's selection as a block of a batched launch sees it.
struct SelView {
    u32 lo, len;       // the group's range (the bitmaps' range)
    u32 m;             // how many to select, 1 <= m < source size
    u32 kind;          // 0: magnitude key of p, 1: Philox key
    const u32* list;   // source list (random-k over the top-r list), nullptr: the range
    u32 list_len;
    u32* cand;
    u32 cand_cap;
    SelState* s;
    u32 bx, nb;        // this block within the group, and the group's blocks
    bool active;
};

__device__ __forceinline__ SelView sel_view(const SelArgs& a) {
    const BigBlock blk = big_block(a.groups, a.bpg);
    const BigGroup& g = blk.g;
    SelView v;
    v.lo = g.lo;
    v.len = g.len;
    v.bx = blk.bx;
    v.nb = a.bpg;
    v.s = (SelState*)a.state + blk.gi;
    v.cand = (u32*)a.cand + g.cand_off;
    v.cand_cap = g.cand_cap;
    v.active = big_in_stage(g, a.stage);
    v.list = nullptr;
    v.list_len = 0;
    if (a.stage == STAGE_LIST) {
        v.m = g.k;
        v.kind = 1;
        v.list = (const u32*)a.list + g.list_off;
        v.list_len = g.r;
    } else if (g.r < g.len) {
        v.m = g.r;
        v.kind = 0;
    } else {
        v.m = g.k;
        v.kind = 1;
    }
    return v;
}

__device__ __forceinline__ u32 sel_key(const SelArgs& a, u32 kind, const float* p, u32 i) {
    return kind == 0 ? magnitude_key(p[i]) : philox_key(i, a.worker, a.t_lo, a.t_hi, a.s_lo, a.s_hi);
}

// One block per group.
extern "C" __global__ void __launch_bounds__(1024) sel_reset(SelArgs a) {
    const SelView v = sel_view(a);
    if (!v.active) return;
    SelState* s = v.s;
    for (u32 j = threadIdx.x; j < 2048; j += blockDim.x) s->hist[j] = 0;
    if (threadIdx.x == 0) {
        s->prefix = 0;
        s->mask = 0;
        s->prev_prefix = 0;
        s->prev_mask = 0;
        s->need = v.m;
        s->count = 0;
        s->cand_mode = 0;
        s->cand_len = 0;
    }
}

// The bits of word `w` that lie in [lo, lo + len).
__device__ __forceinline__ u32 range_word_mask(u64 w, u32 lo, u32 len) {
    const u64 start = w * 32, end = (u64)lo + len;
    u32 m = 0xFFFFFFFFu;
    if (start < lo) m &= 0xFFFFFFFFu << (lo - start);
    if (start + 32 > end) m &= (end <= start) ? 0u : (0xFFFFFFFFu >> (start + 32 - end));
    return m;
}

// Clears each group's bits. A boundary word shared with a neighbour, which the same launch
// may be clearing too, loses only this group's bits (atomic AND); the others are stored.
extern "C" __global__ void __launch_bounds__(256) sel_clear_bits(SelArgs a) {
    const SelView v = sel_view(a);
    if (!v.active || v.len == 0) return;
    const u64 w0 = v.lo >> 5, w1 = ((u64)v.lo + v.len - 1) >> 5;
    const u64 stride = (u64)v.nb * blockDim.x;
    u32* d = (u32*)a.defbits;
    u32* t = (u32*)a.tiebits;
    for (u64 w = w0 + (u64)v.bx * blockDim.x + threadIdx.x; w <= w1; w += stride) {
        const u32 m = range_word_mask(w, v.lo, v.len);
        if (m == 0xFFFFFFFFu) {
            d[w] = 0;
            t[w] = 0;
        } else {
            atomicAnd(&d[w], ~m);
            atomicAnd(&t[w], ~m);
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) sel_pass(SelArgs a) {
    __shared__ u32 hist[2048];
    const SelView v = sel_view(a);
    if (!v.active) return;  // block-uniform, before any barrier
    SelState* s = v.s;
    const StepStatus* st = (const StepStatus*)a.b.status;
    const float* p = next_residual(a.b, st->cur);
    const int d = a.pass;
    const bool do_hist = d < 3;
    const u32 nbins = do_hist ? (1u << digit_bits(d)) : 0u;
    for (u32 j = threadIdx.x; j < nbins; j += blockDim.x) hist[j] = 0;
    __syncthreads();
    const u32 mode = s->cand_mode;
    const u32 prefix = s->prefix, mask = s->mask, pp = s->prev_prefix, pm = s->prev_mask;
    u32* defbits = (u32*)a.defbits;
    u32* tiebits = (u32*)a.tiebits;
    u32* cand = v.cand;
    const u32 lane = threadIdx.x & 31u;
    const u64 warp_id = ((u64)v.bx * blockDim.x + threadIdx.x) >> 5;
    const u64 nwarps = ((u64)v.nb * blockDim.x) >> 5;
    const bool sparse = mode == 2 || v.list != nullptr;
    const u32* src = mode == 2 ? cand : v.list;
    const u64 cnt = mode == 2 ? s->cand_len : v.list_len;
    // Everything below runs warp-uniformly: every ballot sees all 32 lanes. `word` is the
    // bitmap word of 32 consecutive, aligned elements (range source) or ~0 (sparse source).
    auto visit = [&](bool valid, u32 i, u32 k, u64 word) {
        bool def = false, tie = false, app = false, counted = false;
        if (valid) {
            if (d == 0) {
                counted = true;
            } else if ((k & pm) == pp) {
                const u32 km = k & mask;
                if (km < prefix) {
                    def = true;
                } else if (km == prefix) {
                    if (d == 3) {
                        tie = true;
                    } else {
                        counted = true;
                        app = mode == 1;
                    }
                }
            }
        }
        if (do_hist) warp_hist_add(hist, digit_of(k, d), counted);
        if (d == 0) return;
        if (word == ~0ull) {
            // Sparse source (list or candidates): lanes sharing a word OR their bits first.
            warp_mark_bits(defbits, i, def);
            warp_mark_bits(tiebits, i, tie);
        } else {
            const u32 dm = __ballot_sync(0xFFFFFFFFu, def);
            const u32 tm = __ballot_sync(0xFFFFFFFFu, tie);
            if (lane == 0) {
                if (dm) atomicOr(&defbits[word], dm);
                if (tm) atomicOr(&tiebits[word], tm);
            }
        }
        const u32 am = __ballot_sync(0xFFFFFFFFu, app);
        if (am) {
            u32 at = 0;
            if (lane == 0) at = atomicAdd(&s->cand_len, (u32)__popc(am));
            at = __shfl_sync(0xFFFFFFFFu, at, 0);
            if (app) cand[at + __popc(am & ((1u << lane) - 1u))] = i;
        }
    };
    if (sparse) {
        for (u64 base = warp_id * 32; base < cnt; base += nwarps * 32) {
            const u64 x = base + lane;
            const bool valid = x < cnt;
            const u32 i = valid ? src[x] : 0u;
            visit(valid, i, valid ? sel_key(a, v.kind, p, i) : 0u, ~0ull);
        }
    } else {
        // Four aligned words per warp and iteration: four loads in flight per thread.
        const u64 begin = v.lo & ~31u, end = (u64)v.lo + v.len;
        for (u64 base = begin + warp_id * 128; base < end; base += nwarps * 128) {
            u32 kq[4];
            bool vq[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const u64 x = base + 32 * q + lane;
                vq[q] = x >= v.lo && x < end;
                kq[q] = vq[q] ? sel_key(a, v.kind, p, (u32)x) : 0u;
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) visit(vq[q], (u32)(base + 32 * q + lane), kq[q], (base >> 5) + q);
        }
    }
    if (do_hist) {
        __syncthreads();
        for (u32 j = threadIdx.x; j < nbins; j += blockDim.x)
            if (hist[j]) atomicAdd(&s->hist[j], hist[j]);
    }
}

// One block per group: the pivot digit of pass `a.pass` from the group's histogram.
extern "C" __global__ void __launch_bounds__(1024) sel_find(SelArgs a) {
    __shared__ u32 scratch[32];
    const SelView v = sel_view(a);
    if (!v.active) return;
    SelState* s = v.s;
    const int d = a.pass;
    const u32 nbins = 1u << digit_bits(d);
    const u32 need = d == 0 ? v.m : s->need;
    u32 pivot, below, count;
    find_pivot(s->hist, nbins, need, scratch, &pivot, &below, &count);
    if (threadIdx.x == 0) {
        if (pivot == GS_INF_U32) pivot = 0;  // unreachable when 1 <= need <= total
        s->prev_prefix = s->prefix;
        s->prev_mask = s->mask;
        s->prefix |= pivot << digit_shift(d);
        s->mask |= digit_mask(d);
        s->need = need - below;
        s->count = count;
        if (s->cand_mode == 1) {
            s->cand_mode = 2;
        } else if (s->cand_mode == 0 && d < 2 && count <= v.cand_cap) {
            s->cand_mode = 1;
            s->cand_len = 0;
        }
    }
    for (u32 j = threadIdx.x; j < 2048; j += blockDim.x) s->hist[j] = 0;
}

// ---- Ordered compaction of the two bitmaps over each group's range ---------------------

#define TILE_WORDS 256u

struct CompactArgs {
    StepBuffers b;
    u64 groups;      // BigGroup[ngroups]
    u64 state;       // SelState[ngroups] (their `need`: ties to keep)
    u64 defbits, tiebits;
    u64 tiles;       // u32 pairs per tile: (def, tie) counts, then their exclusive prefixes
    u64 list;        // u32* top-r lists (a two-stage group's first compaction fills its own)
    u64 out_idx;     // u32* payload indices
    u64 out_val;     // float* payload values
    u32 ngroups;
    u32 bpg;         // blocks per group
    u32 stage;       // STAGE_FIRST, STAGE_LIST or STAGE_ALL
    u32 dtype;
    u32 to_list;     // 1: every group's output is its list (top-r alone, src/cuda/select.rs)
    u32 pad;
};

// One group's compaction as a block of a batched launch sees it.
struct CompactView {
    u32 lo, len, ntiles, out_off;
    float scale;
    u32* tiles;
    u32* out_list;
    const SelState* s;
    u32 bx, nb;
    bool payload;  // false: the first stage of rTop-k, whose output is the top-r list
    bool active;
};

__device__ __forceinline__ CompactView compact_view(const CompactArgs& a) {
    const BigBlock blk = big_block(a.groups, a.bpg);
    const BigGroup& g = blk.g;
    CompactView v;
    v.lo = g.lo;
    v.len = g.len;
    v.ntiles = g.ntiles;
    v.out_off = g.out_off;
    v.scale = g.scale;
    v.tiles = (u32*)a.tiles + 2 * (u64)g.tile_off;
    v.out_list = (u32*)a.list + g.list_off;
    v.s = (const SelState*)a.state + blk.gi;
    v.bx = blk.bx;
    v.nb = a.bpg;
    v.payload = !a.to_list && (a.stage != STAGE_FIRST || !big_two_stage(g));
    v.active = big_in_stage(g, a.stage);
    return v;
}

__device__ __forceinline__ void load_tile_words(const CompactArgs& a, const CompactView& v, u32 tile, u32* dw,
                                                u32* tw) {
    const u64 w0 = v.lo >> 5, w1 = ((u64)v.lo + v.len - 1) >> 5;
    const u64 w = w0 + (u64)tile * TILE_WORDS + threadIdx.x;
    *dw = 0;
    *tw = 0;
    if (threadIdx.x < TILE_WORDS && w <= w1) {
        const u32 m = range_word_mask(w, v.lo, v.len);
        *dw = ((const u32*)a.defbits)[w] & m;
        *tw = ((const u32*)a.tiebits)[w] & m;
    }
}

// Each block counts tiles bx, bx + bpg, ... of its group.
extern "C" __global__ void __launch_bounds__(256) compact_count(CompactArgs a) {
    __shared__ u32 scratch[32];
    const CompactView v = compact_view(a);
    if (!v.active) return;
    for (u32 tile = v.bx; tile < v.ntiles; tile += v.nb) {
        u32 dw, tw;
        load_tile_words(a, v, tile, &dw, &tw);
        const u32 dc = block_sum_u32(__popc(dw), scratch);
        const u32 tc = block_sum_u32(__popc(tw), scratch);
        if (threadIdx.x == 0) {
            v.tiles[2 * tile] = dc;
            v.tiles[2 * tile + 1] = tc;
        }
    }
}

// One block per group: exclusive prefix sums of the per-tile counts, in place.
extern "C" __global__ void __launch_bounds__(1024) compact_scan(CompactArgs a) {
    __shared__ u32 scratch[32];
    const CompactView v = compact_view(a);
    if (!v.active) return;
    u32* t = v.tiles;
    u32 carry_d = 0, carry_t = 0;
    for (u32 c = 0; c < v.ntiles; c += blockDim.x) {
        const u32 j = c + threadIdx.x;
        const u32 dv = j < v.ntiles ? t[2 * j] : 0u;
        const u32 tv = j < v.ntiles ? t[2 * j + 1] : 0u;
        u32 dtot, ttot;
        const u32 de = block_exclusive_scan(dv, scratch, &dtot);
        const u32 te = block_exclusive_scan(tv, scratch, &ttot);
        if (j < v.ntiles) {
            t[2 * j] = carry_d + de;
            t[2 * j + 1] = carry_t + te;
        }
        carry_d += dtot;
        carry_t += ttot;
    }
}

__device__ __forceinline__ void emit_one(const CompactArgs& a, const CompactView& v, float* p, float* un, u32 pos,
                                         u32 i) {
    if (!v.payload) {
        v.out_list[pos] = i;
        return;
    }
    const float pi = p[i];
    const float x = quantize(__fmul_rn(pi, v.scale), a.dtype);
    note_sent_value(a.b, pi, x, i);
    ((u32*)a.out_idx)[v.out_off + pos] = i;
    ((float*)a.out_val)[v.out_off + pos] = x;
    p[i] = __fsub_rn(pi, x);
    if (un) un[i] = 0.0f;
}

// Lane per bit: warp w of the block owns the tile's words 32w..32w+31, one per lane (the
// lane that loaded it). For each of its non-empty words the warp broadcasts the word and
// its prefix counts, and lane b places bit b with __popc of the lower lanes' bits, so the
// stores to p, un, out_idx and out_val of a word are 32 consecutive elements.
extern "C" __global__ void __launch_bounds__(256) compact_emit(CompactArgs a) {
    __shared__ u32 scratch[32];
    const CompactView v = compact_view(a);
    if (!v.active) return;
    const StepStatus* st = (const StepStatus*)a.b.status;
    const u32 cur = st->cur;
    float* p = next_residual(a.b, cur);
    float* un = a.b.u0 ? next_momentum(a.b, cur) : nullptr;
    const u32 need = v.s->need;
    const u32 lane = threadIdx.x & 31u;
    const u32 lower = (1u << lane) - 1u;
    for (u32 tile = v.bx; tile < v.ntiles; tile += v.nb) {
        u32 dw, tw;
        load_tile_words(a, v, tile, &dw, &tw);
        u32 dtot, ttot;
        u32 dbefore = block_exclusive_scan(__popc(dw), scratch, &dtot);
        u32 tbefore = block_exclusive_scan(__popc(tw), scratch, &ttot);
        dbefore += v.tiles[2 * tile];
        tbefore += v.tiles[2 * tile + 1];
        const u64 w_lane0 = (u64)(v.lo >> 5) + (u64)tile * TILE_WORDS + (threadIdx.x - lane);
        u32 busy = __ballot_sync(0xFFFFFFFFu, (dw | tw) != 0u);
        while (busy) {  // warp-uniform
            const u32 q = __ffs(busy) - 1;
            busy &= busy - 1;
            const u32 wd = __shfl_sync(0xFFFFFFFFu, dw, q);
            const u32 wt = __shfl_sync(0xFFFFFFFFu, tw, q);
            const u32 db = __shfl_sync(0xFFFFFFFFu, dbefore, q) + __popc(wd & lower);
            const u32 tb = __shfl_sync(0xFFFFFFFFu, tbefore, q) + __popc(wt & lower);
            const u32 i = (u32)((w_lane0 + q) * 32 + lane);
            if ((wd >> lane) & 1u) {
                emit_one(a, v, p, un, db + min(tb, need), i);
            } else if (((wt >> lane) & 1u) && tb < need) {
                emit_one(a, v, p, un, db + tb, i);
            }
        }
    }
}

// Big groups that send everything (k = n_g, stage STAGE_ALL): every element, in order.
extern "C" __global__ void __launch_bounds__(256) emit_range(CompactArgs a) {
    const CompactView v = compact_view(a);
    if (!v.active) return;
    const StepStatus* st = (const StepStatus*)a.b.status;
    const u32 cur = st->cur;
    float* p = next_residual(a.b, cur);
    float* un = a.b.u0 ? next_momentum(a.b, cur) : nullptr;
    const u64 stride = (u64)v.nb * blockDim.x;
    for (u64 j = (u64)v.bx * blockDim.x + threadIdx.x; j < v.len; j += stride)
        emit_one(a, v, p, un, (u32)j, v.lo + (u32)j);
}

// ---- Block-sized groups: one block each ------------------------------------------------

struct SmallGroup {
    u32 lo, len, r, k, out_off;
    float scale;
};

struct SmallArgs {
    StepBuffers b;
    u64 groups;   // SmallGroup*
    u64 out_idx;  // u32*
    u64 out_val;  // float*
    u64 member;   // u32* bitmap over all n elements, zeroed before the launch: top-r sets
    u32 worker, t_lo, t_hi, s_lo, s_hi;
    u32 dtype;
};

struct SmallCtx {
    const float* p;
    float* pw;
    float* un;
    u32 worker, t_lo, t_hi, s_lo, s_hi;
};

__device__ __forceinline__ u32 small_key(const SmallCtx& c, u32 kind, u32 i) {
    return kind == 0 ? magnitude_key(c.p[i]) : philox_key(i, c.worker, c.t_lo, c.t_hi, c.s_lo, c.s_hi);
}

// Membership in the top-r bitmap. Neighbouring groups share the bitmap's boundary words,
// and another block may atomicOr its own bits into such a word while this block reads it:
// a volatile (strong) load, so that read does not race the atomics (PTX memory model);
// the bits read here are only ever written by this block, before a __syncthreads.
__device__ __forceinline__ bool member_bit(const u32* member, u32 i) {
    return (((const volatile u32*)member)[i >> 5] >> (i & 31u)) & 1u;
}

// The exact key T of the m-th smallest (key, index) over the group (restricted to the
// `member` bitmap when given) and how many elements equal to T are taken.
__device__ void block_select(const SmallCtx& c, u32 kind, u32 lo, u32 len, const u32* member,
                             u32 m, u32* hist, u32* scratch, u32* T, u32* need_out) {
    u32 prefix = 0, mask = 0, need = m;
    for (int d = 0; d < 3; ++d) {
        const u32 nbins = 1u << digit_bits(d);
        for (u32 j = threadIdx.x; j < nbins; j += blockDim.x) hist[j] = 0;
        __syncthreads();
        // Warp-uniform loop: the histogram combines a warp's lanes.
        for (u32 base = 0; base < len; base += blockDim.x) {
            const u32 j = base + threadIdx.x;
            const u32 i = lo + j;
            const bool in = j < len && (!member || member_bit(member, i));
            const u32 k = in ? small_key(c, kind, i) : 0u;
            warp_hist_add(hist, digit_of(k, d), in && (k & mask) == prefix);
        }
        __syncthreads();
        u32 pivot, below, count;
        find_pivot(hist, nbins, need, scratch, &pivot, &below, &count);
        if (pivot == GS_INF_U32) pivot = 0;
        prefix |= pivot << digit_shift(d);
        mask |= digit_mask(d);
        need -= below;
    }
    *T = prefix;
    *need_out = need;
}

// In index order: selected(i) = key < T, or key == T among the first `need` such. Either
// records the selection in `out_member` or emits the payload entries.
__device__ void block_ordered(const SmallCtx& c, const SmallArgs& a, const SmallGroup& g, u32 kind,
                              const u32* member, u32 T, u32 need, u32* out_member, u32* scratch) {
    u32 tie_base = 0, sel_base = 0;
    for (u32 base = 0; base < g.len; base += blockDim.x) {
        const u32 j = base + threadIdx.x;
        const u32 i = g.lo + j;
        const bool in = j < g.len && (!member || member_bit(member, i));
        const u32 k = in ? small_key(c, kind, i) : 0u;
        const bool def = in && k < T;
        const bool tie = in && k == T;
        u32 ttot, stot;
        const u32 trank = tie_base + block_exclusive_scan(tie ? 1u : 0u, scratch, &ttot);
        const bool sel = def || (tie && trank < need);
        const u32 pos = sel_base + block_exclusive_scan(sel ? 1u : 0u, scratch, &stot);
        if (out_member) {
            // Neighbouring groups may share the word: atomic, one per word and warp.
            warp_mark_bits(out_member, i, sel);
        } else if (sel) {
            const float pi = c.p[i];
            const float v = quantize(__fmul_rn(pi, g.scale), a.dtype);
            note_sent_value(a.b, pi, v, i);
            ((u32*)a.out_idx)[g.out_off + pos] = i;
            ((float*)a.out_val)[g.out_off + pos] = v;
            c.pw[i] = __fsub_rn(pi, v);
            if (c.un) c.un[i] = 0.0f;
        }
        tie_base += ttot;
        sel_base += stot;
    }
}

extern "C" __global__ void __launch_bounds__(1024) select_small(SmallArgs a) {
    __shared__ u32 hist[2048];
    __shared__ u32 scratch[32];
    u32* member = (u32*)a.member;
    const SmallGroup g = ((const SmallGroup*)a.groups)[blockIdx.x];
    const StepStatus* st = (const StepStatus*)a.b.status;
    const u32 cur = st->cur;
    SmallCtx c;
    c.pw = next_residual(a.b, cur);
    c.p = c.pw;
    c.un = a.b.u0 ? next_momentum(a.b, cur) : nullptr;
    c.worker = a.worker;
    c.t_lo = a.t_lo;
    c.t_hi = a.t_hi;
    c.s_lo = a.s_lo;
    c.s_hi = a.s_hi;
    if (g.k == 0) return;
    const bool do_top = g.r < g.len;
    const bool do_rand = g.k < g.r;
    if (!do_top && !do_rand) {
        // Everything is sent: every key is below 0xFFFFFFFF (magnitude keys are 31-bit).
        block_ordered(c, a, g, 0, nullptr, GS_INF_U32, 0, nullptr, scratch);
        return;
    }
    const u32* mem = nullptr;
    if (do_top) {
        u32 T, need;
        block_select(c, 0, g.lo, g.len, nullptr, g.r, hist, scratch, &T, &need);
        if (!do_rand) {
            block_ordered(c, a, g, 0, nullptr, T, need, nullptr, scratch);
            return;
        }
        block_ordered(c, a, g, 0, nullptr, T, need, member, scratch);
        __syncthreads();
        mem = member;
    }
    u32 T, need;
    block_select(c, 1, g.lo, g.len, mem, g.k, hist, scratch, &T, &need);
    block_ordered(c, a, g, 1, mem, T, need, nullptr, scratch);
}

static_assert(sizeof(SelState) == 8224, "SelState layout");
static_assert(sizeof(BigGroup) == 48, "BigGroup layout");
static_assert(sizeof(SelArgs) == 136, "SelArgs layout");
static_assert(sizeof(CompactArgs) == 136, "CompactArgs layout");
static_assert(sizeof(SmallGroup) == 24, "SmallGroup layout");
static_assert(sizeof(SmallArgs) == 104, "SmallArgs layout");
