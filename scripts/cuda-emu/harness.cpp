// Runs gradsift's selection and error-feedback kernels (kernels/accumulate.cu, select.cu)
// on the CPU through emu.h, driving them in the same order as src/cuda/compress.rs, and
// compares every payload, residual and momentum with a sort-based model of SPEC §1-5; after
// each accepted step ef_refund returns every third sent entry (SPEC §12) on both.
// Build and run: scripts/cuda-emu/run.sh
#include "emu.h"
#include "emu_warp.h"
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "accumulate.cu"
#include "select.cu"


struct G {
    u32 lo, len, r, k, off;
    float scale;
};

struct Plan {
    u32 n;
    std::vector<G> groups;
    bool global;
    float momentum;
    u32 dtype, worker;
    u64 seed;
    u32 cand_cap;       // each big group's candidate buffer, at most its length
    u32 block_max = 0;  // 0: init() sets 2^15 global, 2^16 per layer (src/cuda/compress.rs)
    u32 sent = 0;
    std::vector<float> e[2], u[2];
    StepStatus st{};
    std::vector<u32> out_idx, list, defbits, tiebits, tiles, cand;
    std::vector<float> out_val;
    std::vector<u32> refund_idx;  // Compress::refund's upload buffers
    std::vector<float> refund_val;
    std::vector<SmallGroup> small;
    std::vector<BigGroup> big;  // as SparseShape::new builds it
    std::vector<u32> sel_state;
};

static u32 words_of(u32 lo, u32 len) {
    return len ? (u32)((((u64)lo + len - 1) >> 5) - (lo >> 5) + 1) : 0;
}
static u32 tiles_of(u32 lo, u32 len) { return (words_of(lo, len) + 255) / 256; }
static u32 grid_for(u64 n, u32 block) {
    u64 w = std::max<u64>(1, (n + block - 1) / block);
    return (u32)std::min<u64>(w, 8);  // one "SM" x 8 blocks
}

static bool two_stage(const BigGroup& g) { return g.k < g.r && g.r < g.len; }
static bool in_stage(const BigGroup& g, u32 stage) {
    return stage == STAGE_FIRST ? g.k < g.len : stage == STAGE_LIST ? two_stage(g) : g.k == g.len;
}

static void init(Plan& p) {
    p.e[0].assign(p.n + 1, 0.f);
    p.e[1].assign(p.n + 1, 0.f);
    if (p.momentum > 0) {
        p.u[0].assign(p.n + 1, 0.f);
        p.u[1].assign(p.n + 1, 0.f);
    }
    p.sent = 0;
    if (!p.block_max) p.block_max = p.global ? (1u << 15) : (1u << 16);
    u32 cand = 0, list = 0, tiles = 0;
    p.small.clear();
    p.big.clear();
    for (auto& g : p.groups) {
        g.off = p.sent;
        p.sent += g.k;
        if (g.k && g.len <= p.block_max) p.small.push_back({g.lo, g.len, g.r, g.k, g.off, g.scale});
        if (g.k && g.len > p.block_max) {
            BigGroup b{g.lo, g.len, g.r, g.k, g.off, g.scale, cand, 0, list, tiles, tiles_of(g.lo, g.len), 0};
            if (b.k < b.len) b.cand_cap = std::min(p.cand_cap, b.len);
            cand += b.cand_cap;
            if (two_stage(b)) list += b.r;
            tiles += b.ntiles;
            p.big.push_back(b);
        }
    }
    p.out_idx.assign(p.sent + 1, 0xDEADBEEF);
    p.out_val.assign(p.sent + 1, NAN);
    p.list.assign(list + 1, 0);
    p.defbits.assign(p.n / 32 + 2, 0);
    p.tiebits.assign(p.n / 32 + 2, 0);
    p.tiles.assign(2 * tiles + 2, 0);
    p.cand.assign(cand + 1, 0);
    p.sel_state.assign(p.big.size() * sizeof(SelState) / 4 + 1, 0);
}

static u64 A(const void* x) { return (u64)(uintptr_t)x; }

// Device allocations for emu.h's memcheck/initcheck, sized as src/cuda/compress.rs sizes
// them (the vectors above have slack that would hide an off-by-one). Scratch buffers that
// the kernels must write before reading start poisoned, although the crate zeroes them.
static void register_buffers(Plan& p) {
    emu_dev_forget();
    const u32 n = p.n;
    emu_dev(p.e[0].data(), n, "e0");
    emu_dev(p.e[1].data(), n, "e1");
    if (p.momentum > 0) {
        emu_dev(p.u[0].data(), n, "u0");
        emu_dev(p.u[1].data(), n, "u1");
    }
    emu_dev(&p.st, 1, "status");
    emu_dev(p.out_idx.data(), p.sent, "out_idx", false);
    emu_dev(p.out_val.data(), p.sent, "out_val", false);
    u32 cand = 0, list = 0, tiles = 0;
    for (auto& g : p.big) {
        cand += g.cand_cap;
        list += two_stage(g) ? g.r : 0;
        tiles += g.ntiles;
    }
    const u32 words = (n + 31) / 32 + 1;
    emu_dev(p.defbits.data(), words, "defbits");  // memset by the host
    emu_dev(p.tiebits.data(), words, "tiebits");
    emu_dev(p.list.data(), list, "list", false);
    emu_dev(p.tiles.data(), 2 * tiles, "tiles", false);
    emu_dev(p.cand.data(), cand, "cand", false);
    emu_dev(p.sel_state.data(), p.big.size() * sizeof(SelState) / 4, "sel_state", false);
    emu_dev(p.small.data(), p.small.size(), "small_groups");
    emu_dev(p.big.data(), p.big.size(), "big_groups");
}

// src/cuda/launch.rs per_group on an emulated device of one SM (8 blocks).
static u32 per_group(size_t ngroups, u64 items, u64 per_block) {
    u64 want = std::max<u64>(1, (items + per_block - 1) / per_block);
    u64 share = std::max<u64>(1, (8 + ngroups - 1) / ngroups);
    return (u32)std::min(want, share);
}

static StepBuffers step_buffers(Plan& p) {
    return StepBuffers{A(p.e[0].data()), A(p.e[1].data()),
                       p.momentum > 0 ? A(p.u[0].data()) : 0, p.momentum > 0 ? A(p.u[1].data()) : 0,
                       A(&p.st), p.n, p.momentum};
}

static void gpu_step(Plan& p, const std::vector<float>& grad, u64 t) {
    const StepBuffers b = step_buffers(p);
    emu_dev(grad.data(), p.n, "grad");
    emu_launch(ef_begin, 1, 1, b);
    const u32 ng = (u32)p.big.size();
    SelArgs base{};
    base.b = b;
    base.groups = A(p.big.data());
    base.state = A(p.sel_state.data());
    base.cand = A(p.cand.data());
    base.list = A(p.list.data());
    base.defbits = A(p.defbits.data());
    base.tiebits = A(p.tiebits.data());
    base.ngroups = ng;
    base.worker = p.worker;
    base.t_lo = (u32)t;
    base.t_hi = (u32)(t >> 32);
    base.s_lo = (u32)p.seed;
    base.s_hi = (u32)(p.seed >> 32);
    bool fused = p.global && ng == 1 && p.big[0].r < p.big[0].len;
    AccArgs acc{b, A(grad.data()), 0};
    if (fused) {
        SelArgs a = base;
        a.stage = STAGE_FIRST;
        a.bpg = per_group(1, words_of(p.big[0].lo, p.big[0].len), 256);
        emu_launch(sel_clear_bits, a.bpg, 256, a);
        a.bpg = 1;
        emu_launch(sel_reset, 1, 1024, a);
        acc.sel_state = base.state;
    }
    emu_launch(ef_accumulate_f32, grid_for(p.n, 256), 256, acc);
    if (!p.small.empty()) {
        std::fill(p.defbits.begin(), p.defbits.end(), 0u);
        emu_dev(p.defbits.data(), (p.n + 31) / 32 + 1, "defbits");  // memset
        SmallArgs s{b, A(p.small.data()), A(p.out_idx.data()), A(p.out_val.data()), A(p.defbits.data()),
                    p.worker, base.t_lo, base.t_hi, base.s_lo, base.s_hi, p.dtype};
        emu_launch(select_small, (u32)p.small.size(), 1024, s);
    }
    CompactArgs c{};
    c.b = b;
    c.groups = base.groups;
    c.state = base.state;
    c.defbits = base.defbits;
    c.tiebits = base.tiebits;
    c.tiles = A(p.tiles.data());
    c.list = A(p.list.data());
    c.out_idx = A(p.out_idx.data());
    c.out_val = A(p.out_val.data());
    c.ngroups = ng;
    c.dtype = p.dtype;
    // The largest per-group need of a stage's groups, 0 when none takes part.
    auto most = [&](u32 stage, auto f) {
        u64 m = 0;
        bool any = false;
        for (auto& g : p.big)
            if (in_stage(g, stage)) {
                m = std::max<u64>(m, f(g));
                any = true;
            }
        return any ? std::max<u64>(m, 1) : 0;
    };
    if (u64 len = most(STAGE_ALL, [](const BigGroup& g) { return (u64)g.len; })) {
        CompactArgs all = c;
        all.stage = STAGE_ALL;
        all.bpg = per_group(ng, len, 256);
        emu_launch(emit_range, ng * all.bpg, 256, all);
    }
    for (u32 stage : {STAGE_FIRST, STAGE_LIST}) {
        u64 items = most(stage, [&](const BigGroup& g) { return (u64)(stage == STAGE_LIST ? g.r : g.len); });
        if (!items) continue;
        u64 words = most(stage, [](const BigGroup& g) { return (u64)words_of(g.lo, g.len); });
        u64 tiles = most(stage, [](const BigGroup& g) { return (u64)g.ntiles; });
        SelArgs a = base;
        a.stage = stage;
        const u32 bpg = per_group(ng, items, 256);
        if (!(fused && stage == STAGE_FIRST)) {
            a.bpg = per_group(ng, words, 256);
            emu_launch(sel_clear_bits, ng * a.bpg, 256, a);
            a.bpg = 1;
            emu_launch(sel_reset, ng, 1024, a);
            a.bpg = bpg;
            a.pass = 0;
            emu_launch(sel_pass, ng * bpg, 256, a);
        }
        for (int d = 0; d < 3; ++d) {
            a.pass = d;
            a.bpg = 1;
            emu_launch(sel_find, ng, 1024, a);
            a.pass = d + 1;
            a.bpg = bpg;
            emu_launch(sel_pass, ng * bpg, 256, a);
        }
        CompactArgs cs = c;
        cs.stage = stage;
        cs.bpg = per_group(ng, tiles, 1);
        emu_launch(compact_count, ng * cs.bpg, 256, cs);
        CompactArgs one = cs;
        one.bpg = 1;
        emu_launch(compact_scan, ng, 1024, one);
        emu_launch(compact_emit, ng * cs.bpg, 256, cs);
    }
    emu_launch(ef_commit, 1, 1, b);
}

// SPEC §12: every third entry of the step's payload returns to the residual, as
// Compress::refund uploads it and enqueues ef_refund after the step (tight registrations,
// so a thread past `count` is a memcheck report), and on the model.
static void gpu_refund(Plan& p, std::vector<float>& ref_e) {
    p.refund_idx.clear();
    p.refund_val.clear();
    for (u32 j = 0; j < p.sent; j += 3) {
        p.refund_idx.push_back(p.out_idx[j]);
        p.refund_val.push_back(p.out_val[j]);
        ref_e[p.out_idx[j]] += p.out_val[j];
    }
    const u32 count = (u32)p.refund_idx.size();
    if (!count) return;
    emu_dev(p.refund_idx.data(), count, "refund_idx");
    emu_dev(p.refund_val.data(), count, "refund_val");
    RefundArgs a{step_buffers(p), A(p.refund_idx.data()), A(p.refund_val.data()), count, 0};
    emu_launch(ef_refund, grid_for(count, 256), 256, a);
}

// ---- reference ---------------------------------------------------------------------------

struct Ref {
    std::vector<float> e, u;
};

static bool ref_step(const Plan& p, Ref& r, const std::vector<float>& grad, u64 t,
                     std::vector<u32>& idx, std::vector<float>& val, u64& bad, u32& first) {
    std::vector<float> pv(p.n), un = r.u;
    bad = 0;
    first = 0xFFFFFFFF;
    for (u32 i = 0; i < p.n; ++i) {
        if (p.momentum > 0) {
            un[i] = p.momentum * r.u[i] + grad[i];
            pv[i] = r.e[i] + un[i];
        } else {
            pv[i] = r.e[i] + grad[i];
        }
        if (!std::isfinite(pv[i])) {
            ++bad;
            first = std::min(first, i);
        }
    }
    if (bad) return false;
    idx.clear();
    val.clear();
    u64 vbad = 0;
    u32 vfirst = 0xFFFFFFFF;
    for (auto& g : p.groups) {
        std::vector<std::pair<u32, u32>> v;
        for (u32 i = g.lo; i < g.lo + g.len; ++i) v.push_back({magnitude_key(pv[i]), i});
        std::sort(v.begin(), v.end());
        v.resize(std::min<size_t>(g.r, v.size()));
        std::vector<std::pair<u32, u32>> w;
        for (auto& [key, i] : v)
            w.push_back({philox_key(i, p.worker, (u32)t, (u32)(t >> 32), (u32)p.seed, (u32)(p.seed >> 32)), i});
        std::sort(w.begin(), w.end());
        w.resize(std::min<size_t>(g.k, w.size()));
        std::vector<u32> s;
        for (auto& [key, i] : w) s.push_back(i);
        std::sort(s.begin(), s.end());
        for (u32 i : s) {
            float x = quantize(pv[i] * g.scale, p.dtype);
            // SPEC §5: a value only the unbiased scale made non-finite fails the step.
            if (!std::isfinite(x)) {
                ++vbad;
                vfirst = std::min(vfirst, i);
            }
            idx.push_back(i);
            val.push_back(x);
            pv[i] -= x;
            if (p.momentum > 0) un[i] = 0;
        }
    }
    if (vbad) {
        bad = vbad;
        first = vfirst;
        return false;
    }
    r.e = pv;
    if (p.momentum > 0) r.u = un;
    return true;
}

static int failures = 0;
static int passes = 0;

static void run_once(const std::string& name, Plan p, const std::vector<std::vector<float>>& grads) {
    init(p);
    register_buffers(p);
    const unsigned long san0 = emu_san_errors();
    Ref r;
    r.e.assign(p.n, 0.f);
    r.u.assign(p.n, 0.f);
    for (size_t s = 0; s < grads.size(); ++s) {
        u64 t = s + 1;
        std::vector<u32> idx;
        std::vector<float> val;
        u64 bad;
        u32 first;
        bool ok = ref_step(p, r, grads[s], t, idx, val, bad, first);
        gpu_step(p, grads[s], t);
        std::string what = name + " step " + std::to_string(t);
        if (!ok) {
            if (p.st.bad_count != bad || p.st.first_bad != first) {
                printf("FAIL %s: non-finite %llu@%u vs ref %llu@%u\n", what.c_str(),
                       (unsigned long long)p.st.bad_count, p.st.first_bad, (unsigned long long)bad, first);
                ++failures;
                return;
            }
        } else {
            if (p.st.bad_count) {
                printf("FAIL %s: spurious non-finite\n", what.c_str());
                ++failures;
                return;
            }
            for (u32 j = 0; j < p.sent; ++j) {
                if (p.out_idx[j] != idx[j] || __float_as_uint(p.out_val[j]) != __float_as_uint(val[j])) {
                    printf("FAIL %s: payload[%u] = (%u, %g), ref (%u, %g)\n", what.c_str(), j, p.out_idx[j],
                           p.out_val[j], idx[j], val[j]);
                    ++failures;
                    return;
                }
            }
            gpu_refund(p, r.e);
        }
        const auto& e = p.e[p.st.cur];
        for (u32 i = 0; i < p.n; ++i) {
            if (__float_as_uint(e[i]) != __float_as_uint(r.e[i])) {
                printf("FAIL %s: residual[%u] = %g, ref %g\n", what.c_str(), i, e[i], r.e[i]);
                ++failures;
                return;
            }
            if (p.momentum > 0 && __float_as_uint(p.u[p.st.cur][i]) != __float_as_uint(r.u[i])) {
                printf("FAIL %s: momentum[%u]\n", what.c_str(), i);
                ++failures;
                return;
            }
        }
    }
    if (emu_san_errors() != san0) {
        printf("FAIL %s: %lu sanitizer errors\n", name.c_str(), emu_san_errors() - san0);
        ++failures;
        return;
    }
    ++passes;
    printf("ok   %s\n", name.c_str());
}

static void run(const std::string& name, const Plan& p, const std::vector<std::vector<float>>& grads) {
    if (!emu_opts.only.empty() && name.find(emu_opts.only) == std::string::npos) return;
    for (auto& [tag, seed] : emu_schedules()) {
        emu_use_schedule(seed);
        run_once(name + tag, p, grads);
    }
}

static std::vector<float> data(u32 n, int kind, u64 seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> nd;
    const float pool[] = {0.f, -0.f, 1.f, -1.f, 2.f, -2.f, 1e-45f, 1e-3f};
    std::vector<float> v(n);
    for (auto& x : v) {
        if (kind == 0) x = nd(rng);
        else if (kind == 1) x = pool[rng() % 8];
        else x = 1.5f;
    }
    return v;
}

int main(int argc, char** argv) {
    emu_parse_args(argc, argv);
    const bool quick = emu_opts.quick;
    std::vector<u32> sizes = quick ? std::vector<u32>{300, 40000} : std::vector<u32>{1, 100, 257, 32768, 32769, 70001};
    for (u32 n : sizes) {
        for (int kind = 0; kind < 3; ++kind) {
            std::vector<std::vector<float>> grads;
            for (int s = 0; s < 3; ++s) grads.push_back(data(n, kind, 10 * n + s + kind));
            u32 k1 = n / 100 + 1, r5 = std::min(n, n / 20 + 1);
            struct M { const char* name; u32 r, k; };
            for (M m : {M{"topk", k1, k1}, M{"rtopk", r5, k1}, M{"randomk", n, k1}, M{"all", n, n}}) {
                for (u32 cap : {std::max(n / 16, 65536u), 16u}) {
                    Plan p{};
                    p.n = n;
                    p.global = true;
                    p.groups = {{0, n, std::min(m.r, n), std::min(m.k, n), 0, 1.0f}};
                    p.cand_cap = std::min(cap, n);
                    p.seed = 0x1234567890ull;
                    p.worker = 3;
                    p.dtype = 0;
                    run("global n=" + std::to_string(n) + " data=" + std::to_string(kind) + " " + m.name +
                            " cap=" + std::to_string(p.cand_cap),
                        p, grads);
                }
            }
        }
    }
    // Per-layer: small and big groups side by side, empty groups, unbiased f16 values, momentum.
    {
        std::vector<u32> sizes = {5000, 0, 40000, 3, 33000, 1, (1u << 20) + 5};
        u32 n = 0;
        for (u32 s : sizes) n += s;
        std::vector<std::vector<float>> grads;
        for (int s = 0; s < 3; ++s) grads.push_back(data(n, s == 1 ? 1 : 0, 77 + s));
        for (int variant = 0; variant < 4; ++variant) {
            Plan p{};
            p.n = n;
            p.global = false;
            u32 lo = 0;
            for (u32 s : sizes) {
                u32 r = std::min(s, s / 20 + 1), k = std::min(r, s / 100 + 1);
                if (variant == 2) r = s;  // random-k
                float scale = variant == 1 || variant == 3 ? (float)r / (float)k : 1.0f;
                p.groups.push_back({lo, s, r, s ? k : 0, 0, scale});
                lo += s;
            }
            p.cand_cap = 65536;
            p.momentum = variant == 1 ? 0.9f : 0.0f;
            p.dtype = variant == 1 ? 1 : (variant == 3 ? 2 : 0);  // f16, bf16 values
            p.seed = 42;
            p.worker = 1;
            run("per-layer variant " + std::to_string(variant), p, grads);
        }
    }
    // Many grid-wide groups in each launch (a low block cut-off): neighbours share bitmap
    // words at unaligned boundaries, and every stage has groups that sit it out: rTop-k,
    // top-k, random-k, send-everything and block-sized groups side by side.
    {
        struct L { u32 len, r, k; };
        const std::vector<L> ls = {{5000, 251, 51}, {0, 0, 0},     {3001, 31, 31}, {3, 1, 1},
                                   {2500, 2500, 26}, {1100, 1100, 1100}, {4099, 205, 41}, {1, 1, 1},
                                   {1030, 1030, 1}, {2048, 2047, 2046}};
        u32 n = 0;
        for (auto& l : ls) n += l.len;
        std::vector<std::vector<float>> grads;
        for (int s = 0; s < 3; ++s) grads.push_back(data(n, s == 1 ? 1 : 0, 91 + s));
        for (int variant = 0; variant < 3; ++variant) {
            Plan p{};
            p.n = n;
            p.global = false;
            p.block_max = 1024;
            u32 lo = 0;
            for (auto& l : ls) {
                const float scale = variant == 1 && l.k ? (float)l.r / (float)l.k : 1.0f;
                p.groups.push_back({lo, l.len, l.r, l.k, 0, scale});
                lo += l.len;
            }
            p.cand_cap = variant == 2 ? 16 : 65536;  // 16: the candidate buffer never takes over
            p.momentum = variant == 1 ? 0.9f : 0.0f;
            p.dtype = variant == 1 ? 1 : 0;
            p.seed = 5;
            p.worker = 2;
            run("per-layer batched variant " + std::to_string(variant), p, grads);
        }
    }
    // Non-finite input: rejected, state untouched, then a good step.
    {
        u32 n = 40000;
        auto g0 = data(n, 0, 1), g1 = data(n, 0, 2), g2 = data(n, 0, 3);
        g1[123] = NAN;
        g1[39999] = INFINITY;
        Plan p{};
        p.n = n;
        p.global = true;
        p.groups = {{0, n, 2000, 400, 0, 1.0f}};
        p.cand_cap = 65536;
        p.momentum = 0.5f;
        run("nan rejection", p, {g0, g1, g2});
    }
    // SPEC §5: sent values that only Scale::Unbiased makes non-finite (|p| * scale > f32::MAX)
    // reject the step like a non-finite p: the status reports them, the state is untouched,
    // and the next good step goes on as if the rejected one never happened. Every top-r
    // candidate overflowing (all sent values bad), and a few (only some sent values bad);
    // grid-wide groups (compact_emit) and block-sized ones (select_small), f32/f16 values.
    for (int variant = 0; variant < 4; ++variant) {
        const bool global = variant < 2;
        std::vector<u32> sizes = global ? std::vector<u32>{40000} : std::vector<u32>{5000, 0, 300, 40000};
        u32 n = 0;
        for (u32 s : sizes) n += s;
        auto g0 = data(n, 0, 11), g1 = data(n, 0, 12), g2 = data(n, 0, 13);
        const u32 every = variant % 2 == 0 ? 5 : 97;  // 1 in 5 planted: > r per group; 1 in 97: fewer
        for (u32 i = 0; i < n; i += every) g1[i] = (i & 1) ? 1e38f : -1e38f;
        Plan p{};
        p.n = n;
        p.global = global;
        u32 lo = 0;
        for (u32 s : sizes) {
            u32 r = std::min(s, s / 20 + 1), k = std::min(r, s / 100 + 1);
            p.groups.push_back({lo, s, r, s ? k : 0, 0, s ? (float)r / (float)k : 1.0f});
            lo += s;
        }
        p.cand_cap = 65536;
        p.momentum = variant == 1 ? 0.5f : 0.0f;
        p.dtype = variant == 3 ? 1 : 0;
        p.seed = 9;
        p.worker = 4;
        run("unbiased overflow rejection variant " + std::to_string(variant), p, {g0, g1, g2});
        // The model must agree that the planted step is rejected (not a vacuous pass).
        Ref r;
        r.e.assign(n, 0.f);
        r.u.assign(n, 0.f);
        std::vector<u32> idx;
        std::vector<float> val;
        u64 bad;
        u32 first;
        bool ok0 = ref_step(p, r, g0, 1, idx, val, bad, first);
        bool ok1 = ref_step(p, r, g1, 2, idx, val, bad, first);
        if (!ok0 || ok1 || bad == 0) {
            printf("FAIL overflow variant %d: the planted step is not a scaled-value rejection\n", variant);
            ++failures;
        } else {
            ++passes;
            printf("ok   overflow variant %d rejects %llu sent value(s), first at %u\n", variant,
                   (unsigned long long)bad, first);
        }
    }
    // The summary CI log readers look for: alone on the last line.
    printf("%d passed, %d failed\n", passes, failures);
    return failures ? 1 : 0;
}
