//! SPEC-conformance tests for selection (SPEC §1-4), the compressor's selection and count
//! resolution in global and per-layer mode, the statistical properties of random-k and
//! rTop-k, and bad input (§10). Expected results come from the naive references in
//! `common` (full sorts), never from gradsift's own selection code.
//!
//! Error feedback, sign and aggregation: `conformance_ef.rs`. Statistics: `conformance_stats.rs`.

#![allow(
    clippy::needless_range_loop,
    clippy::single_range_in_vec_init,
    clippy::type_complexity
)]

mod common;

use common::*;
use gradsift::Compress;
use gradsift::cpu::{self, Aggregator, Compressor};
use gradsift::philox::philox4x32_10;
use gradsift::{Average, Config, Count, DType, Error, Layout, Method, Mode, Payload, Scale, wire};

// ---------------------------------------------------------------------------------------
// SPEC §3: Philox known answers
// ---------------------------------------------------------------------------------------

#[test]
fn philox_known_answers() {
    assert_eq!(
        philox4x32_10([0; 4], [0; 2]),
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    );
    assert_eq!(
        philox4x32_10([0xffffffff; 4], [0xffffffff; 2]),
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
    );
    assert_eq!(
        philox4x32_10(
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0]
        ),
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
    );
}

/// SPEC §3: the counter is `[i, w, t_lo, t_hi]` and the key `[s_lo, s_hi]`. Steps and seeds
/// above 2^32 make every word matter; the swapped layout must give a different answer, or
/// this test could not tell them apart.
#[test]
fn random_key_counter_and_key_layout() {
    let n = 5000;
    let (w, t, s) = (7u32, 0x0000_0009_0000_0003u64, 0xDEAD_BEEF_0000_0011u64);
    let all: Vec<u32> = (0..n).collect();
    let want = ref_random_k(&all, 40, w, t, s);
    assert_eq!(cpu::random_k(&all, 40, w, t, s).unwrap(), want);

    let swapped_t = t.rotate_left(32);
    let swapped_s = s.rotate_left(32);
    assert_ne!(ref_random_k(&all, 40, w, swapped_t, s), want);
    assert_ne!(ref_random_k(&all, 40, w, t, swapped_s), want);
    assert_ne!(ref_random_k(&all, 40, w + 1, t, s), want);

    // The compressor keys by the step it is given and its config's seed and worker.
    let mut cfg = Config::new(Method::RandomK {
        k: Count::Exact(40),
    });
    cfg.seed = s;
    cfg.worker = w;
    let mut c = Compressor::new(&Layout::single(n as usize).unwrap(), &cfg).unwrap();
    let g = vec![1.0f32; n as usize];
    match c.step(&g, t).unwrap() {
        Payload::Sparse(p) => assert_eq!(p.indices, want),
        p => panic!("{p:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// SPEC §1-2: magnitude order and top-r
// ---------------------------------------------------------------------------------------

fn topk_indices(x: &[f32], k: u64) -> Vec<u32> {
    let cfg = Config::new(Method::TopK { k: Count::Exact(k) });
    let mut c = Compressor::new(&Layout::single(x.len()).unwrap(), &cfg).unwrap();
    match c.step(x, 0).unwrap() {
        Payload::Sparse(p) => p.indices.clone(),
        p => panic!("{p:?}"),
    }
}

#[test]
fn tie_breaking_small_cases() {
    let sub = f32::from_bits;
    // (x, r, expected top-r indices)
    let cases: Vec<(Vec<f32>, usize, Vec<u32>)> = vec![
        // Equal magnitudes: lower index first.
        (vec![2.0, 2.0, 2.0], 1, vec![0]),
        (vec![2.0, 2.0, 2.0], 2, vec![0, 1]),
        // x and -x have equal magnitude.
        (vec![-3.0, 3.0, -3.0], 1, vec![0]),
        (vec![1.0, 3.0, -3.0, 3.0], 2, vec![1, 2]),
        (vec![1.0, -3.0, 3.0, -3.0], 2, vec![1, 2]),
        // +0.0 and -0.0 are equal.
        (vec![-0.0, 0.0, -0.0], 1, vec![0]),
        (vec![0.0, -0.0, 0.0], 2, vec![0, 1]),
        (vec![1.0, 0.0, -0.0], 2, vec![0, 1]),
        (vec![1.0, -0.0, 0.0], 2, vec![0, 1]),
        // Subnormals compare by their bits: no flush to zero.
        (vec![0.0, sub(1)], 1, vec![1]),
        (vec![-0.0, -sub(1), 0.0], 1, vec![1]),
        (vec![sub(3), -sub(5), sub(4), 0.0, -0.0], 1, vec![1]),
        (vec![sub(3), -sub(5), sub(4), 0.0, -0.0], 2, vec![1, 2]),
        (
            vec![sub(3), -sub(5), sub(4), 0.0, -0.0],
            4,
            vec![0, 1, 2, 3],
        ),
        (vec![sub(0x7F_FFFF), f32::MIN_POSITIVE], 1, vec![1]),
        (vec![-sub(0x7F_FFFF), sub(0x7F_FFFE)], 1, vec![0]),
        (vec![sub(2), -sub(2), sub(1)], 2, vec![0, 1]),
        // Infinity is the largest finite-or-not magnitude a gradient reaches.
        (vec![f32::MAX, -f32::INFINITY, 1.0], 1, vec![1]),
    ];
    for (x, r, want) in &cases {
        assert_eq!(&ref_top_r(x, *r), want, "reference disagrees on {x:?}");
        assert_eq!(&cpu::top_r(x, *r).unwrap(), want, "top_r({x:?}, {r})");
        if x.iter().all(|v| v.is_finite()) {
            assert_eq!(&topk_indices(x, *r as u64), want, "Compressor top-k {x:?}");
        }
    }
}

/// The same tie rules at sizes on both sides of the small-group switch (4096), where the
/// tie class straddles the cut-off: many ties, +-0, subnormals, x and -x.
#[test]
fn tie_breaking_large_groups() {
    let mut rng = Rng::new(11);
    for &n in &[4095usize, 4096, 4097, 100_000] {
        for kind in [
            Data::FewLevels,
            Data::MostlyZero,
            Data::AlternatingSign,
            Data::AllEqual,
            Data::Quantized,
            Data::Plateau,
        ] {
            let x = make_data(kind, n, &mut rng);
            let order = ref_order(&x);
            let mut rs = vec![1, 2, n / 100, n / 20, n / 10, n / 7, n / 2, n - 1];
            // Cut inside each tie class boundary region as well.
            for j in 1..order.len() {
                if mag(x[order[j] as usize]) != mag(x[order[j - 1] as usize]) {
                    rs.extend([j - 1, j, j + 1]);
                }
                if rs.len() > 40 {
                    break;
                }
            }
            for &r in &rs {
                let mut want: Vec<u32> = order[..r.min(n)].to_vec();
                want.sort();
                assert_eq!(cpu::top_r(&x, r).unwrap(), want, "n={n} {kind:?} r={r}");
            }
        }
    }
}

#[test]
fn top_r_edge_cases() {
    let mut rng = Rng::new(1);
    for &n in &[0usize, 1, 2, 7, 4095, 4096, 4097, 100_000] {
        for kind in ALL_DATA {
            let x = make_data(kind, n, &mut rng);
            let order = ref_order(&x);
            for r in [
                0,
                1,
                2,
                n / 100,
                n / 10,
                n / 2,
                n.saturating_sub(1),
                n,
                n + 1,
                usize::MAX,
            ] {
                let mut want: Vec<u32> = order[..r.min(n)].to_vec();
                want.sort();
                let got = cpu::top_r(&x, r).unwrap();
                assert_eq!(got, want, "top_r n={n} {kind:?} r={r}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// SPEC §3: random-k
// ---------------------------------------------------------------------------------------

#[test]
fn random_k_edge_cases() {
    let mut rng = Rng::new(2);
    let mut sets: Vec<Vec<u32>> = vec![vec![], vec![0], vec![u32::MAX - 1]];
    for &n in &[2u32, 7, 4095, 4096, 4097, 100_000] {
        sets.push((0..n).collect());
    }
    // Sparse subsets of a large index space, on both sides of 4096 elements.
    for &m in &[10usize, 4095, 4097, 20_000] {
        let mut s: Vec<u32> = (0..m).map(|_| rng.next_u32() % (u32::MAX - 1)).collect();
        s.sort();
        s.dedup();
        sets.push(s);
    }
    let params = [
        (0u32, 0u64, 0u64),
        (3, 17, 99),
        (1 << 31, u64::MAX, 1 << 40),
    ];
    for c in &sets {
        let m = c.len();
        for &(w, t, s) in &params {
            for k in [0, 1, m / 2, m.saturating_sub(1), m, m + 1, usize::MAX] {
                let want = ref_random_k(c, k, w, t, s);
                assert_eq!(
                    cpu::random_k(c, k, w, t, s).unwrap(),
                    want,
                    "|C|={m} k={k} w={w} t={t} s={s}"
                );
            }
        }
    }
}

#[test]
fn random_k_does_not_depend_on_candidate_order() {
    let mut rng = Rng::new(3);
    for &m in &[10usize, 4095, 4097, 50_000] {
        let mut c: Vec<u32> = (0..m).map(|_| rng.next_u32()).collect();
        c.sort();
        c.dedup();
        for k in [1, c.len() / 3, c.len() - 1] {
            let want = ref_random_k(&c, k, 5, 123, 456);
            assert_eq!(cpu::random_k(&c, k, 5, 123, 456).unwrap(), want);
            let mut rev = c.clone();
            rev.reverse();
            assert_eq!(
                cpu::random_k(&rev, k, 5, 123, 456).unwrap(),
                want,
                "reversed"
            );
            for _ in 0..3 {
                let mut sh = c.clone();
                rng.shuffle(&mut sh);
                assert_eq!(
                    cpu::random_k(&sh, k, 5, 123, 456).unwrap(),
                    want,
                    "shuffled"
                );
            }
        }
    }
}

/// SPEC §3: with the same `w` everywhere plain random-k picks the same indices on every
/// worker, whatever its gradient; distinct `w` give different draws.
#[test]
fn random_k_same_worker_id_same_indices() {
    let layout = Layout::single(1000).unwrap();
    let mut rng = Rng::new(4);
    let run = |w: u32, g: &[f32]| {
        let mut cfg = Config::randomk(0.01);
        cfg.worker = w;
        cfg.seed = 77;
        let mut c = Compressor::new(&layout, &cfg).unwrap();
        match c.step(g, 12).unwrap() {
            Payload::Sparse(p) => p.indices.clone(),
            p => panic!("{p:?}"),
        }
    };
    let g1 = make_data(Data::Gauss, 1000, &mut rng);
    let g2 = make_data(Data::Gauss, 1000, &mut rng);
    let a = run(3, &g1);
    assert_eq!(a.len(), 10);
    assert_eq!(a, run(3, &g2));
    assert_eq!(
        a,
        ref_random_k(&(0..1000).collect::<Vec<_>>(), 10, 3, 12, 77)
    );
    assert_ne!(a, run(4, &g1));
}

/// Wilson–Hilferty: the chi-square quantile with `df` degrees of freedom at the standard
/// normal quantile `z`: `df (1 - 2/(9 df) + z sqrt(2/(9 df)))^3`.
fn chi2_quantile_wh(df: f64, z: f64) -> f64 {
    let a = 2.0 / (9.0 * df);
    df * (1.0 - a + z * a.sqrt()).powi(3)
}

/// SPEC §3: random-k is a uniform draw without replacement. n = 100, k = 10, T = 20,000
/// steps of the compressor (the step keys the draw). For sampling without replacement the
/// per-step indicator vector has covariance `p(1-p) n/(n-1) (I - J/n)` (p = k/n), so
/// `X2 = sum_i (c_i - T p)^2 / (T p (1-p) n/(n-1))` is asymptotically chi-square with
/// `n - 1 = 99` degrees of freedom. Two-sided at p ~ 1e-6 per tail (z = 4.7534):
/// Wilson–Hilferty gives 45.6 < X2 < 181.1. The lower bound catches draws that are too even
/// (e.g. a rotation through the indices), the upper one any bias.
#[test]
fn random_k_is_uniform_chi_square() {
    let (n, k, steps) = (100usize, 10usize, 20_000u64);
    let hi = chi2_quantile_wh((n - 1) as f64, 4.7534);
    let lo = chi2_quantile_wh((n - 1) as f64, -4.7534);
    assert!(
        (hi - 181.1).abs() < 0.5 && (lo - 45.6).abs() < 0.5,
        "{lo} {hi}"
    );

    let mut cfg = Config::new(Method::RandomK {
        k: Count::Exact(k as u64),
    });
    cfg.seed = 0x5EED;
    cfg.worker = 2;
    let mut c = Compressor::new(&Layout::single(n).unwrap(), &cfg).unwrap();
    let g: Vec<f32> = (0..n).map(|i| (i as f32 - 50.0) * 0.1).collect();
    let mut counts = vec![0u64; n];
    let mut pair_first = 0u64; // how often index 0 and index 1 are drawn together
    for t in 0..steps {
        c.reset().unwrap();
        let p = match c.step(&g, t).unwrap() {
            Payload::Sparse(p) => p,
            p => panic!("{p:?}"),
        };
        assert_eq!(p.indices.len(), k);
        for &i in &p.indices {
            counts[i as usize] += 1;
        }
        if p.indices.starts_with(&[0, 1]) {
            pair_first += 1;
        }
    }
    let p = k as f64 / n as f64;
    let denom = steps as f64 * p * (1.0 - p) * n as f64 / (n - 1) as f64;
    let x2: f64 = counts
        .iter()
        .map(|&c| (c as f64 - steps as f64 * p).powi(2) / denom)
        .sum();
    assert!(
        x2 > lo && x2 < hi,
        "chi-square {x2:.1} outside ({lo:.1}, {hi:.1}); counts {counts:?}"
    );
    // Pairs: P(0 and 1 both drawn) = k(k-1)/(n(n-1)) = 1/110; binomial, 5 standard errors.
    let q = (k * (k - 1)) as f64 / (n * (n - 1)) as f64;
    let mean = steps as f64 * q;
    let sd = (steps as f64 * q * (1.0 - q)).sqrt();
    assert!(
        (pair_first as f64 - mean).abs() < 5.0 * sd,
        "pair (0,1) drawn {pair_first} times, expected {mean:.1} +- {sd:.1}"
    );
}

// ---------------------------------------------------------------------------------------
// SPEC §4: rTop-k
// ---------------------------------------------------------------------------------------

#[test]
fn rtopk_edge_cases() {
    let mut rng = Rng::new(5);
    for &n in &[0usize, 1, 2, 7, 4095, 4096, 4097, 100_000] {
        for kind in [Data::Gauss, Data::AllEqual, Data::FewLevels] {
            let x = make_data(kind, n, &mut rng);
            let order = ref_order(&x);
            let rs = [0, 1, n / 10, n / 2, n, n + 3, usize::MAX];
            for r in rs {
                let mut top: Vec<u32> = order[..r.min(n)].to_vec();
                top.sort();
                assert_eq!(top, ref_top_r(&x, r));
                for k in [0, 1, r.min(n) / 3, r.min(n), r] {
                    if k > r {
                        continue;
                    }
                    let (w, t, s) = (1u32, n as u64 + 5, 0xABCD);
                    let want = ref_random_k(&top, k, w, t, s);
                    let got = cpu::rtopk(&x, r, k, w, t, s).unwrap();
                    assert_eq!(got, want, "rtopk n={n} {kind:?} r={r} k={k}");
                }
            }
            assert!(matches!(
                cpu::rtopk(&x, 3, 4, 0, 0, 0),
                Err(Error::InvalidConfig(_))
            ));
        }
    }
}

/// SPEC §4: with `Scale::Unbiased`, `E[decode] = top-r vector`. Per layer, the fixed
/// gradient's top-r coordinates are each sent with probability `k/r` as `v r/k`, so one draw
/// has mean `v` and variance `v^2 (r/k - 1)`; the mean of T = 4000 draws (residual reset each
/// step, the step number changing the keys) must lie within 5 standard errors
/// `|v| sqrt((r/k - 1)/T)` of `v` (plus 1e-6 |v| for the f32 multiply). Coordinates outside
/// the top-r are never sent. Layer sizes are chosen so that one scale, 33/7, is not an
/// integer.
#[test]
fn rtopk_unbiased_for_top_r() {
    let sizes = [200usize, 130];
    let layout = Layout::new(&sizes).unwrap();
    let mut cfg = Config::rtopk(0.25, 0.05);
    cfg.mode = Mode::PerLayer;
    cfg.scale = Scale::Unbiased;
    cfg.seed = 2024;
    let groups = ref_groups(&cfg, &sizes);
    assert_eq!((groups[0].r, groups[0].k), (50, 10));
    assert_eq!((groups[1].r, groups[1].k), (33, 7));
    let mut c = Compressor::new(&layout, &cfg).unwrap();
    for (a, b) in c.groups().iter().zip(&groups) {
        assert_eq!((a.r, a.k, a.scale), (b.r, b.k, b.scale));
    }

    let mut rng = Rng::new(6);
    let g: Vec<f32> = (0..330).map(|_| rng.gauss() as f32).collect();
    let steps = 4000u64;
    let mut sum = vec![0.0f64; 330];
    for t in 0..steps {
        c.reset().unwrap();
        let p = match c.step(&g, 1000 + t).unwrap() {
            Payload::Sparse(p) => p,
            p => panic!("{p:?}"),
        };
        for (&i, &v) in p.indices.iter().zip(&p.values) {
            sum[i as usize] += f64::from(v);
        }
    }
    for gr in &groups {
        let top = ref_top_r_range(&g, gr.range.clone(), gr.r);
        let ratio = gr.r as f64 / gr.k as f64;
        for i in gr.range.clone() {
            let v = f64::from(g[i]);
            let mean = sum[i] / steps as f64;
            if top.contains(&(i as u32)) {
                let se = v.abs() * ((ratio - 1.0) / steps as f64).sqrt();
                assert!(
                    (mean - v).abs() <= 5.0 * se + 1e-6 * v.abs(),
                    "coordinate {i}: mean of decoded values {mean} vs top-r value {v} (se {se})"
                );
            } else {
                assert_eq!(
                    sum[i], 0.0,
                    "coordinate {i} is not in the top-r but was sent"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// SPEC §0: f16 / bf16 gradients select like their f32 widening
// ---------------------------------------------------------------------------------------

#[test]
fn half_precision_selects_like_f32_widening() {
    let mut rng = Rng::new(7);
    for &n in &[1000usize, 4096, 4097, 50_000] {
        for kind in ALL_DATA {
            let mut x = make_data(kind, n, &mut rng);
            // Push some of the values into f16's subnormal range.
            for v in x.iter_mut().step_by(3) {
                *v *= 1e-5;
            }
            let h = to_f16(&x);
            let hw = widen_f16(&h);
            let b = to_bf16(&x);
            let bw = widen_bf16(&b);
            for r in [1, n / 10, n - 1] {
                assert_eq!(
                    cpu::top_r(&h, r).unwrap(),
                    ref_top_r(&hw, r),
                    "f16 n={n} {kind:?}"
                );
                assert_eq!(
                    cpu::top_r(&b, r).unwrap(),
                    ref_top_r(&bw, r),
                    "bf16 n={n} {kind:?}"
                );
                let k = r / 2;
                assert_eq!(
                    cpu::rtopk(&h, r, k, 1, 2, 3).unwrap(),
                    cpu::rtopk(&hw, r, k, 1, 2, 3).unwrap()
                );
                assert_eq!(
                    cpu::rtopk(&b, r, k, 1, 2, 3).unwrap(),
                    ref_rtopk(&bw, r, k, 1, 2, 3)
                );
            }
        }
    }
}

#[test]
fn half_precision_compressor_matches_f32_widening() {
    let sizes = [3000usize, 0, 1, 5000];
    let layout = Layout::new(&sizes).unwrap();
    let mut rng = Rng::new(8);
    let configs = [
        Config::rtopk(0.1, 0.02),
        Config::topk(0.01),
        Config::randomk(0.01),
        Config::sign(),
    ];
    for base in &configs {
        for mode in [Mode::Global, Mode::PerLayer] {
            for momentum in [0.0, 0.5] {
                let mut cfg = base.clone();
                cfg.mode = mode;
                cfg.momentum = momentum;
                let mut ch = Compressor::new(&layout, &cfg).unwrap();
                let mut cb = Compressor::new(&layout, &cfg).unwrap();
                let mut cfh = Compressor::new(&layout, &cfg).unwrap();
                let mut cfb = Compressor::new(&layout, &cfg).unwrap();
                for t in 0..3 {
                    let x = make_data(Data::FewLevels, 8001, &mut rng);
                    let h = to_f16(&x);
                    let b = to_bf16(&x);
                    let ph = ch.step(&h, t).unwrap().clone();
                    let pfh = cfh.step(&widen_f16(&h), t).unwrap().clone();
                    assert_eq!(ph, pfh, "{cfg:?} step {t} f16");
                    assert_bits_eq(ch.residual_slice(), cfh.residual_slice(), "f16 residual");
                    assert_bits_eq(ch.momentum_slice(), cfh.momentum_slice(), "f16 momentum");
                    let pb = cb.step(&b, t).unwrap().clone();
                    let pfb = cfb.step(&widen_bf16(&b), t).unwrap().clone();
                    assert_eq!(pb, pfb, "{cfg:?} step {t} bf16");
                    assert_bits_eq(cb.residual_slice(), cfb.residual_slice(), "bf16 residual");
                    assert_bits_eq(cb.momentum_slice(), cfb.momentum_slice(), "bf16 momentum");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Compressor edge cases in global and per-layer mode, against the reference (SPEC §2-5)
// ---------------------------------------------------------------------------------------

fn edge_layouts(rng: &mut Rng) -> Vec<(String, Vec<usize>)> {
    let mut many: Vec<usize> = (0..10_000)
        .map(|_| match rng.below(10) {
            0 => 0,
            1 => 1,
            2..=8 => 2 + rng.below(30) as usize,
            _ => 32 + rng.below(70) as usize,
        })
        .collect();
    many[5000] = 4097;
    many[7000] = 4095;
    vec![
        ("no layers".into(), vec![]),
        ("one empty layer".into(), vec![0]),
        ("empty layers".into(), vec![0, 0, 0]),
        ("one element".into(), vec![1]),
        ("size-1 and empty layers".into(), vec![1, 0, 1, 1]),
        ("4095".into(), vec![4095]),
        ("4096".into(), vec![4096]),
        ("4097".into(), vec![4097]),
        ("100k".into(), vec![100_003]),
        ("mixed".into(), vec![4095, 0, 4096, 1, 4097, 7]),
        ("10,000 layers".into(), many),
    ]
}

fn edge_configs() -> Vec<Config> {
    let ex = Count::Exact;
    let ra = Count::Ratio;
    let mut v = vec![
        Config::new(Method::TopK { k: ra(0.01) }),
        Config::new(Method::TopK { k: ra(0.0) }),
        Config::new(Method::TopK { k: ex(0) }),
        Config::new(Method::TopK { k: ex(u64::MAX) }),
        Config::new(Method::TopK { k: ra(1.0) }),
        Config::new(Method::TopK { k: ra(0.11) }),
        Config::new(Method::RTopK {
            r: ra(0.1),
            k: ra(0.01),
        }),
        Config::new(Method::RTopK {
            r: ex(50),
            k: ex(50),
        }),
        Config::new(Method::RTopK { r: ex(0), k: ex(0) }),
        Config::new(Method::RTopK {
            r: ex(u64::MAX),
            k: ex(5),
        }),
        Config::new(Method::RTopK {
            r: ra(1.0),
            k: ra(0.3),
        }),
        Config::new(Method::RandomK { k: ra(0.05) }),
        Config::new(Method::RandomK { k: ex(0) }),
        Config::new(Method::RandomK { k: ex(u64::MAX) }),
        Config::sign(),
    ];
    let mut scaled = Config::rtopk(0.2, 0.03);
    scaled.scale = Scale::Unbiased;
    scaled.seed = u64::MAX - 3;
    scaled.worker = 9;
    v.push(scaled);
    let mut half = Config::rtopk(0.05, 0.05);
    half.values = DType::F16;
    half.momentum = 0.9;
    v.push(half);
    let mut rk = Config::randomk(0.02);
    rk.scale = Scale::Unbiased;
    rk.values = DType::BF16;
    v.push(rk);
    v
}

#[test]
fn compressor_edge_cases_global_and_per_layer() {
    let mut rng = Rng::new(9);
    for (name, sizes) in edge_layouts(&mut rng) {
        let layout = Layout::new(&sizes).unwrap();
        let n = layout.n();
        // Step 0: all-equal gradient (pure tie-breaking); then continuous and tied data,
        // accumulating in the residual; then tie-heavy shapes from a reset state, so that
        // `p` keeps their ties (a residual would break them).
        let grads = [
            make_data(Data::AllEqual, n, &mut rng),
            make_data(Data::Gauss, n, &mut rng),
            make_data(Data::FewLevels, n, &mut rng),
            make_data(Data::Quantized, n, &mut rng),
            make_data(Data::MostlyZero, n, &mut rng),
            make_data(Data::Plateau, n, &mut rng),
        ];
        let steps = [0u64, 1, (1 << 33) + 5, 3, 4, 5];
        let reset_before = [false, false, false, true, true, true];
        for base in edge_configs() {
            for mode in [Mode::Global, Mode::PerLayer] {
                let mut cfg = base.clone();
                cfg.mode = mode;
                let mut c = Compressor::new(&layout, &cfg).unwrap();
                let mut re = RefEf::new(&cfg, &sizes);
                for (j, (g, &t)) in grads.iter().zip(&steps).enumerate() {
                    let ctx = format!("{name}, {cfg:?}, step {t}");
                    if reset_before[j] {
                        c.reset().unwrap();
                        re.e.iter_mut().for_each(|x| *x = 0.0);
                        re.u.iter_mut().for_each(|x| *x = 0.0);
                        assert!(
                            c.residual_slice().iter().all(|&x| x.to_bits() == 0),
                            "{ctx}"
                        );
                        assert!(
                            c.momentum_slice().iter().all(|&x| x.to_bits() == 0),
                            "{ctx}"
                        );
                    }
                    let out = re.step(g, t).unwrap();
                    let payload = c.step(g, t).unwrap().clone();
                    check_payload_against_ref(
                        &payload,
                        out,
                        &mut re,
                        c.residual_slice(),
                        c.momentum_slice(),
                        &ctx,
                    );
                }
            }
        }
    }
}

/// Count resolution (SPEC §2) as the plan reports it, per layer, against the f64 formula.
#[test]
fn counts_from_ratios_per_layer() {
    let sizes = [0usize, 1, 2, 3, 99, 100, 101, 4095, 4096, 4097, 123_457];
    let layout = Layout::new(&sizes).unwrap();
    for (rr, rk) in [
        (0.1, 0.01),
        (0.07, 0.07),
        (1.0, 0.5),
        (0.0, 0.0),
        (0.333, 0.001),
    ] {
        for mode in [Mode::Global, Mode::PerLayer] {
            let mut cfg = Config::rtopk(rr, rk);
            cfg.mode = mode;
            let c = Compressor::new(&layout, &cfg).unwrap();
            let want = ref_groups(&cfg, &sizes);
            assert_eq!(c.groups().len(), want.len());
            for (a, b) in c.groups().iter().zip(&want) {
                assert_eq!(a.range, b.range);
                assert_eq!(
                    (a.r, a.k),
                    (b.r, b.k),
                    "rho = ({rr}, {rk}), n_l = {}",
                    b.range.len()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// SPEC §10: bad input is a typed error, never a panic
// ---------------------------------------------------------------------------------------

#[test]
fn bad_configs_are_errors() {
    let layout = Layout::single(100).unwrap();
    let bad_ratios = [
        -0.1,
        -1e-300,
        1.0000001,
        2.0,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ];
    for rho in bad_ratios {
        let ok = Count::Ratio(0.5);
        let bad = Count::Ratio(rho);
        for m in [
            Method::TopK { k: bad },
            Method::RandomK { k: bad },
            Method::RTopK { r: bad, k: ok },
            Method::RTopK { r: ok, k: bad },
        ] {
            let r = Compressor::new(&layout, &Config::new(m));
            assert!(
                matches!(r, Err(Error::InvalidConfig(_))),
                "{m:?} accepted: {r:?}"
            );
        }
    }
    // k > r.
    for m in [
        Method::RTopK {
            r: Count::Ratio(0.01),
            k: Count::Ratio(0.02),
        },
        Method::RTopK {
            r: Count::Exact(3),
            k: Count::Exact(4),
        },
    ] {
        assert!(matches!(
            Compressor::new(&layout, &Config::new(m)),
            Err(Error::InvalidConfig(_))
        ));
    }
    let x = vec![1.0f32; 10];
    assert!(matches!(
        cpu::rtopk(&x, 3, 4, 0, 0, 0),
        Err(Error::InvalidConfig(_))
    ));
    // Momentum outside [0, 1).
    for m in [-0.1f32, 1.0, 1.5, f32::NAN, f32::INFINITY] {
        let mut cfg = Config::topk(0.1);
        cfg.momentum = m;
        assert!(matches!(
            Compressor::new(&layout, &cfg),
            Err(Error::InvalidConfig(_))
        ));
    }
    // A mixed ratio/explicit pair is resolved per group and never sends more than r_l.
    let cfg = Config::new(Method::RTopK {
        r: Count::Ratio(0.1),
        k: Count::Exact(1000),
    });
    if let Ok(mut c) = Compressor::new(&layout, &cfg) {
        for g in c.groups() {
            assert!(g.k <= g.r);
        }
        match c.step(&vec![1.0f32; 100], 0).unwrap() {
            Payload::Sparse(p) => assert!(p.indices.len() <= 10),
            p => panic!("{p:?}"),
        }
    }
}

#[test]
fn bad_lengths_and_sizes_are_errors() {
    // Layout sizes that add up to 2^32 or more.
    let half = 1usize << 31;
    assert!(matches!(
        Layout::new(&[half, half]),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        Layout::new(&[usize::MAX, 1]),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        Layout::new(&[1, usize::MAX]),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        Layout::single(1 << 32),
        Err(Error::TooLarge { .. })
    ));
    assert!(Layout::single((1 << 32) - 1).is_ok());

    // Gradient length that does not match the layout: error, state untouched.
    let layout = Layout::new(&[10, 0, 5]).unwrap();
    let mut cfg = Config::rtopk(0.5, 0.2);
    cfg.momentum = 0.5;
    let mut c = Compressor::new(&layout, &cfg).unwrap();
    let g: Vec<f32> = (0..15).map(|i| i as f32 - 7.0).collect();
    c.step(&g, 0).unwrap();
    let (e, u) = (c.residual_slice().to_vec(), c.momentum_slice().to_vec());
    for len in [0usize, 14, 16, 100] {
        let bad = vec![1.0f32; len];
        assert!(matches!(
            c.step(&bad, 1),
            Err(Error::LengthMismatch {
                expected: 15,
                got,
                ..
            }) if got == len
        ));
        assert!(matches!(
            c.step(&to_f16(&bad), 1),
            Err(Error::LengthMismatch { .. })
        ));
    }
    assert_bits_eq(c.residual_slice(), &e, "residual after length errors");
    assert_bits_eq(c.momentum_slice(), &u, "momentum after length errors");

    // K = 0 workers.
    for rule in [Average::OverWorkers, Average::OverSenders] {
        assert!(matches!(
            Aggregator::new(&layout, Mode::Global, rule, 0),
            Err(Error::InvalidConfig(_))
        ));
    }

    // Duplicate candidates to random-k.
    assert!(cpu::random_k(&[3, 1, 3], 2, 0, 0, 0).is_err());
}

/// SPEC §10: decoding never panics, whatever the bytes, and valid payloads round-trip.
#[test]
fn wire_decode_never_panics() {
    let sizes = [130usize, 0, 170];
    let layout = Layout::new(&sizes).unwrap();
    let mut rng = Rng::new(10);
    let mut messages = Vec::new();
    for (mut cfg, mode) in [
        (Config::rtopk(0.3, 0.1), Mode::Global),
        (Config::topk(0.05), Mode::PerLayer),
        (Config::sign(), Mode::PerLayer),
        (Config::sign(), Mode::Global),
        (Config::qsgd(3), Mode::PerLayer),
        (Config::qsgd(127), Mode::Global),
    ] {
        for values in [DType::F32, DType::F16, DType::BF16] {
            cfg.mode = mode;
            cfg.values = values;
            let mut c = Compressor::new(&layout, &cfg).unwrap();
            let g = make_data(Data::Gauss, 300, &mut rng);
            let p = c.step(&g, 0).unwrap().clone();
            let mut bytes = Vec::new();
            wire::encode(&p, &mut bytes).unwrap();
            assert_eq!(wire::decode(&bytes).unwrap(), p, "round trip {cfg:?}");
            messages.push(bytes);
        }
    }
    let check = |b: &[u8]| {
        if let Ok(p) = wire::decode(b) {
            // Whatever decodes must be a well-formed payload.
            match p {
                Payload::Sparse(s) => {
                    assert_eq!(s.indices.len(), s.values.len());
                    assert!(s.indices.windows(2).all(|w| w[0] < w[1]));
                    assert!(s.indices.iter().all(|&i| i < s.n));
                }
                Payload::Sign(s) => {
                    assert_eq!(s.negative.len(), (s.n as usize).div_ceil(64));
                }
                Payload::Qsgd(q) => {
                    assert_eq!(q.codes.len(), q.n as usize);
                    let l = q.levels as i8;
                    assert!(q.codes.iter().all(|c| (-l..=l).contains(c)));
                }
            }
        }
    };
    for m in &messages {
        for len in 0..m.len() {
            assert!(
                wire::decode(&m[..len]).is_err(),
                "truncated to {len} accepted"
            );
        }
        let mut long = m.clone();
        long.push(0);
        assert!(wire::decode(&long).is_err(), "trailing byte accepted");
        for at in 0..m.len() {
            for mask in [0x01u8, 0x80, 0xFF, 0x10] {
                let mut b = m.clone();
                b[at] ^= mask;
                check(&b);
            }
        }
    }
    for len in [0usize, 1, 7, 8, 13, 64, 1000] {
        for _ in 0..50 {
            let mut b: Vec<u8> = (0..len).map(|_| rng.next_u32() as u8).collect();
            if len >= 4 && rng.below(2) == 0 {
                b[..4].copy_from_slice(&[b'G', b'S', 1, 0x10 | (rng.below(3) as u8)]);
            }
            check(&b);
        }
    }
    // Payloads the aggregator would reject are not encodable either.
    let bad = Payload::Sparse(gradsift::SparsePayload {
        n: 10,
        values_dtype: DType::F16,
        indices: vec![3, 3],
        values: vec![1.0, 2.0],
    });
    assert!(wire::encode(&bad, &mut Vec::new()).is_err());
}
