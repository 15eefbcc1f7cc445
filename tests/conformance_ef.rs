//! SPEC-conformance tests for error feedback (§5), non-finite steps (§5, §10), scaled sign
//! (§6) and aggregation (§7). Expected results come from naive loops written from the SPEC.

#![allow(
    clippy::needless_range_loop,
    clippy::single_range_in_vec_init,
    clippy::type_complexity
)]

mod common;

use common::*;
use gradsift::cpu::{Aggregator, Compressor};
use gradsift::{Aggregate, Compress};
use gradsift::{
    Average, Config, Count, DType, Error, Layout, Method, Mode, Payload, Scale, SignPayload,
    SparsePayload,
};

fn sparse(p: &Payload) -> &SparsePayload {
    match p {
        Payload::Sparse(s) => s,
        p => panic!("expected a sparse payload, got {p:?}"),
    }
}

fn sign(p: &Payload) -> &SignPayload {
    match p {
        Payload::Sign(s) => s,
        p => panic!("expected a sign payload, got {p:?}"),
    }
}

fn max_finite(dt: DType) -> f32 {
    match dt {
        DType::F32 => f32::MAX,
        DType::F16 => 65504.0,
        DType::BF16 => gradsift::bf16::MAX.to_f32(),
    }
}

/// Gradients over a wide dynamic range: beyond f16's range, in its subnormal range, below
/// it, and signed zeros.
fn wide_gradient(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.below(20) {
            0 => 0.0,
            1 => -0.0,
            2 => (rng.gauss() * 1e5) as f32,
            3 => (rng.gauss() * 1e-6) as f32,
            4 => (rng.gauss() * 1e-9) as f32,
            _ => (rng.gauss() * 10f64.powf(rng.uniform() * 6.0 - 4.0)) as f32,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// SPEC §5: error feedback
// ---------------------------------------------------------------------------------------

/// `p = e + g` (or `u = m u + g; p = e + u`), `e_new = p - decode(c)` with decode after value
/// encoding, so `p == e_new + decode(c)` for every coordinate; unsent coordinates keep `p`
/// exactly; momentum is zeroed at sent indices and kept elsewhere. The selection is the
/// reference rTop-k of `p`. f32, f16 and bf16 value encodings, unscaled values.
#[test]
fn error_feedback_invariant_value_dtypes() {
    let sizes = [1000usize, 0, 3000, 1];
    let layout = Layout::new(&sizes).unwrap();
    let n = layout.n();
    let mut rng = Rng::new(21);
    for values in [DType::F32, DType::F16, DType::BF16] {
        for momentum in [0.0f32, 0.9] {
            for base in [
                Config::rtopk(0.1, 0.02),
                Config::topk(0.01),
                Config::randomk(0.02),
            ] {
                for mode in [Mode::Global, Mode::PerLayer] {
                    let mut cfg = base.clone();
                    cfg.values = values;
                    cfg.momentum = momentum;
                    cfg.mode = mode;
                    cfg.seed = 31337;
                    cfg.worker = 4;
                    let groups = ref_groups(&cfg, &sizes);
                    let mut c = Compressor::new(&layout, &cfg).unwrap();
                    let mut sent_any_rounded = false;
                    for t in 0..6u64 {
                        let ctx = format!("{cfg:?} step {t}");
                        let g = wide_gradient(n, &mut rng);
                        let e_old = c.residual_slice().to_vec();
                        let u_old = if momentum > 0.0 {
                            c.momentum_slice().to_vec()
                        } else {
                            vec![0.0; n]
                        };
                        let u: Vec<f32> = (0..n).map(|i| momentum * u_old[i] + g[i]).collect();
                        let p: Vec<f32> = if momentum > 0.0 {
                            (0..n).map(|i| e_old[i] + u[i]).collect()
                        } else {
                            (0..n).map(|i| e_old[i] + g[i]).collect()
                        };
                        let payload = sparse(c.step(&g, t).unwrap()).clone();
                        let e_new = c.residual_slice();
                        assert_eq!(payload.values_dtype, values);
                        assert_eq!(payload.n as usize, n);

                        let mut want_idx = Vec::new();
                        for gr in &groups {
                            let top = ref_top_r_range(&p, gr.range.clone(), gr.r);
                            want_idx.extend(ref_random_k(&top, gr.k, 4, t, 31337));
                        }
                        assert_eq!(payload.indices, want_idx, "{ctx}: selection");
                        assert_eq!(payload.values.len(), payload.indices.len());

                        let mut sent = vec![false; n];
                        for (&i, &v) in payload.indices.iter().zip(&payload.values) {
                            let i = i as usize;
                            sent[i] = true;
                            let pi = p[i];
                            assert!(v.is_finite(), "{ctx}: value at {i} not finite");
                            assert!(representable(values, v), "{ctx}: {v:e} not in {values:?}");
                            if pi.abs() <= max_finite(values) {
                                assert_eq!(
                                    v.to_bits(),
                                    ref_quantize(values, pi).to_bits(),
                                    "{ctx}: value at {i}: p = {pi:e}"
                                );
                            } else {
                                // Beyond the format's range: the SPEC only asks that the
                                // error stays in the residual; the value must not overshoot.
                                assert!(v.abs() <= pi.abs() && (v < 0.0) == (pi < 0.0));
                            }
                            sent_any_rounded |= v != pi;
                            // e_new = p - decode(c), one f32 subtraction...
                            assert_eq!(
                                e_new[i].to_bits(),
                                (pi - v).to_bits(),
                                "{ctx}: residual at sent {i}: p = {pi:e}, v = {v:e}"
                            );
                            // ...and nothing is lost: p == e_new + decode(c). (p - p is +0 by
                            // IEEE, so a sent -0.0 comes back as +0.0: compare as values there.)
                            let back = e_new[i] + v;
                            if pi == 0.0 {
                                assert_eq!(back, 0.0, "{ctx}: {i}");
                            } else {
                                assert_eq!(
                                    back.to_bits(),
                                    pi.to_bits(),
                                    "{ctx}: p != e + v at {i}"
                                );
                            }
                        }
                        for i in 0..n {
                            if !sent[i] {
                                assert_eq!(
                                    e_new[i].to_bits(),
                                    p[i].to_bits(),
                                    "{ctx}: unsent {i} must keep p"
                                );
                            }
                        }
                        if momentum > 0.0 {
                            let m = c.momentum_slice();
                            for i in 0..n {
                                if sent[i] {
                                    assert_eq!(m[i], 0.0, "{ctx}: momentum not masked at {i}");
                                } else {
                                    assert_eq!(m[i].to_bits(), u[i].to_bits(), "{ctx}: u at {i}");
                                }
                            }
                        }
                    }
                    if values != DType::F32 {
                        assert!(
                            sent_any_rounded,
                            "{cfg:?}: the test never exercised rounding"
                        );
                    }
                }
            }
        }
    }
}

/// With `Scale::Unbiased` the value is `q(p * f32(r)/f32(k))` and the residual is still
/// `p - decode(c)` (SPEC §4, §5).
#[test]
fn error_feedback_with_unbiased_scale() {
    let sizes = [700usize, 300];
    let layout = Layout::new(&sizes).unwrap();
    let mut rng = Rng::new(22);
    for values in [DType::F32, DType::F16, DType::BF16] {
        for mode in [Mode::Global, Mode::PerLayer] {
            let mut cfg = Config::rtopk(0.07, 0.03);
            cfg.scale = Scale::Unbiased;
            cfg.values = values;
            cfg.mode = mode;
            let mut c = Compressor::new(&layout, &cfg).unwrap();
            let mut re = RefEf::new(&cfg, &sizes);
            for t in 0..5 {
                let g: Vec<f32> = (0..1000).map(|_| rng.gauss() as f32).collect();
                let out = re.step(&g, t).unwrap();
                let payload = c.step(&g, t).unwrap().clone();
                check_payload_against_ref(
                    &payload,
                    out,
                    &mut re,
                    c.residual_slice(),
                    c.momentum_slice(),
                    &format!("{cfg:?} step {t}"),
                );
            }
        }
    }
}

/// Momentum correction against the reference over many steps (plain multiply then add, as the
/// CPU reference does; GPU backends may fuse, SPEC §11).
#[test]
fn momentum_correction_matches_reference() {
    let sizes = [5000usize, 17, 0, 3000];
    let layout = Layout::new(&sizes).unwrap();
    let mut rng = Rng::new(23);
    for base in [
        Config::rtopk(0.05, 0.01),
        Config::topk(0.02),
        Config::sign(),
    ] {
        for mode in [Mode::Global, Mode::PerLayer] {
            let mut cfg = base.clone();
            cfg.momentum = 0.9;
            cfg.mode = mode;
            let mut c = Compressor::new(&layout, &cfg).unwrap();
            let mut re = RefEf::new(&cfg, &sizes);
            for t in 0..8 {
                let g: Vec<f32> = (0..layout.n()).map(|_| rng.gauss() as f32).collect();
                let out = re.step(&g, t).unwrap();
                let payload = c.step(&g, t).unwrap().clone();
                check_payload_against_ref(
                    &payload,
                    out,
                    &mut re,
                    c.residual_slice(),
                    c.momentum_slice(),
                    &format!("{cfg:?} step {t}"),
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// SPEC §5, §10: a non-finite accumulated vector fails the step and changes nothing
// ---------------------------------------------------------------------------------------

#[test]
fn non_finite_step_is_rejected_and_changes_nothing() {
    let sizes = [500usize, 0, 700];
    let layout = Layout::new(&sizes).unwrap();
    let n = layout.n();
    let mut per_layer_f16 = Config::rtopk(0.1, 0.05);
    per_layer_f16.mode = Mode::PerLayer;
    per_layer_f16.values = DType::F16;
    per_layer_f16.momentum = 0.9;
    let mut sign_m = Config::sign();
    sign_m.momentum = 0.5;
    let mut rtopk_m = Config::rtopk(0.1, 0.01);
    rtopk_m.momentum = 0.9;
    let configs = [rtopk_m, sign_m, Config::topk(0.05), per_layer_f16];

    let nan = f32::NAN;
    let inf = f32::INFINITY;
    let bad_cases: Vec<(Vec<(usize, f32)>, u64, u32)> = vec![
        (vec![(17, nan)], 1, 17),
        (vec![(n - 1, inf)], 1, (n - 1) as u32),
        (vec![(0, -inf)], 1, 0),
        (vec![(600, nan), (40, inf), (41, -inf), (n - 1, nan)], 4, 40),
    ];
    let mut rng = Rng::new(24);
    for cfg in &configs {
        let mut a = Compressor::new(&layout, cfg).unwrap();
        let mut b = Compressor::new(&layout, cfg).unwrap();
        for t in 0..3 {
            let g: Vec<f32> = (0..n).map(|_| rng.gauss() as f32).collect();
            a.step(&g, t).unwrap();
            b.step(&g, t).unwrap();
        }
        if cfg.momentum > 0.0 && cfg.is_sparse() {
            assert!(a.momentum_slice().iter().any(|&u| u != 0.0));
        }
        let mut cases = bad_cases.clone();
        cases.push(((0..n).map(|i| (i, nan)).collect(), n as u64, 0));
        for (t, (bad, count, first)) in cases.iter().enumerate() {
            let e = a.residual_slice().to_vec();
            let u = a.momentum_slice().to_vec();
            let mut g: Vec<f32> = (0..n).map(|_| rng.gauss() as f32).collect();
            for &(i, v) in bad {
                g[i] = v;
            }
            let r = a.step(&g, 10 + t as u64).map(|_| ());
            assert_eq!(
                r,
                Err(Error::NonFinite {
                    count: *count,
                    first_index: *first,
                }),
                "{cfg:?}: {bad:?}"
            );
            // Same through an f16 gradient.
            let h = to_f16(&g);
            let r = a.step(&h, 10 + t as u64).map(|_| ());
            assert_eq!(
                r,
                Err(Error::NonFinite {
                    count: *count,
                    first_index: *first,
                }),
                "{cfg:?} f16: {bad:?}"
            );
            assert_bits_eq(a.residual_slice(), &e, "residual after a rejected step");
            assert_bits_eq(a.momentum_slice(), &u, "momentum after a rejected step");
        }
        // The failed steps left no trace: both plans go on identically.
        for t in 20..23 {
            let g: Vec<f32> = (0..n).map(|_| rng.gauss() as f32).collect();
            let pa = a.step(&g, t).unwrap().clone();
            let pb = b.step(&g, t).unwrap().clone();
            assert_eq!(pa, pb, "{cfg:?}");
            assert_bits_eq(
                a.residual_slice(),
                b.residual_slice(),
                "residual after recovery",
            );
            assert_bits_eq(
                a.momentum_slice(),
                b.momentum_slice(),
                "momentum after recovery",
            );
        }
    }
}

/// `p` can overflow although every input is finite: the residual of unsent coordinates
/// (or the velocity) grows. That is a non-finite `p` too (SPEC §10).
#[test]
fn overflow_in_accumulation_is_non_finite() {
    let layout = Layout::single(10).unwrap();
    for momentum in [0.0f32, 0.9] {
        let mut cfg = Config::new(Method::TopK { k: Count::Exact(0) });
        cfg.momentum = momentum;
        let mut c = Compressor::new(&layout, &cfg).unwrap();
        let mut g = vec![1.0f32; 10];
        g[5] = 3e38;
        g[7] = -3e38;
        c.step(&g, 0).unwrap();
        let e = c.residual_slice().to_vec();
        let u = c.momentum_slice().to_vec();
        assert_eq!(e[5], 3e38);
        assert_eq!(
            c.step(&g, 1).map(|_| ()),
            Err(Error::NonFinite {
                count: 2,
                first_index: 5
            }),
            "momentum {momentum}"
        );
        assert_bits_eq(c.residual_slice(), &e, "residual");
        assert_bits_eq(c.momentum_slice(), &u, "momentum");
    }
}

/// SPEC §5: a sent value that only `Scale::Unbiased` makes non-finite (`|p| * scale >
/// f32::MAX`, `p` finite) fails the step like a non-finite `p`: `Error::NonFinite` with the
/// count and the first index of the offending sent values, residual and momentum untouched
/// bit for bit, and no payload. f16/bf16 values do not escape it: their saturation applies
/// to finite values only, and `p * scale` is already infinite in f32.
#[test]
fn unbiased_scale_overflow_fails_the_step_and_changes_nothing() {
    let sizes = [40usize, 0, 24];
    let layout = Layout::new(&sizes).unwrap();
    let n = layout.n();
    let mut rng = Rng::new(25);
    for values in [DType::F32, DType::F16, DType::BF16] {
        for mode in [Mode::Global, Mode::PerLayer] {
            for momentum in [0.0f32, 0.9] {
                // Global: r = 16, k = 4, scale 4. Per layer: (r, k) = (10, 2), scale 5, and
                // (6, 2), scale 3.
                let mut cfg = Config::rtopk(0.25, 0.05);
                cfg.scale = Scale::Unbiased;
                cfg.values = values;
                cfg.mode = mode;
                cfg.momentum = momentum;
                cfg.seed = 7;
                cfg.worker = 2;
                let mut a = Compressor::new(&layout, &cfg).unwrap();
                let mut b = Compressor::new(&layout, &cfg).unwrap();
                let groups = a.groups().to_vec();
                for t in 0..3 {
                    let g: Vec<f32> = (0..n).map(|_| rng.gauss() as f32).collect();
                    a.step(&g, t).unwrap();
                    b.step(&g, t).unwrap();
                }
                // Exactly r_g huge elements per group: they are its top-r, so every sent value
                // is 2e38 * scale (scale >= 3): infinite. The random-k draw among them is
                // the reference's.
                let mut planted = Vec::new();
                for gr in &groups {
                    let len = gr.range.len();
                    planted
                        .extend((0..gr.r).map(|j| (gr.range.start + j * len / gr.r.max(1)) as u32));
                }
                let t = 10;
                let mut want_sent = Vec::new();
                for gr in &groups {
                    let cand: Vec<u32> = planted
                        .iter()
                        .copied()
                        .filter(|&i| gr.range.contains(&(i as usize)))
                        .collect();
                    want_sent.extend(ref_random_k(&cand, gr.k, cfg.worker, t, cfg.seed));
                }
                assert_eq!(want_sent.len(), 4, "{cfg:?}");
                let e = a.residual_slice().to_vec();
                let u = a.momentum_slice().to_vec();
                let mut g: Vec<f32> = (0..n).map(|_| rng.gauss() as f32).collect();
                for (j, &i) in planted.iter().enumerate() {
                    g[i as usize] = if j % 2 == 0 { 2e38 } else { -2e38 };
                }
                let ctx = format!("{cfg:?}");
                assert_eq!(
                    a.step(&g, t).map(|_| ()),
                    Err(Error::NonFinite {
                        count: 4,
                        first_index: *want_sent.iter().min().unwrap(),
                    }),
                    "{ctx}"
                );
                assert_bits_eq(a.residual_slice(), &e, &format!("{ctx}: residual"));
                assert_bits_eq(a.momentum_slice(), &u, &format!("{ctx}: momentum"));
                // With a non-finite p as well, the step reports p (as without scaling).
                let mut g2 = g.clone();
                g2[n - 1] = f32::NAN;
                assert_eq!(
                    a.step(&g2, t).map(|_| ()),
                    Err(Error::NonFinite {
                        count: 1,
                        first_index: (n - 1) as u32,
                    }),
                    "{ctx}"
                );
                assert_bits_eq(a.residual_slice(), &e, &format!("{ctx}: residual"));
                assert_bits_eq(a.momentum_slice(), &u, &format!("{ctx}: momentum"));
                // Just below the edge the values are finite and the step goes through.
                for &i in &planted {
                    g[i as usize] = g[i as usize].signum() * 5e37;
                }
                let mut a2 = Compressor::new(&layout, &cfg).unwrap();
                let p = a2.step(&g, t).unwrap();
                assert!(sparse(p).values.iter().all(|v| v.is_finite()), "{ctx}");
                // The rejected steps left no trace.
                for t in 20..23 {
                    let g: Vec<f32> = (0..n).map(|_| rng.gauss() as f32).collect();
                    let pa = a.step(&g, t).unwrap().clone();
                    let pb = b.step(&g, t).unwrap().clone();
                    assert_eq!(pa, pb, "{ctx}");
                    assert_bits_eq(
                        a.residual_slice(),
                        b.residual_slice(),
                        "residual after recovery",
                    );
                    assert_bits_eq(
                        a.momentum_slice(),
                        b.momentum_slice(),
                        "momentum after recovery",
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// SPEC §6: scaled sign
// ---------------------------------------------------------------------------------------

#[test]
fn scaled_sign_small_example() {
    let layout = Layout::new(&[4, 0, 3]).unwrap();
    let g = [1.0f32, -2.0, 0.0, 3.0, -0.0, -4.0, 0.5];
    // Global: scale = 10.5 / 7 = 1.5.
    let mut c = Compressor::new(&layout, &Config::sign()).unwrap();
    let p = sign(c.step(&g, 0).unwrap()).clone();
    assert_eq!(p.n, 7);
    assert_eq!(p.scales, vec![1.5]);
    let neg: Vec<bool> = (0..7).map(|i| p.is_negative(i)).collect();
    assert_eq!(neg, [false, true, false, false, false, true, false]);
    assert_eq!(p.negative, vec![0b010_0010]);
    assert_bits_eq(
        c.residual_slice(),
        &[-0.5, -0.5, -1.5, 1.5, -1.5, -2.5, -1.0],
        "global sign residual",
    );
    // Per layer: scales 1.5, (empty), 1.5 = 4.5 / 3.
    let mut cfg = Config::sign();
    cfg.mode = Mode::PerLayer;
    let mut c = Compressor::new(&layout, &cfg).unwrap();
    let p = sign(c.step(&g, 0).unwrap()).clone();
    assert_eq!(p.scales.len(), 3);
    assert_eq!((p.scales[0], p.scales[2]), (1.5, 1.5));
    assert_eq!(p.scales[1], 0.0, "an empty layer has nothing to scale");
    assert_bits_eq(
        c.residual_slice(),
        &[-0.5, -0.5, -1.5, 1.5, -1.5, -2.5, -1.0],
        "per-layer sign residual",
    );
}

#[test]
fn scaled_sign_matches_reference() {
    let sizes = [0usize, 1, 63, 64, 65, 1000, 0, 5000];
    let layout = Layout::new(&sizes).unwrap();
    let mut rng = Rng::new(25);
    for mode in [Mode::Global, Mode::PerLayer] {
        for momentum in [0.0f32, 0.7] {
            let mut cfg = Config::sign();
            cfg.mode = mode;
            cfg.momentum = momentum;
            let mut c = Compressor::new(&layout, &cfg).unwrap();
            let mut re = RefEf::new(&cfg, &sizes);
            for t in 0..5 {
                let g = match t {
                    0 => make_data(Data::MostlyZero, layout.n(), &mut rng),
                    1 => make_data(Data::FewLevels, layout.n(), &mut rng),
                    _ => wide_gradient(layout.n(), &mut rng),
                };
                let out = re.step(&g, t).unwrap();
                let payload = c.step(&g, t).unwrap().clone();
                check_payload_against_ref(
                    &payload,
                    out,
                    &mut re,
                    c.residual_slice(),
                    c.momentum_slice(),
                    &format!("{cfg:?} step {t}"),
                );
                if momentum > 0.0 {
                    assert!(
                        c.momentum_slice().iter().all(|&u| u == 0.0),
                        "every element was sent"
                    );
                }
            }
        }
    }
    // A zero-mean Gaussian: scale = mean |p| ~ sqrt(2/pi) sigma (SPEC §6), sigma = 3.
    let n = 200_000;
    let mut c = Compressor::new(&Layout::single(n).unwrap(), &Config::sign()).unwrap();
    let g: Vec<f32> = (0..n).map(|_| (3.0 * rng.gauss()) as f32).collect();
    let s = sign(c.step(&g, 0).unwrap()).scales[0] as f64;
    let want = 3.0 * (2.0 / std::f64::consts::PI).sqrt();
    // sd of mean |X| is sigma sqrt(1 - 2/pi)/sqrt(n) ~ 0.004; allow 5 of them.
    assert!((s - want).abs() < 0.02, "{s} vs {want}");
}

// ---------------------------------------------------------------------------------------
// SPEC §7: aggregation
// ---------------------------------------------------------------------------------------

/// Naive §7: per coordinate, start from 0.0, add each worker's value in order k = 0..K-1,
/// then multiply by f32(1/K) or f32(1/c_i) (0 where nobody sent). `groups` gives the sign
/// payloads' scale ranges.
fn naive_aggregate(
    payloads: &[Payload],
    n: usize,
    groups: &[std::ops::Range<usize>],
    rule: Average,
) -> Vec<f32> {
    let kk = payloads.len();
    let mut out = vec![0.0f32; n];
    let mut count = vec![0u32; n];
    for i in 0..n {
        let mut acc = 0.0f32;
        for p in payloads {
            match p {
                Payload::Sparse(s) => {
                    if let Some(j) = s.indices.iter().position(|&x| x as usize == i) {
                        acc += s.values[j];
                        count[i] += 1;
                    }
                }
                Payload::Sign(s) => {
                    let g = groups.iter().position(|r| r.contains(&i)).unwrap();
                    let neg = (s.negative[i / 64] >> (i % 64)) & 1 == 1;
                    acc += if neg { -s.scales[g] } else { s.scales[g] };
                    count[i] += 1;
                }
                Payload::Qsgd(q) => {
                    // SPEC §13: level * scale / levels, in f32.
                    let g = groups.iter().position(|r| r.contains(&i)).unwrap();
                    acc += f32::from(q.codes[i]) * q.scales[g] / f32::from(q.levels);
                    count[i] += 1;
                }
            }
        }
        out[i] = match rule {
            Average::OverWorkers => acc * (1.0f32 / kk as f32),
            Average::OverSenders => {
                if count[i] == 0 {
                    0.0
                } else {
                    acc * (1.0f32 / count[i] as f32)
                }
            }
        };
    }
    out
}

fn check_aggregate(payloads: &[Payload], layout: &Layout, mode: Mode, sizes: &[usize], ctx: &str) {
    let off = offsets(sizes);
    let groups: Vec<std::ops::Range<usize>> = match mode {
        Mode::Global => vec![0..layout.n()],
        Mode::PerLayer => (0..sizes.len()).map(|l| off[l]..off[l + 1]).collect(),
    };
    for rule in [Average::OverWorkers, Average::OverSenders] {
        let want = naive_aggregate(payloads, layout.n(), &groups, rule);
        let mut agg = Aggregator::new(layout, mode, rule, payloads.len()).unwrap();
        // Twice with the same plan (its sender counts must not leak between calls), over a
        // sentinel so that every coordinate must be written.
        for round in 0..2 {
            let mut out = vec![f32::from_bits(0x7FC0_BEEF); layout.n()];
            agg.aggregate(payloads, &mut out).unwrap();
            assert_bits_eq(&out, &want, &format!("{ctx} {rule:?} round {round}"));
        }
    }
}

#[test]
fn aggregation_matches_naive_sparse() {
    let n = 2000usize;
    let layout = Layout::single(n).unwrap();
    let mut rng = Rng::new(26);
    for kk in [1usize, 2, 3, 5, 7] {
        // Hand-built payloads with heavy overlap and values for which the order of the sum
        // matters (1e8 + 1 - 1e8), signed zeros and subnormals.
        let mut payloads = Vec::new();
        for _ in 0..kk {
            let mut idx: Vec<u32> = (0..n as u32).filter(|_| rng.below(3) != 0).collect();
            idx.dedup();
            let values: Vec<f32> = idx
                .iter()
                .map(|_| match rng.below(8) {
                    0 => 1e8,
                    1 => -1e8,
                    2 => 1.0,
                    3 => -0.0,
                    4 => f32::from_bits(1 + rng.below(100) as u32),
                    _ => (rng.gauss() * 1e3) as f32,
                })
                .collect();
            payloads.push(Payload::Sparse(SparsePayload {
                n: n as u32,
                values_dtype: DType::F32,
                indices: idx,
                values,
            }));
        }
        check_aggregate(
            &payloads,
            &layout,
            Mode::Global,
            &[n],
            &format!("K={kk} hand-built"),
        );

        // Payloads from compressors with distinct worker ids, rTop-k with unbiased scaling.
        let mut payloads = Vec::new();
        let g: Vec<f32> = (0..n).map(|_| rng.gauss() as f32).collect();
        for w in 0..kk {
            let mut cfg = Config::rtopk(0.1, 0.02);
            cfg.scale = Scale::Unbiased;
            cfg.values = DType::F16;
            cfg.worker = w as u32;
            let mut c = Compressor::new(&layout, &cfg).unwrap();
            let noise: Vec<f32> = g.iter().map(|&x| x + 0.1 * rng.gauss() as f32).collect();
            payloads.push(c.step(&noise, 3).unwrap().clone());
        }
        check_aggregate(
            &payloads,
            &layout,
            Mode::Global,
            &[n],
            &format!("K={kk} rTop-k"),
        );
        // An empty payload (k = 0) is valid and contributes nothing.
        payloads.push(Payload::Sparse(SparsePayload {
            n: n as u32,
            values_dtype: DType::F32,
            indices: vec![],
            values: vec![],
        }));
        check_aggregate(
            &payloads,
            &layout,
            Mode::Global,
            &[n],
            &format!("K={kk}+1 empty"),
        );
    }
}

#[test]
fn aggregation_matches_naive_sign_and_mixed() {
    let sizes = [100usize, 0, 37, 500];
    let layout = Layout::new(&sizes).unwrap();
    let n = layout.n();
    let mut rng = Rng::new(27);
    for mode in [Mode::Global, Mode::PerLayer] {
        let mut payloads = Vec::new();
        for w in 0..4u32 {
            let mut cfg = if w == 2 {
                Config::topk(0.1)
            } else {
                Config::sign()
            };
            cfg.mode = mode;
            cfg.worker = w;
            let mut c = Compressor::new(&layout, &cfg).unwrap();
            let g: Vec<f32> = (0..n).map(|_| rng.gauss() as f32).collect();
            payloads.push(c.step(&g, 0).unwrap().clone());
        }
        check_aggregate(
            &payloads,
            &layout,
            mode,
            &sizes,
            &format!("{mode:?} sign+sparse"),
        );
        check_aggregate(
            &payloads[..1],
            &layout,
            mode,
            &sizes,
            &format!("{mode:?} one sign"),
        );
    }
}

#[test]
fn aggregation_rejects_bad_payloads_and_leaves_out_untouched() {
    let n = 100usize;
    let layout = Layout::single(n).unwrap();
    let good = |idx: Vec<u32>| {
        let values = idx.iter().map(|&i| i as f32 + 0.5).collect();
        Payload::Sparse(SparsePayload {
            n: n as u32,
            values_dtype: DType::F32,
            indices: idx,
            values,
        })
    };
    let with = |n_: u32, idx: Vec<u32>, values: Vec<f32>| {
        Payload::Sparse(SparsePayload {
            n: n_,
            values_dtype: DType::F32,
            indices: idx,
            values,
        })
    };
    let bad: Vec<(&str, Payload)> = vec![
        ("index == n", with(100, vec![1, 100], vec![1.0, 2.0])),
        ("index u32::MAX", with(100, vec![u32::MAX], vec![1.0])),
        ("duplicate", with(100, vec![3, 3], vec![1.0, 2.0])),
        ("unsorted", with(100, vec![5, 3], vec![1.0, 2.0])),
        ("more values", with(100, vec![5, 6], vec![1.0, 2.0, 3.0])),
        ("fewer values", with(100, vec![5, 6, 7], vec![1.0, 2.0])),
        ("values without indices", with(100, vec![], vec![1.0])),
        ("n too small", with(99, vec![5], vec![1.0])),
        ("n too large", with(101, vec![5], vec![1.0])),
        ("n zero", with(0, vec![], vec![])),
        (
            "sign: two scales for one group",
            Payload::Sign(SignPayload {
                n: 100,
                scales: vec![1.0, 1.0],
                negative: vec![0, 0],
            }),
        ),
        (
            "sign: wrong word count",
            Payload::Sign(SignPayload {
                n: 100,
                scales: vec![1.0],
                negative: vec![0],
            }),
        ),
        (
            "sign: wrong n",
            Payload::Sign(SignPayload {
                n: 64,
                scales: vec![1.0],
                negative: vec![0],
            }),
        ),
    ];
    let sentinel: Vec<f32> = (0..n)
        .map(|i| f32::from_bits(0x7FC0_0000 | i as u32))
        .collect();
    for rule in [Average::OverWorkers, Average::OverSenders] {
        let mut agg = Aggregator::new(&layout, Mode::Global, rule, 3).unwrap();
        for (what, b) in &bad {
            for pos in [0usize, 1, 2] {
                let mut ps = vec![good(vec![0, 1, 2]), good(vec![2, 50]), good(vec![99])];
                ps[pos] = b.clone();
                let mut out = sentinel.clone();
                let r = agg.aggregate(&ps, &mut out);
                assert!(
                    matches!(r, Err(Error::BadPayload { worker, .. }) if worker == pos),
                    "{rule:?} {what} at {pos}: {r:?}"
                );
                assert_bits_eq(
                    &out,
                    &sentinel,
                    &format!("{rule:?} {what} at {pos}: out touched"),
                );
            }
        }
        // Wrong number of payloads, wrong output length.
        for m in [0usize, 2, 4] {
            let ps = vec![good(vec![1]); m];
            let mut out = sentinel.clone();
            assert!(
                agg.aggregate(&ps, &mut out).is_err(),
                "{m} payloads for K = 3"
            );
            assert_bits_eq(&out, &sentinel, "wrong payload count: out touched");
        }
        let ps = vec![good(vec![1]); 3];
        for len in [0usize, 99, 101] {
            let mut out = vec![7.0f32; len];
            assert!(matches!(
                agg.aggregate(&ps, &mut out),
                Err(Error::LengthMismatch { .. })
            ));
            assert!(out.iter().all(|&x| x == 7.0));
        }
        // And the plan still works afterwards.
        let ps = vec![good(vec![0, 1, 2]), good(vec![2, 50]), good(vec![99])];
        let mut out = sentinel.clone();
        agg.aggregate(&ps, &mut out).unwrap();
        let want = naive_aggregate(&ps, n, &[0..n], rule);
        assert_bits_eq(&out, &want, "after rejections");
    }
}
