//! Cross-backend tests: the wgpu backend against the CPU reference (SPEC §11).
//!
//! Without an adapter the tests print "SKIPPED: no wgpu adapter (<reason>)" and pass, unless
//! `GRADSIFT_REQUIRE_WGPU=1` (CI, on lavapipe), where a missing adapter fails them.

mod common;

use gradsift::{
    Average, Config, Count, DType, Element, Error, Layout, Method, Mode, Payload, Scale, bf16, cpu,
    f16, wgpu,
};
use std::sync::OnceLock;

fn ctx() -> Option<wgpu::Context> {
    static CTX: OnceLock<Result<wgpu::Context, String>> = OnceLock::new();
    let r = CTX.get_or_init(|| wgpu::Context::new().map_err(|e| e.to_string()));
    match r {
        Ok(c) => Some(c.clone()),
        Err(reason) => {
            if std::env::var("GRADSIFT_REQUIRE_WGPU").as_deref() == Ok("1") {
                panic!("GRADSIFT_REQUIRE_WGPU=1 but no wgpu adapter: {reason}");
            }
            println!("SKIPPED: no wgpu adapter ({reason})");
            None
        }
    }
}

/// Reproducible values: a 64-bit LCG, Gaussian-ish by summing uniforms.
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            let mut acc = 0.0f32;
            for _ in 0..3 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                acc += ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            }
            acc
        })
        .collect()
}

/// Dyadic values (multiples of 2^-6 in [-4, 4]) so that momentum arithmetic is exact and a
/// fused multiply-add cannot change a bit: the selections must then agree exactly.
fn dyadic(n: usize, seed: u64) -> Vec<f32> {
    data(n, seed)
        .into_iter()
        .map(|x| (x * 256.0).round() / 64.0)
        .collect()
}

fn to<T: Element>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v)).collect()
}

fn close(a: f32, b: f32, rel: f32) -> bool {
    a == b || (a - b).abs() <= rel * a.abs().max(b.abs()) || (a.is_nan() && b.is_nan())
}

#[derive(Clone, Copy, PartialEq)]
enum Exact {
    /// Payload and residual bit-identical.
    Bits,
    /// Indices and signs identical, floating results within `rel`.
    Within(f32),
}

/// Runs `steps` steps of both backends on the same gradients and compares payloads,
/// errors, residuals and momenta after every step.
fn compare<T: Element>(
    ctx: &wgpu::Context,
    layout: &Layout,
    config: &Config,
    grads: &[Vec<T>],
    exact: Exact,
    what: &str,
) {
    let mut c = cpu::Compressor::new(layout, config).unwrap();
    let mut g = wgpu::Compressor::new(ctx, layout, config).unwrap();
    let mut p = Payload::Sparse(Default::default());
    let (mut re, mut rm) = (Vec::new(), Vec::new());
    for (t, grad) in grads.iter().enumerate() {
        // Reductions (sign scales) differ in the last bits, so after the first step the
        // residuals, hence the inputs of later steps, are no longer bit-identical.
        let first = t == 0;
        let t = t as u64 * 7 + 3;
        let want = c.step(grad, t).cloned();
        let got = g.step_to_host(grad, t, &mut p);
        match (&want, &got) {
            (Ok(w), Ok(())) => {
                compare_payload(w, &p, exact, &format!("{what} step {t}"), first);
            }
            (Err(a), Err(b)) => assert_eq!(a, b, "{what} step {t}: errors differ"),
            _ => panic!("{what} step {t}: cpu {want:?} vs wgpu {got:?}"),
        }
        g.residual_to_host(&mut re).unwrap();
        compare_f32(
            c.residual(),
            &re,
            exact,
            &format!("{what} residual step {t}"),
        );
        g.momentum_to_host(&mut rm).unwrap();
        compare_f32(
            c.momentum(),
            &rm,
            exact,
            &format!("{what} momentum step {t}"),
        );
    }
}

/// `Within(rel)` compares elementwise relative to the vector's largest magnitude: residuals
/// of a sign step are differences of nearly equal numbers.
fn compare_f32(want: &[f32], got: &[f32], exact: Exact, what: &str) {
    assert_eq!(want.len(), got.len(), "{what}: lengths");
    let norm = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in want.iter().zip(got).enumerate() {
        let ok = match exact {
            Exact::Bits => a.to_bits() == b.to_bits(),
            Exact::Within(rel) => close(*a, *b, rel) || (a - b).abs() <= rel * norm,
        };
        assert!(ok, "{what}: element {i}: cpu {a:e} wgpu {b:e}");
    }
}

fn compare_payload(want: &Payload, got: &Payload, exact: Exact, what: &str, first: bool) {
    match (want, got) {
        (Payload::Sparse(w), Payload::Sparse(g)) => {
            assert_eq!(w.n, g.n, "{what}: n");
            assert_eq!(w.values_dtype, g.values_dtype, "{what}: dtype");
            assert_eq!(w.indices, g.indices, "{what}: indices");
            compare_f32(&w.values, &g.values, exact, &format!("{what}: values"));
        }
        (Payload::Sign(w), Payload::Sign(g)) => {
            assert_eq!(w.n, g.n, "{what}: n");
            if first || exact == Exact::Bits {
                assert_eq!(w.negative, g.negative, "{what}: sign bits");
            } else {
                // Later steps: only elements whose p sits at rounding distance from 0 may flip.
                let diff: u32 = w
                    .negative
                    .iter()
                    .zip(&g.negative)
                    .map(|(a, b)| (a ^ b).count_ones())
                    .sum();
                assert!(
                    diff as usize <= 1 + w.n as usize / 1000,
                    "{what}: {diff} sign bits differ"
                );
            }
            compare_f32(
                &w.scales,
                &g.scales,
                Exact::Within(1e-5),
                &format!("{what}: scales"),
            );
        }
        _ => panic!("{what}: payload kinds differ"),
    }
}

fn sparse_methods() -> Vec<(&'static str, Config)> {
    vec![
        ("topk", Config::topk(0.01)),
        ("rtopk", Config::rtopk(0.05, 0.01)),
        ("randomk", Config::randomk(0.01)),
        (
            "rtopk-exact",
            Config::new(Method::RTopK {
                r: Count::Exact(300),
                k: Count::Exact(37),
            }),
        ),
    ]
}

#[test]
fn sizes_every_sparse_method_global() {
    let Some(ctx) = ctx() else { return };
    for n in [0usize, 1, 2, 255, 256, 257, 4095, 4096, 4097, 100_003] {
        let layout = Layout::single(n).unwrap();
        for (name, cfg) in sparse_methods() {
            let grads: Vec<Vec<f32>> = (0..3).map(|s| data(n, s + n as u64)).collect();
            compare(
                &ctx,
                &layout,
                &cfg,
                &grads,
                Exact::Bits,
                &format!("{name} n={n}"),
            );
        }
    }
}

#[test]
fn philox_and_rounding_conformance_through_randomk_and_f16_values() {
    let Some(ctx) = ctx() else { return };
    // Random-k indices depend only on Philox keys: seeds, workers and 64-bit steps with
    // non-zero high words exercise every word of counter and key.
    let n = 5000;
    let layout = Layout::single(n).unwrap();
    for (seed, worker) in [(0u64, 0u32), (u64::MAX, u32::MAX), (0x299f31d0_a4093822, 7)] {
        let mut cfg = Config::randomk(0.02);
        cfg.seed = seed;
        cfg.worker = worker;
        let mut c = cpu::Compressor::new(&layout, &cfg).unwrap();
        let mut g = wgpu::Compressor::new(&ctx, &layout, &cfg).unwrap();
        let x = data(n, 9);
        let mut p = Payload::Sparse(Default::default());
        for t in [0u64, 1, u64::MAX, 0x0000_0007_0000_0003] {
            let w = c.step(&x, t).unwrap().clone();
            g.step_to_host(&x, t, &mut p).unwrap();
            compare_payload(
                &w,
                &p,
                Exact::Bits,
                &format!("randomk seed={seed} t={t}"),
                true,
            );
        }
    }
    // Values near every rounding boundary of f16/bf16: ties, subnormals, overflow.
    let mut x = Vec::new();
    for e in -30i32..20 {
        for m in [
            0x000u32, 0x001, 0x0FFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001,
            0x18000,
        ] {
            let base = 2f32.powi(e);
            let v = f32::from_bits(base.to_bits() | m);
            x.push(v);
            x.push(-v);
        }
    }
    x.extend_from_slice(&[
        65504.0,
        65519.0,
        65520.0,
        1e6,
        -1e6,
        f32::MAX,
        -f32::MAX,
        3e38,
        0.0,
        -0.0,
    ]);
    x.extend_from_slice(&[1e-40, -1e-40, 6e-8, 3e-8, 2.98e-8]);
    let n = x.len();
    let layout = Layout::single(n).unwrap();
    for dt in [DType::F16, DType::BF16, DType::F32] {
        for scale in [Scale::None, Scale::Unbiased] {
            let mut cfg = Config::rtopk(1.0, 0.5);
            cfg.values = dt;
            cfg.scale = scale;
            compare(
                &ctx,
                &layout,
                &cfg,
                &[x.clone()],
                Exact::Bits,
                &format!("rounding {dt:?} {scale:?}"),
            );
            if scale == Scale::Unbiased {
                // Doubled, f32::MAX and 3e38 overflow, so the step above is rejected on both
                // backends (SPEC §5); without them the scaled values' rounding is compared.
                let tame: Vec<f32> = x
                    .iter()
                    .map(|&v| if v.abs() > 1e38 { 1.0 } else { v })
                    .collect();
                let mut cfg = Config::rtopk(1.0, 0.5);
                cfg.values = dt;
                cfg.scale = scale;
                compare(
                    &ctx,
                    &layout,
                    &cfg,
                    &[tame],
                    Exact::Bits,
                    &format!("rounding {dt:?} {scale:?}, no overflow"),
                );
            }
            let mut cfg = Config::topk(1.0);
            cfg.values = dt;
            compare(
                &ctx,
                &layout,
                &cfg,
                &[x.clone(), x.clone()],
                Exact::Bits,
                &format!("rounding all {dt:?}"),
            );
        }
    }
}

#[test]
fn gradient_dtypes_f16_bf16() {
    let Some(ctx) = ctx() else { return };
    for n in [1usize, 255, 257, 10_001] {
        let layout = Layout::single(n).unwrap();
        for (name, cfg) in sparse_methods() {
            let g16: Vec<Vec<f16>> = (0..2).map(|s| to(&data(n, s))).collect();
            compare(
                &ctx,
                &layout,
                &cfg,
                &g16,
                Exact::Bits,
                &format!("{name} f16 n={n}"),
            );
            let gb: Vec<Vec<bf16>> = (0..2).map(|s| to(&data(n, s + 5))).collect();
            compare(
                &ctx,
                &layout,
                &cfg,
                &gb,
                Exact::Bits,
                &format!("{name} bf16 n={n}"),
            );
        }
        // Subnormal, infinite and NaN f16 inputs widen exactly (the step then fails alike).
        let mut special: Vec<f16> = to(&data(n, 1));
        special[0] = f16::from_bits(0x0001);
        if n > 2 {
            special[1] = f16::from_bits(0x83FF);
            special[2] = f16::from_bits(0x7BFF);
        }
        compare(
            &ctx,
            &layout,
            &Config::topk(0.5),
            &[special.clone()],
            Exact::Bits,
            "f16 subnormals",
        );
        special[n - 1] = f16::INFINITY;
        compare(
            &ctx,
            &layout,
            &Config::topk(0.5),
            &[special],
            Exact::Bits,
            "f16 inf",
        );
    }
}

fn mixed_layout(layers: usize, seed: u64) -> Layout {
    let mut s = seed;
    let sizes: Vec<usize> = (0..layers)
        .map(|l| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            match l % 10 {
                0 => 0,
                1 => 1,
                2 => 4096 + (s >> 60) as usize,
                3 if l % 100 == 3 => 20_000 + (s >> 50) as usize % 5000,
                _ => 1 + (s >> 33) as usize % 700,
            }
        })
        .collect();
    Layout::new(&sizes).unwrap()
}

#[test]
fn per_layer_thousand_mixed_layers() {
    let Some(ctx) = ctx() else { return };
    let layout = mixed_layout(1000, 42);
    let n = layout.n();
    for (name, mut cfg) in sparse_methods()
        .into_iter()
        .chain([("sign", Config::sign())])
    {
        cfg.mode = Mode::PerLayer;
        cfg.scale = Scale::Unbiased;
        let grads: Vec<Vec<f32>> = (0..2).map(|s| data(n, s + 100)).collect();
        let exact = if name == "sign" {
            Exact::Within(1e-5)
        } else {
            Exact::Bits
        };
        compare(
            &ctx,
            &layout,
            &cfg,
            &grads,
            exact,
            &format!("per-layer {name}"),
        );
    }
}

#[test]
fn sign_global_and_per_layer() {
    let Some(ctx) = ctx() else { return };
    for n in [0usize, 1, 255, 257, 4097, 70_001] {
        let layout = Layout::new(&[n / 3, 0, n - n / 3]).unwrap();
        for mode in [Mode::Global, Mode::PerLayer] {
            let mut cfg = Config::sign();
            cfg.mode = mode;
            let grads: Vec<Vec<f32>> = (0..3).map(|s| data(n, s)).collect();
            compare(
                &ctx,
                &layout,
                &cfg,
                &grads,
                Exact::Within(1e-5),
                &format!("sign n={n} {mode:?}"),
            );
        }
    }
}

#[test]
fn momentum_exact_on_dyadic_inputs() {
    let Some(ctx) = ctx() else { return };
    let layout = mixed_layout(60, 7);
    let n = layout.n();
    for (name, mut cfg) in sparse_methods()
        .into_iter()
        .chain([("sign", Config::sign())])
    {
        for mode in [Mode::Global, Mode::PerLayer] {
            cfg.mode = mode;
            cfg.momentum = 0.5;
            let grads: Vec<Vec<f32>> = (0..4).map(|s| dyadic(n, s)).collect();
            let exact = if name == "sign" {
                Exact::Within(1e-5)
            } else {
                Exact::Bits
            };
            compare(
                &ctx,
                &layout,
                &cfg,
                &grads,
                exact,
                &format!("momentum {name} {mode:?}"),
            );
        }
    }
    // A momentum that is not a power of two: multiply-add may fuse, so values within 1 ulp.
    let layout = Layout::single(3000).unwrap();
    let mut cfg = Config::topk(0.5);
    cfg.momentum = 0.9;
    let mut c = cpu::Compressor::new(&layout, &cfg).unwrap();
    let mut g = wgpu::Compressor::new(&ctx, &layout, &cfg).unwrap();
    let mut p = Payload::Sparse(Default::default());
    let mut m = Vec::new();
    for t in 0..3 {
        let x = data(3000, t);
        c.step(&x, t).unwrap();
        g.step_to_host(&x, t, &mut p).unwrap();
        g.momentum_to_host(&mut m).unwrap();
        compare_f32(c.momentum(), &m, Exact::Within(2.4e-7), "momentum 0.9");
    }
}

#[test]
fn adversarial_ties_resolve_to_lower_index() {
    let Some(ctx) = ctx() else { return };
    for n in [257usize, 4097, 50_000] {
        let layout = Layout::single(n).unwrap();
        let inputs: Vec<(&str, Vec<f32>)> = vec![
            ("all equal", vec![1.0; n]),
            (
                "signed zeros",
                (0..n)
                    .map(|i| if i % 2 == 0 { 0.0 } else { -0.0 })
                    .collect(),
            ),
            (
                "+-equal",
                (0..n)
                    .map(|i| if i % 3 == 0 { -2.5 } else { 2.5 })
                    .collect(),
            ),
            (
                "two levels",
                (0..n).map(|i| if i % 7 == 0 { 3.0 } else { 1.0 }).collect(),
            ),
            (
                "subnormals",
                (0..n).map(|i| f32::from_bits((i % 5) as u32 + 1)).collect(),
            ),
            ("ramp", (0..n).map(|i| (i / 16) as f32).collect()),
        ];
        for (name, x) in inputs {
            for (m, cfg) in sparse_methods() {
                compare(
                    &ctx,
                    &layout,
                    &cfg,
                    &[x.clone(), x.clone()],
                    Exact::Bits,
                    &format!("ties {name} {m} n={n}"),
                );
            }
        }
    }
}

#[test]
fn nan_injection_leaves_state_untouched() {
    let Some(ctx) = ctx() else { return };
    let layout = mixed_layout(30, 3);
    let n = layout.n();
    for (name, mut cfg) in sparse_methods()
        .into_iter()
        .chain([("sign", Config::sign())])
    {
        for momentum in [0.0, 0.5] {
            cfg.momentum = momentum;
            let mut grads: Vec<Vec<f32>> = (0..4).map(|s| dyadic(n, s)).collect();
            grads[1][n / 2] = f32::NAN;
            grads[1][n / 3] = f32::INFINITY;
            grads[1][n - 1] = f32::NEG_INFINITY;
            grads[2][0] = f32::NAN;
            let exact = if name == "sign" {
                Exact::Within(1e-5)
            } else {
                Exact::Bits
            };
            compare(
                &ctx,
                &layout,
                &cfg,
                &grads,
                exact,
                &format!("nan {name} m={momentum}"),
            );
        }
    }
    // Overflow of e + g to infinity is non-finite too.
    let layout = Layout::single(10).unwrap();
    let mut g = wgpu::Compressor::new(&ctx, &layout, &Config::topk(0.1)).unwrap();
    let mut p = Payload::Sparse(Default::default());
    let big = vec![f32::MAX; 10];
    g.step_to_host(&big, 0, &mut p).unwrap();
    let err = g.step_to_host(&big, 1, &mut p).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NonFinite {
                count: 9,
                first_index: 1
            }
        ),
        "{err:?}"
    );
}

/// SPEC §5: a sent value that only `Scale::Unbiased` makes non-finite (`|p| * scale >
/// f32::MAX`) fails the step on the device like a non-finite `p`: the same
/// `Error::NonFinite` (count and first index of the offending sent values) as the CPU,
/// residual and momentum untouched bit for bit, and the later steps identical.
#[test]
fn unbiased_scale_overflow_is_rejected_on_the_device() {
    let Some(ctx) = ctx() else { return };
    let layout = mixed_layout(30, 4);
    let n = layout.n();
    for mode in [Mode::Global, Mode::PerLayer] {
        for (values, momentum) in [(DType::F32, 0.0), (DType::F16, 0.5)] {
            // 1 in 5 planted: every top-r candidate overflows; 1 in 97: some sent values do.
            for every in [5usize, 97] {
                let mut cfg = Config::rtopk(0.05, 0.01);
                cfg.scale = Scale::Unbiased;
                cfg.mode = mode;
                cfg.values = values;
                cfg.momentum = momentum;
                let mut grads: Vec<Vec<f32>> = (0..4).map(|s| dyadic(n, s + 10)).collect();
                for i in (0..n).step_by(every) {
                    grads[1][i] = if i % 2 == 0 { 1e38 } else { -1e38 };
                }
                let what = format!("scaled overflow {mode:?} {values:?} m={momentum} 1/{every}");
                // The reference rejects the planted step (steps are t = 3, 10, ... in compare).
                let mut c = cpu::Compressor::new(&layout, &cfg).unwrap();
                c.step(&grads[0], 3).unwrap();
                let r = c.step(&grads[1], 10).map(|_| ());
                assert!(matches!(r, Err(Error::NonFinite { .. })), "{what}: {r:?}");
                compare(&ctx, &layout, &cfg, &grads, Exact::Bits, &what);
            }
        }
    }
}

#[test]
fn large_buffer_two_to_the_twenty_plus_three() {
    let Some(ctx) = ctx() else { return };
    let n = (1usize << 20) + 3;
    let layout = Layout::single(n).unwrap();
    let grads: Vec<Vec<f32>> = (0..2).map(|s| data(n, s)).collect();
    compare(
        &ctx,
        &layout,
        &Config::rtopk(0.01, 0.001),
        &grads,
        Exact::Bits,
        "rtopk 2^20+3",
    );
    let g16: Vec<Vec<bf16>> = vec![to(&grads[0])];
    compare(
        &ctx,
        &layout,
        &Config::topk(0.001),
        &g16,
        Exact::Bits,
        "topk bf16 2^20+3",
    );
    let mut cfg = Config::sign();
    cfg.momentum = 0.5;
    compare(
        &ctx,
        &layout,
        &cfg,
        &grads[..1],
        Exact::Within(1e-5),
        "sign 2^20+3",
    );
    compare(
        &ctx,
        &layout,
        &Config::randomk(0.001),
        &grads[..1],
        Exact::Bits,
        "randomk 2^20+3",
    );
}

#[test]
fn device_buffer_api_and_errors() {
    let Some(ctx) = ctx() else { return };
    let n = 1000;
    let layout = Layout::single(n).unwrap();
    let cfg = Config::topk(0.01);
    let mut g = wgpu::Compressor::new(&ctx, &layout, &cfg).unwrap();
    let mut p = Payload::Sparse(Default::default());
    assert!(g.read_payload(&mut p).is_err(), "read before any step");
    let x: Vec<f16> = to(&data(n, 1));
    let buf = ctx.upload(&x).unwrap();
    g.step(&buf, DType::F16, 5).unwrap();
    g.read_payload(&mut p).unwrap();
    let mut c = cpu::Compressor::new(&layout, &cfg).unwrap();
    compare_payload(
        c.step(&x, 5).unwrap(),
        &p,
        Exact::Bits,
        "device buffer",
        true,
    );
    // f32 needs 4000 bytes; this one has 2000.
    assert!(matches!(
        g.step(&buf, DType::F32, 6),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        g.step_host(&x[..10], 6),
        Err(Error::LengthMismatch { .. })
    ));
    let bad = Config::rtopk(0.1, 0.2);
    assert!(matches!(
        wgpu::Compressor::new(&ctx, &layout, &bad),
        Err(Error::InvalidConfig(_))
    ));
    // A plan larger than one storage binding is rejected with the limit in the message.
    let max = ctx.max_binding_bytes();
    if max / 4 < u32::MAX as u64 {
        let huge = Layout::single((max / 4 + 1) as usize).unwrap();
        let e = wgpu::Compressor::new(&ctx, &huge, &cfg).unwrap_err();
        assert!(e.to_string().contains(&max.to_string()), "{e}");
    }
}

fn payloads_from(c: &mut cpu::Compressor, workers: usize, n: usize) -> Vec<Payload> {
    (0..workers)
        .map(|k| c.step(&data(n, k as u64 + 50), k as u64).unwrap().clone())
        .collect()
}

#[test]
fn aggregation_bit_identical() {
    let Some(ctx) = ctx() else { return };
    let layout = mixed_layout(50, 11);
    let n = layout.n();
    for mode in [Mode::Global, Mode::PerLayer] {
        for rule in [Average::OverWorkers, Average::OverSenders] {
            for (name, mut cfg) in sparse_methods()
                .into_iter()
                .chain([("sign", Config::sign())])
            {
                cfg.mode = mode;
                let mut c = cpu::Compressor::new(&layout, &cfg).unwrap();
                let k = 5;
                let mut payloads = payloads_from(&mut c, k, n);
                if name == "topk" {
                    // Mixed kinds in one round.
                    let mut s = Config::sign();
                    s.mode = mode;
                    let mut cs = cpu::Compressor::new(&layout, &s).unwrap();
                    payloads[2] = cs.step(&data(n, 1), 0).unwrap().clone();
                }
                let mut want = vec![0.0; n];
                cpu::Aggregator::new(&layout, mode, rule, k)
                    .unwrap()
                    .aggregate(&payloads, &mut want)
                    .unwrap();
                let mut agg = wgpu::Aggregator::new(&ctx, &layout, mode, rule, k).unwrap();
                let mut got = vec![7.0; n];
                agg.aggregate(&payloads, &mut got).unwrap();
                compare_f32(
                    &want,
                    &got,
                    Exact::Bits,
                    &format!("aggregate {name} {mode:?} {rule:?}"),
                );
                // Bad payloads are rejected before anything is written.
                let mut bad = payloads.clone();
                if let Payload::Sparse(p) = &mut bad[3] {
                    if p.indices.len() >= 2 {
                        p.indices[1] = p.indices[0];
                        let mut out = vec![7.0; n];
                        assert!(matches!(
                            agg.aggregate(&bad, &mut out),
                            Err(Error::BadPayload { worker: 3, .. })
                        ));
                        assert!(out.iter().all(|&v| v == 7.0));
                    }
                }
            }
        }
    }
    assert!(wgpu::Aggregator::new(&ctx, &layout, Mode::Global, Average::OverWorkers, 0).is_err());
}

#[test]
fn layer_statistics_within_spec_tolerance() {
    let Some(ctx) = ctx() else { return };
    let layout = mixed_layout(1000, 5);
    let n = layout.n();
    let mut x: Vec<f32> = data(n, 3)
        .iter()
        .enumerate()
        .map(|(i, v)| v * 3.0 + (i % 17) as f32)
        .collect();
    x[5] = f32::NAN;
    x[n / 2] = f32::INFINITY;
    // A layer with nothing finite: NaN moments (SPEC §8); layers l % 10 == 0 are empty.
    for (j, i) in layout.layer(2).enumerate() {
        x[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][j % 3];
    }
    fn check<T: Element>(ctx: &wgpu::Context, x: &[T], layout: &Layout) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        cpu::layer_stats(x, layout, &mut a).unwrap();
        wgpu::layer_stats(ctx, x, layout, &mut b).unwrap();
        assert_eq!(a.len(), b.len());
        for (l, (a, b)) in a.iter().zip(&b).enumerate() {
            common::assert_stats_close(a, b, &format!("layer {l}"));
        }
    }
    check(&ctx, &x, &layout);
    check::<f16>(&ctx, &to(&x), &layout);
    check::<bf16>(&ctx, &to(&x), &layout);
    let big = Layout::new(&[(1 << 20) + 3, 0, 1]).unwrap();
    check(
        &ctx,
        &data(big.n(), 8)
            .iter()
            .map(|v| v + 100.0)
            .collect::<Vec<_>>(),
        &big,
    );
}

#[test]
fn variance_estimator_within_spec_tolerance() {
    let Some(ctx) = ctx() else { return };
    let layout = mixed_layout(200, 9);
    let n = layout.n();
    let signal = data(n, 1);
    for k in [2usize, 3, 8] {
        let workers: Vec<Vec<f32>> = (0..k)
            .map(|w| {
                signal
                    .iter()
                    .zip(data(n, 10 + w as u64))
                    .map(|(s, e)| s + 0.3 * e)
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = workers.iter().map(|w| w.as_slice()).collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        cpu::estimate_variance(&refs, &layout, &mut a).unwrap();
        wgpu::estimate_variance(&ctx, &refs, &layout, &mut b).unwrap();
        for (l, (a, b)) in a.iter().zip(&b).enumerate() {
            let scale = a.sigma_x2 + a.sigma_n2;
            assert!(
                (a.sigma_n2 - b.sigma_n2).abs() <= 1e-4 * a.sigma_n2 + 1e-12,
                "K={k} layer {l}: {a:?} {b:?}"
            );
            assert!(
                (a.sigma_x2 - b.sigma_x2).abs() <= 1e-4 * scale + 1e-12,
                "K={k} layer {l}: {a:?} {b:?}"
            );
        }
        let mut bad = workers.clone();
        bad[1][7] = f32::NAN;
        bad[1][3] = f32::INFINITY;
        let refs: Vec<&[f32]> = bad.iter().map(|w| w.as_slice()).collect();
        let e1 = cpu::estimate_variance(&refs, &layout, &mut a).unwrap_err();
        let e2 = wgpu::estimate_variance(&ctx, &refs, &layout, &mut b).unwrap_err();
        assert_eq!(e1, e2);
    }
    let one = [signal.as_slice()];
    assert!(wgpu::estimate_variance(&ctx, &one, &layout, &mut Vec::new()).is_err());
}

#[test]
fn reports_the_adapter() {
    let Some(ctx) = ctx() else { return };
    println!(
        "wgpu adapter: {}; max storage binding {} bytes",
        ctx.description(),
        ctx.max_binding_bytes()
    );
    assert!(!ctx.description().is_empty());
}

#[test]
fn randomized_configs_match_cpu() {
    let Some(ctx) = ctx() else { return };
    let mut s = 0x5eed_u64;
    let mut next = |m: u64| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) % m.max(1)
    };
    for case in 0..24 {
        let layers = 1 + next(40) as usize;
        let sizes: Vec<usize> = (0..layers)
            .map(|_| match next(4) {
                0 => 0,
                1 => next(300) as usize,
                _ => next(6000) as usize,
            })
            .collect();
        let layout = Layout::new(&sizes).unwrap();
        let n = layout.n();
        let rho_r = [0.0, 0.001, 0.05, 0.3, 1.0][next(5) as usize];
        let rho_k = rho_r * [0.0, 0.1, 0.5, 1.0][next(4) as usize];
        let mut cfg = match next(5) {
            0 => Config::rtopk(rho_r, rho_k),
            1 => Config::topk(rho_k),
            2 => Config::randomk(rho_k),
            3 => Config::new(Method::RTopK {
                r: Count::Exact(next(500)),
                k: Count::Exact(next(50)),
            }),
            _ => Config::sign(),
        };
        if let Method::RTopK {
            r: Count::Exact(r),
            k: Count::Exact(k),
        } = cfg.method
        {
            cfg.method = Method::RTopK {
                r: Count::Exact(r.max(k)),
                k: Count::Exact(k),
            };
        }
        cfg.mode = if next(2) == 0 {
            Mode::Global
        } else {
            Mode::PerLayer
        };
        cfg.scale = if next(2) == 0 {
            Scale::None
        } else {
            Scale::Unbiased
        };
        cfg.values = [DType::F32, DType::F16, DType::BF16][next(3) as usize];
        cfg.momentum = if next(3) == 0 { 0.5 } else { 0.0 };
        cfg.seed = next(u64::MAX) << 20 | next(1 << 20);
        cfg.worker = next(1 << 31) as u32;
        let grads: Vec<Vec<f32>> = (0..3).map(|t| dyadic(n, case * 10 + t)).collect();
        let exact = if cfg.is_sparse() {
            Exact::Bits
        } else {
            Exact::Within(1e-5)
        };
        let what = format!("random case {case}: {cfg:?} layers {sizes:?}");
        match next(3) {
            0 => compare(&ctx, &layout, &cfg, &grads, exact, &what),
            1 => {
                let g: Vec<Vec<f16>> = grads.iter().map(|g| to(g)).collect();
                compare(&ctx, &layout, &cfg, &g, exact, &what)
            }
            _ => {
                let g: Vec<Vec<bf16>> = grads.iter().map(|g| to(g)).collect();
                compare(&ctx, &layout, &cfg, &g, exact, &what)
            }
        }
    }
}

#[test]
fn lost_device_is_a_typed_error() {
    if ctx().is_none() {
        return;
    }
    // A context of its own: destroying the device must not disturb the other tests.
    let ctx = wgpu::Context::new().unwrap();
    let layout = Layout::single(5000).unwrap();
    let mut g = wgpu::Compressor::new(&ctx, &layout, &Config::topk(0.01)).unwrap();
    let x = data(5000, 1);
    let mut p = Payload::Sparse(Default::default());
    g.step_to_host(&x, 0, &mut p).unwrap();
    ctx.device().destroy();
    let r = g.step_to_host(&x, 1, &mut p);
    assert!(
        matches!(
            r,
            Err(Error::Device {
                backend: "wgpu",
                ..
            })
        ),
        "{r:?}"
    );
    let r = wgpu::Compressor::new(&ctx, &layout, &Config::topk(0.01));
    assert!(matches!(r, Err(Error::Device { .. })), "{r:?}");
}

#[test]
fn edge_sizes_for_aggregation_and_statistics() {
    let Some(ctx) = ctx() else { return };
    for n in [0usize, 1, 255, 256, 257, (1 << 20) + 3] {
        let layout = Layout::new(&[n / 2, 0, n - n / 2]).unwrap();
        // Aggregation: sparse and sign payloads, both rules, per-layer groups.
        for rule in [Average::OverWorkers, Average::OverSenders] {
            for cfg in [Config::rtopk(0.1, 0.05), Config::sign()] {
                let mut cfg = cfg;
                cfg.mode = Mode::PerLayer;
                cfg.values = DType::BF16;
                let mut c = cpu::Compressor::new(&layout, &cfg).unwrap();
                let payloads = payloads_from(&mut c, 3, n);
                let mut want = vec![0.0; n];
                cpu::Aggregator::new(&layout, Mode::PerLayer, rule, 3)
                    .unwrap()
                    .aggregate(&payloads, &mut want)
                    .unwrap();
                let mut got = vec![1.0; n];
                wgpu::Aggregator::new(&ctx, &layout, Mode::PerLayer, rule, 3)
                    .unwrap()
                    .aggregate(&payloads, &mut got)
                    .unwrap();
                compare_f32(
                    &want,
                    &got,
                    Exact::Bits,
                    &format!("aggregate n={n} {rule:?}"),
                );
            }
        }
        // Statistics on every dtype.
        let x: Vec<f32> = data(n, 2).iter().map(|v| v * 10.0 - 3.0).collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        cpu::layer_stats(&x, &layout, &mut a).unwrap();
        wgpu::layer_stats(&ctx, &x, &layout, &mut b).unwrap();
        let xh: Vec<f16> = to(&x);
        let (mut ah, mut bh) = (Vec::new(), Vec::new());
        cpu::layer_stats(&xh, &layout, &mut ah).unwrap();
        wgpu::layer_stats(&ctx, &xh, &layout, &mut bh).unwrap();
        for (a, b) in a.iter().zip(&b).chain(ah.iter().zip(&bh)) {
            common::assert_stats_close(a, b, &format!("n={n}"));
        }
        // Variance estimator, K = 2, bf16.
        let y: Vec<bf16> = to(&data(n, 3));
        let z: Vec<bf16> = to(&data(n, 4));
        let refs: [&[bf16]; 2] = [&y, &z];
        let (mut va, mut vb) = (Vec::new(), Vec::new());
        cpu::estimate_variance(&refs, &layout, &mut va).unwrap();
        wgpu::estimate_variance(&ctx, &refs, &layout, &mut vb).unwrap();
        for (a, b) in va.iter().zip(&vb) {
            let scale = a.sigma_x2 + a.sigma_n2;
            assert!(
                (a.sigma_n2 - b.sigma_n2).abs() <= 1e-4 * scale + 1e-12,
                "n={n}: {a:?} {b:?}"
            );
            assert!(
                (a.sigma_x2 - b.sigma_x2).abs() <= 1e-4 * scale + 1e-12,
                "n={n}: {a:?} {b:?}"
            );
        }
    }
}

#[test]
fn rejected_step_rolls_back_on_the_device_without_a_host_read() {
    let Some(ctx) = ctx() else { return };
    let n = 9000;
    let layout = Layout::single(n).unwrap();
    let mut cfg = Config::rtopk(0.05, 0.01);
    cfg.momentum = 0.5;
    let mut c = cpu::Compressor::new(&layout, &cfg).unwrap();
    let mut g = wgpu::Compressor::new(&ctx, &layout, &cfg).unwrap();
    let good: Vec<Vec<f32>> = (0..3).map(|s| dyadic(n, s)).collect();
    let mut bad = good[1].clone();
    bad[4321] = f32::NAN;
    c.step(&good[0], 0).unwrap();
    g.step_host(&good[0], 0).unwrap();
    // Rejected on both; the GPU step is not read, so only the device knows.
    assert!(c.step(&bad, 1).is_err());
    g.step_host(&bad, 1).unwrap();
    let want = c.step(&good[2], 2).unwrap().clone();
    g.step_host(&good[2], 2).unwrap();
    let mut p = Payload::Sparse(Default::default());
    g.read_payload(&mut p).unwrap();
    assert_eq!(g.rejected_steps(), 1, "the unread rejection is counted");
    compare_payload(
        &want,
        &p,
        Exact::Bits,
        "after an unread rejected step",
        true,
    );
    g.step_host(&good[2], 3).unwrap();
    g.read_payload(&mut p).unwrap();
    assert_eq!(g.rejected_steps(), 0, "the count restarts at each read");
    c.step(&good[2], 3).unwrap();
    let mut r = Vec::new();
    g.residual_to_host(&mut r).unwrap();
    compare_f32(
        c.residual(),
        &r,
        Exact::Bits,
        "residual after an unread rejected step",
    );
    g.momentum_to_host(&mut r).unwrap();
    compare_f32(
        c.momentum(),
        &r,
        Exact::Bits,
        "momentum after an unread rejected step",
    );
    // reset() zeroes both on the device.
    g.reset().unwrap();
    g.residual_to_host(&mut r).unwrap();
    assert!(r.iter().all(|&v| v == 0.0));
}
