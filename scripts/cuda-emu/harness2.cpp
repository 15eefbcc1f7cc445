// Emulated runs of the scaled-sign, statistics, variance and aggregation kernels
// (kernels/sign.cu, stats.cu, aggregate.cu), driven as src/cuda/*.rs drives them, against
// straightforward f64 / sequential models of SPEC §6-8.
#include "emu.h"
#include "emu_warp.h"
#include <algorithm>
#include <cstdio>
#include <random>
#include <string>

#include "accumulate.cu"
#include "sign.cu"
#include "qsgd.cu"
#include "stats.cu"
#include "aggregate.cu"

static int failures = 0;
static int passes = 0;
static std::string sched_tag;  // the schedule, when not the fixed one
#define CHECK(c, ...)                                \
    do {                                             \
        if (!(c)) {                                  \
            printf("FAIL " __VA_ARGS__);             \
            printf("%s\n", sched_tag.c_str());       \
            ++failures;                              \
            return;                                  \
        }                                            \
    } while (0)

static u64 A(const void* x) { return (u64)(uintptr_t)x; }
// A device allocation of the first `n` elements of `v` (emu.h's memcheck/initcheck):
// init = the host copied or memset it; otherwise it stays poisoned until a kernel writes it.
template <typename V>
static u64 D(V& v, size_t n, const char* name, bool init = true) {
    emu_dev(v.data(), n, name, init);
    return A(v.data());
}
template <typename T>
static u64 D1(T* x, const char* name) {
    emu_dev(x, 1, name, true);
    return A(x);
}
// Each case starts with no allocations and passes only if the sanitizer stayed silent.
static unsigned long san_begin() {
    emu_dev_forget();
    return emu_san_errors();
}
#define SAN_OK(san0) CHECK(emu_san_errors() == san0, "%s: %lu sanitizer errors", __func__, emu_san_errors() - san0)
static u32 grid_for(u64 n, u32 block) {
    u64 w = std::max<u64>(1, (n + block - 1) / block);
    return (u32)std::min<u64>(w, 8);
}

static void items_of(const std::vector<u32>& sizes, std::vector<Item>& items, std::vector<u32>& first) {
    u32 lo = 0;
    for (u32 g = 0; g < sizes.size(); ++g) {
        first.push_back(items.size());
        for (u32 o = 0; o < sizes[g]; o += 4096) items.push_back({g, lo + o, std::min(4096u, sizes[g] - o), 0});
        lo += sizes[g];
    }
    first.push_back(items.size());
}

static std::vector<float> gauss(u32 n, u64 seed, float scale, float off = 0) {
    std::mt19937_64 r(seed);
    std::normal_distribution<float> nd;
    std::vector<float> v(n);
    for (auto& x : v) x = nd(r) * scale + off;
    return v;
}

static void sign_case(const std::vector<u32>& sizes, float momentum) {
    const unsigned long san0 = san_begin();
    u32 n = 0;
    for (u32 s : sizes) n += s;
    std::vector<Item> items;
    std::vector<u32> first;
    items_of(sizes, items, first);
    std::vector<float> e[2] = {std::vector<float>(n + 1), std::vector<float>(n + 1)};
    std::vector<float> u[2] = {std::vector<float>(n + 1), std::vector<float>(n + 1)};
    StepStatus st{};
    std::vector<double> partial(items.size() + 1);
    std::vector<float> scales(sizes.size() + 1);
    std::vector<u32> words(2 * ((n + 63) / 64) + 2);
    std::vector<float> re(n, 0.f), ru(n, 0.f);
    for (int step = 0; step < 3; ++step) {
        auto g = gauss(n, 5 + step, 1.0f);
        StepBuffers b{D(e[0], n, "e0"), D(e[1], n, "e1"), momentum > 0 ? D(u[0], n, "u0") : 0,
                      momentum > 0 ? D(u[1], n, "u1") : 0, D1(&st, "status"), n, momentum};
        std::fill(words.begin(), words.end(), 0);
        D(g, n, "grad");
        D(words, words.size() - 2, "words");  // memset by the host every step
        if (step == 0) {
            D(items, items.size(), "items");
            D(first, first.size(), "group_items");
            emu_dev(sizes.data(), sizes.size(), "group_len");
            D(partial, items.size(), "partial", false);
            D(scales, sizes.size(), "scales", false);
        }
        emu_launch(ef_begin, 1, 1, b);
        emu_launch(ef_accumulate_f32, grid_for(n, 256), 256, AccArgs{b, A(g.data()), 0});
        SignArgs a{b, A(items.data()), A(partial.data()), A(first.data()), A(sizes.data()), A(scales.data()),
                   A(words.data()), (u32)sizes.size(), 0};
        emu_launch(sign_partial, items.size(), 256, a);
        emu_launch(sign_merge, sizes.size(), 256, a);
        emu_launch(sign_apply, items.size(), 256, a);
        emu_launch(ef_commit, 1, 1, b);
        // Reference.
        u32 lo = 0;
        for (u32 gi = 0; gi < sizes.size(); ++gi) {
            std::vector<float> p(sizes[gi]);
            double sum = 0;
            for (u32 j = 0; j < sizes[gi]; ++j) {
                u32 i = lo + j;
                float un = momentum > 0 ? momentum * ru[i] + g[i] : g[i];
                if (momentum > 0) ru[i] = un;
                p[j] = re[i] + un;
                sum += std::fabs((double)p[j]);
            }
            float s = sizes[gi] ? (float)(sum / sizes[gi]) : 0.f;
            CHECK(std::fabs(s - scales[gi]) <= 1e-6f * s, "sign scale %u: %g vs %g", gi, scales[gi], s);
            for (u32 j = 0; j < sizes[gi]; ++j) {
                u32 i = lo + j;
                bool neg = p[j] < 0;
                bool got = (words[i >> 5] >> (i & 31)) & 1;
                CHECK(neg == got, "sign bit %u", i);
                re[i] = neg ? p[j] + scales[gi] : p[j] - scales[gi];
                ru[i] = 0;
                CHECK(e[st.cur][i] == re[i], "sign residual %u: %g vs %g", i, e[st.cur][i], re[i]);
                if (momentum > 0) CHECK(u[st.cur][i] == 0.f, "sign momentum %u", i);
            }
            lo += sizes[gi];
        }
    }
    SAN_OK(san0);
    ++passes;
    printf("ok   sign sizes=%zu n=%u momentum=%g%s\n", sizes.size(), n, momentum, sched_tag.c_str());
}

// `all_bad`: every element of that layer is non-finite (its moments must be NaN, SPEC §8).
static void stats_case(const std::vector<u32>& sizes, float off, bool nan, int all_bad = -1) {
    const unsigned long san0 = san_begin();
    u32 n = 0;
    for (u32 s : sizes) n += s;
    std::vector<Item> items;
    std::vector<u32> first;
    items_of(sizes, items, first);
    auto x = gauss(n, 9, 3.0f, off);
    if (nan && n > 10) {
        x[3] = NAN;
        x[n - 1] = -INFINITY;
    }
    if (all_bad >= 0) {
        u32 lo = 0;
        for (int l = 0; l < all_bad; ++l) lo += sizes[l];
        for (u32 i = lo; i < lo + sizes[all_bad]; ++i) x[i] = (i % 3) ? NAN : ((i % 2) ? INFINITY : -INFINITY);
    }
    std::vector<StatsPartial> part(items.size() + 1);
    std::vector<StatsOut> out(sizes.size() + 1);
    StatsArgs a{D(x, n, "x"), D(items, items.size(), "items"), D(part, items.size(), "partial", false),
                D(first, first.size(), "layer_items"), D(out, sizes.size(), "out", false), (u32)sizes.size(), 0};
    emu_launch(stats_items_f32, items.size(), 256, a);
    emu_launch(stats_merge, sizes.size(), 256, a);
    u32 lo = 0;
    for (u32 l = 0; l < sizes.size(); ++l) {
        double s = 0;
        u64 c = 0, bad = 0;
        float mn = INFINITY, mx = -INFINITY, ma = 0;
        for (u32 i = lo; i < lo + sizes[l]; ++i) {
            if (!std::isfinite(x[i])) {
                ++bad;
                continue;
            }
            ++c;
            s += x[i];
            mn = std::min(mn, x[i]);
            mx = std::max(mx, x[i]);
            ma = std::max(ma, std::fabs(x[i]));
        }
        double mean = c ? s / c : NAN, m2 = 0;
        for (u32 i = lo; i < lo + sizes[l]; ++i)
            if (std::isfinite(x[i])) m2 += (x[i] - mean) * (x[i] - mean);
        double var = c ? m2 / c : NAN;
        const StatsOut& o = out[l];
        CHECK(o.non_finite == bad && o.finite == c, "stats %u counts", l);
        CHECK(o.min == mn && o.max == mx && o.max_abs == ma, "stats %u min/max", l);
        if (c == 0) {
            // No finite element (an empty layer included): NaN moments (SPEC §8).
            CHECK(std::isnan(o.mean) && std::isnan(o.var), "stats %u: no finite element, mean %g var %g", l,
                  o.mean, o.var);
            lo += sizes[l];
            continue;
        }
        CHECK(std::fabs(o.mean - mean) <= 1e-9 * (std::fabs(mean) + std::sqrt(var)), "stats %u mean %g vs %g", l,
              o.mean, mean);
        CHECK(std::fabs(o.var - var) <= 1e-9 * var, "stats %u var %g vs %g", l, o.var, var);
        lo += sizes[l];
    }
    SAN_OK(san0);
    ++passes;
    printf("ok   stats layers=%zu n=%u off=%g nan=%d all_bad=%d%s\n", sizes.size(), n, off, nan, all_bad,
           sched_tag.c_str());
}

static void var_case(const std::vector<u32>& sizes, u32 k) {
    const unsigned long san0 = san_begin();
    u32 n = 0;
    for (u32 s : sizes) n += s;
    std::vector<Item> items;
    std::vector<u32> first;
    items_of(sizes, items, first);
    std::vector<std::vector<float>> ys;
    auto x = gauss(n, 1, 2.0f);
    for (u32 w = 0; w < k; ++w) {
        auto nz = gauss(n, 100 + w, 0.5f);
        for (u32 i = 0; i < n; ++i) nz[i] += x[i];
        ys.push_back(nz);
    }
    ys[k - 1][n / 2] = NAN;
    std::vector<u64> ptrs;
    for (auto& y : ys) ptrs.push_back(D(y, n, "worker"));
    std::vector<VarPartial> part(items.size() + 1);
    std::vector<VarOut> out(sizes.size() + 1);
    std::vector<u64> bc(k, 0);
    std::vector<u32> bf(k, 0xFFFFFFFF);
    emu_dev(sizes.data(), sizes.size(), "layer_len");
    VarArgs a{D(ptrs, k, "workers"), D(items, items.size(), "items"), D(part, items.size(), "partial", false),
              D(first, first.size(), "layer_items"), A(sizes.data()), D(out, sizes.size(), "out", false),
              D(bc, k, "bad_count"), D(bf, k, "bad_first"), k, (u32)sizes.size()};
    emu_launch(var_items_f32, items.size(), 256, a);
    emu_launch(var_merge, sizes.size(), 256, a);
    CHECK(bc[k - 1] == 1 && bf[k - 1] == n / 2, "var non-finite report");
    for (u32 w = 0; w + 1 < k; ++w) CHECK(bc[w] == 0, "var spurious non-finite");
    ys[k - 1][n / 2] = 0.0f;
    std::fill(bc.begin(), bc.end(), 0);
    emu_launch(var_items_f32, items.size(), 256, a);
    emu_launch(var_merge, sizes.size(), 256, a);
    u32 lo = 0;
    for (u32 l = 0; l < sizes.size(); ++l) {
        u32 nl = sizes[l];
        double noise = 0, s = 0;
        std::vector<double> yb(nl);
        for (u32 j = 0; j < nl; ++j) {
            double sum = 0;
            for (u32 w = 0; w < k; ++w) sum += ys[w][lo + j];
            yb[j] = sum / k;
            for (u32 w = 0; w < k; ++w) noise += (ys[w][lo + j] - yb[j]) * (ys[w][lo + j] - yb[j]);
            s += yb[j];
        }
        double sn = nl ? noise / (nl * (k - 1.0)) : 0, m = nl ? s / nl : 0, m2 = 0;
        for (double v : yb) m2 += (v - m) * (v - m);
        double sx = nl ? std::max(0.0, m2 / nl - sn / k) : 0;
        CHECK(std::fabs(out[l].sigma_n2 - sn) <= 1e-9 * sn + 1e-300, "var %u sigma_n2 %g vs %g", l, out[l].sigma_n2, sn);
        CHECK(std::fabs(out[l].sigma_x2 - sx) <= 1e-9 * sx + 1e-300, "var %u sigma_x2 %g vs %g", l, out[l].sigma_x2, sx);
        lo += nl;
    }
    SAN_OK(san0);
    ++passes;
    printf("ok   variance layers=%zu n=%u K=%u%s\n", sizes.size(), n, k, sched_tag.c_str());
}

struct Sp {
    std::vector<u32> idx;
    std::vector<float> val;
};

static void agg_case(u32 n, u32 k, bool senders, int corrupt) {
    const unsigned long san0 = san_begin();
    std::mt19937_64 r(n * 7 + k);
    std::vector<Sp> ps(k);
    for (auto& p : ps) {
        for (u32 i = 0; i < n; ++i)
            if (r() % 10 == 0) {
                p.idx.push_back(i);
                p.val.push_back((float)(int)(r() % 2001 - 1000) / 7.0f);
            }
    }
    if (corrupt == 1 && ps[1].idx.size() > 2) ps[1].idx[1] = ps[1].idx[0];
    if (corrupt == 2 && ps[1].idx.size() > 2) ps[1].idx.back() = n;
    if (corrupt == 3 && ps[1].val.size() > 2) ps[1].val[2] = NAN;
    std::vector<float> inv(k + 1);
    inv[0] = 0;
    for (u32 c = 1; c <= k; ++c) inv[c] = (float)(1.0 / c);
    std::vector<float> out(n + 1, 7.0f);
    std::vector<u32> counts(n + 1), ei(k, 0xFFFFFFFF), ev(k, 0xFFFFFFFF);
    u32 any = 0;
    AggArgs base{};
    base.out = D(out, n, "out");
    base.counts = senders ? D(counts, n, "counts") : 0;
    base.err_idx = D(ei, k, "err_idx");
    base.err_val = D(ev, k, "err_val");
    base.any = D1(&any, "any");
    base.inv = D(inv, k + 1, "inv");
    base.n = n;
    base.workers = k;
    for (u32 w = 0; w < k; ++w) {
        D(ps[w].idx, ps[w].idx.size(), "idx");
        D(ps[w].val, ps[w].val.size(), "val");
    }
    for (u32 w = 0; w < k; ++w) {
        AggArgs a = base;
        a.idx = A(ps[w].idx.data());
        a.val = A(ps[w].val.data());
        a.len = ps[w].idx.size();
        a.worker = w;
        emu_launch(agg_check_sparse, grid_for(a.len, 256), 256, a);
    }
    emu_launch(agg_zero, grid_for(n, 256), 256, base);
    for (u32 w = 0; w < k; ++w) {
        AggArgs a = base;
        a.idx = A(ps[w].idx.data());
        a.val = A(ps[w].val.data());
        a.len = ps[w].idx.size();
        emu_launch(agg_scatter, grid_for(a.len, 256), 256, a);
    }
    emu_launch(agg_finalize, grid_for(n, 256), 256, base);
    if (corrupt) {
        CHECK(any != 0, "agg corrupt %d not detected", corrupt);
        CHECK((corrupt == 3 ? ev[1] : ei[1]) != 0xFFFFFFFF && ei[0] == 0xFFFFFFFF, "agg error position");
        for (u32 i = 0; i < n; ++i) CHECK(out[i] == 7.0f, "agg out written on error");
        SAN_OK(san0);
    ++passes;
        printf("ok   aggregate rejects corruption %d%s\n", corrupt, sched_tag.c_str());
        return;
    }
    std::vector<float> want(n, 0.f);
    std::vector<u32> c(n, 0);
    for (auto& p : ps)
        for (size_t j = 0; j < p.idx.size(); ++j) {
            want[p.idx[j]] += p.val[j];
            c[p.idx[j]]++;
        }
    for (u32 i = 0; i < n; ++i) {
        want[i] *= senders ? inv[c[i]] : inv[k];
        CHECK(__float_as_uint(want[i]) == __float_as_uint(out[i]), "agg %u: %g vs %g", i, out[i], want[i]);
    }
    SAN_OK(san0);
    ++passes;
    printf("ok   aggregate n=%u K=%u senders=%d%s\n", n, k, senders, sched_tag.c_str());
}


static void agg_sign_case(u32 n, u32 k, bool senders) {
    const unsigned long san0 = san_begin();
    std::vector<u32> sizes = {n / 3, 0, n - n / 3};
    std::vector<Item> items;
    std::vector<u32> first;
    items_of(sizes, items, first);
    std::mt19937_64 r(n + k);
    std::vector<std::vector<float>> scales(k);
    std::vector<std::vector<u32>> words(k);
    for (u32 w = 0; w < k; ++w) {
        for (u32 g = 0; g < sizes.size(); ++g) scales[w].push_back((float)(r() % 1000) / 7.0f);
        words[w].assign(2 * ((n + 63) / 64), 0);
        for (u32 i = 0; i < n; ++i)
            if (r() & 1) words[w][i >> 5] |= 1u << (i & 31);
    }
    std::vector<float> inv(k + 1);
    for (u32 c = 1; c <= k; ++c) inv[c] = (float)(1.0 / c);
    std::vector<float> out(n + 1, 7.0f);
    std::vector<u32> counts(n + 1), ei(k, 0xFFFFFFFF), ev(k, 0xFFFFFFFF);
    u32 any = 0;
    AggArgs base{};
    base.out = D(out, n, "out");
    base.counts = senders ? D(counts, n, "counts") : 0;
    base.err_idx = D(ei, k, "err_idx");
    base.err_val = D(ev, k, "err_val");
    base.any = D1(&any, "any");
    base.inv = D(inv, k + 1, "inv");
    base.items = D(items, items.size(), "items");
    for (u32 w = 0; w < k; ++w) {
        D(scales[w], sizes.size(), "scales");
        D(words[w], words[w].size(), "words");
    }
    base.n = n;
    base.workers = k;
    emu_launch(agg_zero, grid_for(n, 256), 256, base);
    for (u32 w = 0; w < k; ++w) {
        AggArgs a = base;
        a.scales = A(scales[w].data());
        a.words = A(words[w].data());
        emu_launch(agg_sign, items.size(), 256, a);
    }
    emu_launch(agg_finalize, grid_for(n, 256), 256, base);
    u32 lo = 0;
    for (u32 g = 0; g < sizes.size(); ++g) {
        for (u32 i = lo; i < lo + sizes[g]; ++i) {
            float want = 0.f;
            for (u32 w = 0; w < k; ++w) want += ((words[w][i >> 5] >> (i & 31)) & 1) ? -scales[w][g] : scales[w][g];
            want *= inv[k];
            CHECK(__float_as_uint(want) == __float_as_uint(out[i]), "agg sign %u: %g vs %g", i, out[i], want);
        }
        lo += sizes[g];
    }
    SAN_OK(san0);
    ++passes;
    printf("ok   aggregate sign n=%u K=%u senders=%d%s\n", n, k, senders, sched_tag.c_str());
}

// SPEC §13 written out on its own (plain f32 operations, -ffp-contract=off): level, decode.
static int qsgd_model_level(float x, float m, u32 s, float u) {
    if (x == 0.0f) return 0;
    const float inv = m > 0.0f ? (float)s / m : 0.0f;
    const float a = std::fabs(x) * inv;
    int l = a >= (float)s ? (int)s : (int)std::floor(a) + (u < a - std::floor(a) ? 1 : 0);
    return x < 0.0f ? -l : l;
}

// One group of subnormal magnitudes (its scale makes inv = +inf) and one of zeros.
// `feedback` false: QSGD without error feedback, the residual stays 0.
static void qsgd_case(const std::vector<u32>& sizes, u32 levels, float momentum, bool feedback = true) {
    const unsigned long san0 = san_begin();
    u32 n = 0;
    for (u32 s : sizes) n += s;
    std::vector<Item> items;
    std::vector<u32> first;
    items_of(sizes, items, first);
    std::vector<float> e[2] = {std::vector<float>(n + 1), std::vector<float>(n + 1)};
    std::vector<float> u[2] = {std::vector<float>(n + 1), std::vector<float>(n + 1)};
    StepStatus st{};
    std::vector<u32> partial(items.size() + 1);
    std::vector<float> scales(sizes.size() + 1);
    std::vector<signed char> codes((n + 3) / 4 * 4 + 1);
    std::vector<float> re(n, 0.f), ru(n, 0.f);
    const u32 worker = 3, seed_lo = 0x1234567u, seed_hi = 9;
    for (int step = 0; step < 3; ++step) {
        auto g = gauss(n, 11 + step, 1.0f);
        u32 lo0 = 0;
        for (u32 gi = 0; gi < sizes.size(); ++gi) {
            for (u32 i = lo0; i < lo0 + sizes[gi]; ++i) {
                if (gi == 1) g[i] = step == 0 ? (float)(i % 7) * 1e-41f - 3e-41f : 0.0f;  // subnormal
                if (gi == 2) g[i] = 0.0f;
            }
            lo0 += sizes[gi];
        }
        StepBuffers b{D(e[0], n, "e0"), D(e[1], n, "e1"), momentum > 0 ? D(u[0], n, "u0") : 0,
                      momentum > 0 ? D(u[1], n, "u1") : 0, D1(&st, "status"), n, momentum};
        D(g, n, "grad");
        if (step == 0) {
            D(items, items.size(), "items");
            D(first, first.size(), "group_items");
            D(partial, items.size(), "partial", false);
            D(scales, sizes.size(), "scales", false);
            D(codes, (n + 3) / 4 * 4, "codes");  // zeroed when the plan is built (DevBuf::zeroed)
        }
        emu_launch(ef_begin, 1, 1, b);
        emu_launch(ef_accumulate_f32, grid_for(n, 256), 256, AccArgs{b, A(g.data()), 0});
        QsgdArgs a{b, A(items.data()), A(partial.data()), A(first.data()), A(scales.data()), A(codes.data()),
                   (u32)sizes.size(), levels, worker, (u32)step, 0, seed_lo, seed_hi, feedback ? 1u : 0u};
        emu_launch(qsgd_partial, items.size(), 256, a);
        emu_launch(qsgd_merge, sizes.size(), 256, a);
        emu_launch(qsgd_apply, items.size(), 256, a);
        emu_launch(ef_commit, 1, 1, b);
        u32 lo = 0;
        for (u32 gi = 0; gi < sizes.size(); ++gi) {
            std::vector<float> p(sizes[gi]);
            float m = 0.0f;
            for (u32 j = 0; j < sizes[gi]; ++j) {
                u32 i = lo + j;
                float un = momentum > 0 ? momentum * ru[i] + g[i] : g[i];
                if (momentum > 0) ru[i] = un;
                p[j] = re[i] + un;
                m = std::max(m, std::fabs(p[j]));
            }
            CHECK(__float_as_uint(m) == __float_as_uint(scales[gi]), "qsgd scale %u: %g vs %g", gi, scales[gi], m);
            const float dstep = m / (float)levels;
            for (u32 j = 0; j < sizes[gi]; ++j) {
                u32 i = lo + j;
                u32 w0, w1;
                philox_words(i, worker, (u32)step, 0, seed_lo, seed_hi, &w0, &w1);
                const float uu = (float)(w1 >> 8) / 16777216.0f;
                const int q = qsgd_model_level(p[j], m, levels, uu);
                CHECK(codes[i] == q, "qsgd code %u: %d vs %d", i, codes[i], q);
                re[i] = feedback ? p[j] - (float)q * dstep : 0.0f;
                ru[i] = 0;
                CHECK(__float_as_uint(e[st.cur][i]) == __float_as_uint(re[i]), "qsgd residual %u: %g vs %g", i,
                      e[st.cur][i], re[i]);
                if (momentum > 0) CHECK(u[st.cur][i] == 0.f, "qsgd momentum %u", i);
            }
            lo += sizes[gi];
        }
    }
    SAN_OK(san0);
    ++passes;
    printf("ok   qsgd sizes=%zu n=%u levels=%u momentum=%g feedback=%d%s\n", sizes.size(), n, levels, momentum,
           feedback, sched_tag.c_str());
}

// `bad`: worker 1's code at that position is beyond the levels (nothing may be written).
static void agg_qsgd_case(u32 n, u32 k, u32 levels, bool senders, int bad) {
    const unsigned long san0 = san_begin();
    std::vector<u32> sizes = {n / 3, 0, n - n / 3};
    std::vector<Item> items;
    std::vector<u32> first;
    items_of(sizes, items, first);
    std::mt19937_64 r(n + k + levels);
    std::vector<std::vector<float>> scales(k);
    std::vector<std::vector<signed char>> codes(k);
    for (u32 w = 0; w < k; ++w) {
        for (u32 g = 0; g < sizes.size(); ++g) scales[w].push_back((float)(r() % 1000) / 7.0f);
        for (u32 i = 0; i < n; ++i) codes[w].push_back((signed char)((int)(r() % (2 * levels + 1)) - (int)levels));
    }
    if (bad >= 0 && k > 1) codes[1][bad] = (signed char)(levels + 1);
    std::vector<float> inv(k + 1);
    for (u32 c = 1; c <= k; ++c) inv[c] = (float)(1.0 / c);
    std::vector<float> out(n + 1, 7.0f);
    std::vector<u32> counts(n + 1), ei(k, 0xFFFFFFFF), ev(k, 0xFFFFFFFF);
    u32 any = 0;
    AggArgs base{};
    base.out = D(out, n, "out");
    base.counts = senders ? D(counts, n, "counts") : 0;
    base.err_idx = D(ei, k, "err_idx");
    base.err_val = D(ev, k, "err_val");
    base.any = D1(&any, "any");
    base.inv = D(inv, k + 1, "inv");
    base.items = D(items, items.size(), "items");
    base.n = n;
    base.workers = k;
    for (u32 w = 0; w < k; ++w) {
        AggArgs a = base;
        a.words = D(codes[w], n, "codes");
        a.len = levels;
        a.worker = w;
        D(scales[w], sizes.size(), "scales");
        emu_launch(agg_check_qsgd, grid_for(n, 256), 256, a);
    }
    emu_launch(agg_zero, grid_for(n, 256), 256, base);
    for (u32 w = 0; w < k; ++w) {
        AggArgs a = base;
        a.scales = A(scales[w].data());
        a.words = A(codes[w].data());
        a.len = levels;
        emu_launch(agg_qsgd, items.size(), 256, a);
    }
    emu_launch(agg_finalize, grid_for(n, 256), 256, base);
    if (bad >= 0) {
        CHECK(any == 1 && ev[1] == (u32)bad && ev[0] == 0xFFFFFFFF, "agg qsgd: bad code not reported");
        for (u32 i = 0; i < n; ++i) CHECK(out[i] == 7.0f, "agg qsgd: out written at %u despite a bad code", i);
    } else {
        u32 lo = 0;
        for (u32 g = 0; g < sizes.size(); ++g) {
            for (u32 i = lo; i < lo + sizes[g]; ++i) {
                float want = 0.f;
                for (u32 w = 0; w < k; ++w) want += (float)codes[w][i] * (scales[w][g] / (float)levels);
                want *= inv[k];
                CHECK(__float_as_uint(want) == __float_as_uint(out[i]), "agg qsgd %u: %g vs %g", i, out[i], want);
                if (senders) CHECK(counts[i] == k, "agg qsgd counts %u", i);
            }
            lo += sizes[g];
        }
    }
    SAN_OK(san0);
    ++passes;
    printf("ok   aggregate qsgd n=%u K=%u levels=%u senders=%d bad=%d%s\n", n, k, levels, senders, bad,
           sched_tag.c_str());
}

// f16 and bf16 gradients through the accumulate kernel (exact widening).
static void accumulate_half_case(u32 n) {
    const unsigned long san0 = san_begin();
    std::vector<unsigned short> h(n), bh(n);
    std::mt19937_64 r(3);
    for (u32 i = 0; i < n; ++i) {
        h[i] = emu_f2h((float)((int)(r() % 20001) - 10000) / 77.0f);
        bh[i] = emu_f2bf((float)((int)(r() % 20001) - 10000) / 77.0f);
    }
    for (int kind = 0; kind < 2; ++kind) {
        std::vector<float> e[2] = {std::vector<float>(n + 1, 0.25f), std::vector<float>(n + 1)};
        StepStatus st{};
        StepBuffers b{D(e[0], n, "e0"), D(e[1], n, "e1"), 0, 0, D1(&st, "status"), n, 0.0f};
        emu_launch(ef_begin, 1, 1, b);
        AccArgs acc{b, kind == 0 ? D(h, n, "grad") : D(bh, n, "grad"), 0};
        if (kind == 0) emu_launch(ef_accumulate_f16, grid_for(n, 256), 256, acc);
        else emu_launch(ef_accumulate_bf16, grid_for(n, 256), 256, acc);
        for (u32 i = 0; i < n; ++i) {
            float g = kind == 0 ? emu_h2f(h[i]) : __int_as_float((int)bh[i] << 16);
            CHECK(e[1][i] == 0.25f + g, "half accumulate %d at %u", kind, i);
        }
    }
    SAN_OK(san0);
    ++passes;
    printf("ok   accumulate f16/bf16 n=%u%s\n", n, sched_tag.c_str());
}

// Runs one case under every schedule asked for (--schedule random --seeds N).
template <typename F>
static void each(const char* name, F f) {
    if (!emu_opts.only.empty() && std::string(name).find(emu_opts.only) == std::string::npos) return;
    for (auto& [tag, seed] : emu_schedules()) {
        sched_tag = tag;
        emu_use_schedule(seed);
        f();
    }
}

int main(int argc, char** argv) {
    emu_parse_args(argc, argv);
    each("sign", [] { sign_case({10000}, 0.0f); });
    each("sign", [] { sign_case({5000, 0, 9000, 1, 300}, 0.5f); });
    each("stats", [] { stats_case({0, 1, 4095, 4096, 4097, 20000}, 0.0f, false); });
    each("stats", [] { stats_case({30000}, 1000.0f, true); });
    each("stats", [] { stats_case({5000, 4097, 0, 300}, 5.0f, true, 1); });
    each("variance", [] { var_case({1, 4097, 9000, 0}, 2); });
    each("variance", [] { var_case({20000}, 5); });
    for (bool s : {false, true}) {
        each("aggregate", [&] { agg_case(1, 3, s, 0); });
        each("aggregate", [&] { agg_case(9000, 3, s, 0); });
        each("aggregate", [&] { agg_case(9000, 1, s, 0); });
    }
    for (int c = 1; c <= 3; ++c) each("aggregate", [&] { agg_case(5000, 3, false, c); });
    each("aggregate sign", [] { agg_sign_case(9001, 3, false); });
    each("aggregate sign", [] { agg_sign_case(9001, 2, true); });
    each("accumulate", [] { accumulate_half_case(20000); });
    each("qsgd", [] { qsgd_case({10000}, 7, 0.0f); });
    each("qsgd", [] { qsgd_case({5000, 300, 64, 0, 9000, 1}, 1, 0.5f); });
    each("qsgd", [] { qsgd_case({4097, 777, 5}, 127, 0.0f); });
    each("qsgd", [] { qsgd_case({3000, 64, 10, 901}, 5, 0.0f, false); });
    each("aggregate qsgd", [] { agg_qsgd_case(9001, 3, 7, false, -1); });
    each("aggregate qsgd", [] { agg_qsgd_case(9001, 2, 127, true, -1); });
    each("aggregate qsgd", [] { agg_qsgd_case(5000, 3, 3, false, 4321); });
    // The summary CI log readers look for: alone on the last line.
    printf("%d passed, %d failed\n", passes, failures);
    return failures ? 1 : 0;
}
