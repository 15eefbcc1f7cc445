//! The error-feedback step: every method's payload, residual and momentum against the CPU
//! reference (SPEC §1-§6, §13), dtypes, sizes, ties, rejected steps.

use super::*;

// ---- cases from the old wgpu suite ----------------------------------------------------------

pub(crate) fn sizes_every_sparse_method_global<H: Harness>(h: &H) {
    for n in [0usize, 1, 2, 255, 256, 257, 4095, 4096, 4097, 100_003] {
        let layout = Layout::single(n).unwrap();
        for (name, cfg) in sparse_methods() {
            let grads: Vec<Vec<f32>> = (0..3).map(|s| data(n, s + n as u64)).collect();
            compare(h, &layout, &cfg, &grads, &format!("{name} n={n}"));
        }
    }
}
pub(crate) fn philox_and_rounding_conformance_through_randomk_and_f16_values<H: Harness>(h: &H) {
    // Random-k indices depend only on Philox keys: seeds, workers and 64-bit steps with
    // non-zero high words exercise every word of counter and key.
    let n = 5000;
    let layout = Layout::single(n).unwrap();
    for (seed, worker) in [(0u64, 0u32), (u64::MAX, u32::MAX), (0x299f31d0_a4093822, 7)] {
        let mut cfg = Config::randomk(0.02);
        cfg.seed = seed;
        cfg.worker = worker;
        let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
        let mut g = h.compressor(&layout, &cfg).unwrap();
        let x = data(n, 9);
        for (i, t) in [0u64, 1, u64::MAX, 0x0000_0007_0000_0003]
            .into_iter()
            .enumerate()
        {
            let w = c.step(&x, t).unwrap().clone();
            let p = if i % 2 == 0 {
                g.step(&x, t).unwrap().clone()
            } else {
                h.step_device(&mut g, &x, t).unwrap();
                g.payload().unwrap().clone()
            };
            compare_payload(
                &w,
                &p,
                Tol::Bits,
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
                h,
                &layout,
                &cfg,
                &[x.clone()],
                &format!("rounding {dt:?} {scale:?}"),
            );
            if scale == Scale::Unbiased {
                // Doubled, f32::MAX and 3e38 overflow, so the step above is rejected on both
                // sides (SPEC §5); without them the scaled values' rounding is compared.
                let tame: Vec<f32> = x
                    .iter()
                    .map(|&v| if v.abs() > 1e38 { 1.0 } else { v })
                    .collect();
                let mut cfg = Config::rtopk(1.0, 0.5);
                cfg.values = dt;
                cfg.scale = scale;
                compare(
                    h,
                    &layout,
                    &cfg,
                    &[tame],
                    &format!("rounding {dt:?} {scale:?}, no overflow"),
                );
            }
            let mut cfg = Config::topk(1.0);
            cfg.values = dt;
            compare(
                h,
                &layout,
                &cfg,
                &[x.clone(), x.clone()],
                &format!("rounding all {dt:?}"),
            );
        }
    }
}
pub(crate) fn gradient_dtypes_f16_bf16<H: Harness>(h: &H) {
    for n in [1usize, 255, 257, 10_001] {
        let layout = Layout::single(n).unwrap();
        for (name, cfg) in sparse_methods() {
            let g16: Vec<Vec<f16>> = (0..2).map(|s| to(&data(n, s))).collect();
            compare(h, &layout, &cfg, &g16, &format!("{name} f16 n={n}"));
            let gb: Vec<Vec<bf16>> = (0..2).map(|s| to(&data(n, s + 5))).collect();
            compare(h, &layout, &cfg, &gb, &format!("{name} bf16 n={n}"));
        }
        // Subnormal, infinite and NaN f16 inputs widen exactly (the step then fails alike).
        let mut special: Vec<f16> = to(&data(n, 1));
        special[0] = f16::from_bits(0x0001);
        if n > 2 {
            special[1] = f16::from_bits(0x83FF);
            special[2] = f16::from_bits(0x7BFF);
        }
        compare(
            h,
            &layout,
            &Config::topk(0.5),
            &[special.clone()],
            "f16 subnormals",
        );
        special[n - 1] = f16::INFINITY;
        compare(h, &layout, &Config::topk(0.5), &[special], "f16 inf");
    }
}
pub(crate) fn per_layer_thousand_mixed_layers<H: Harness>(h: &H) {
    let layout = mixed_layout(1000, 42);
    let n = layout.n();
    for (name, mut cfg) in sparse_methods()
        .into_iter()
        .chain([("sign", Config::sign())])
    {
        cfg.mode = Mode::PerLayer;
        cfg.scale = Scale::Unbiased;
        let grads: Vec<Vec<f32>> = (0..2).map(|s| data(n, s + 100)).collect();
        compare(h, &layout, &cfg, &grads, &format!("per-layer {name}"));
    }
}
pub(crate) fn group_counts_match_cpu<H: Harness>(h: &H) {
    let layout = mixed_layout(60, 7);
    let n = layout.n();
    let mut cfg = Config::rtopk(0.05, 0.01);
    cfg.mode = Mode::PerLayer;
    cfg.scale = Scale::Unbiased;
    // Every shape of group: nothing sent, k = r, r = n_l, k well below r.
    cfg.group_counts = layout
        .sizes()
        .enumerate()
        .map(|(l, nl)| {
            let k = ((l % 5) * nl / 40 + l % 3).min(nl) as u64;
            let r = match l % 4 {
                0 => k,
                1 => nl as u64,
                _ => (k * (1 + (l % 4) as u64)).min(nl as u64),
            };
            (r, k)
        })
        .collect();
    let grads: Vec<Vec<f32>> = (0..2).map(|s| data(n, s + 300)).collect();
    compare(h, &layout, &cfg, &grads, "per-layer group_counts");
}
pub(crate) fn sign_global_and_per_layer<H: Harness>(h: &H) {
    for n in [0usize, 1, 255, 257, 4097, 70_001] {
        let layout = Layout::new(&[n / 3, 0, n - n / 3]).unwrap();
        for mode in [Mode::Global, Mode::PerLayer] {
            let mut cfg = Config::sign();
            cfg.mode = mode;
            let grads: Vec<Vec<f32>> = (0..3).map(|s| data(n, s)).collect();
            compare(h, &layout, &cfg, &grads, &format!("sign n={n} {mode:?}"));
        }
    }
}
pub(crate) fn qsgd_global_and_per_layer<H: Harness>(h: &H) {
    for n in [0usize, 1, 255, 257, 4097, 70_001] {
        let layout = Layout::new(&[n / 3, 0, n - n / 3]).unwrap();
        for (mode, levels, momentum) in [
            (Mode::Global, 7u8, 0.0f32),
            (Mode::PerLayer, 1, 0.5),
            (Mode::PerLayer, 127, 0.0),
        ] {
            let mut cfg = Config::qsgd(levels);
            cfg.mode = mode;
            cfg.momentum = momentum;
            cfg.seed = 0x5EED_0000_0001;
            let grads: Vec<Vec<f32>> = (0..3).map(|s| data(n, s + 40)).collect();
            compare(
                h,
                &layout,
                &cfg,
                &grads,
                &format!("qsgd s={levels} n={n} {mode:?}"),
            );
        }
    }
    // Magnitudes across the exponent range, exact zeros and a group whose max is subnormal
    // (inv = +inf: level s for every non-zero element, SPEC §13).
    let layout = Layout::new(&[3000, 64, 10]).unwrap();
    let mut wide: Vec<f32> = (0..3000)
        .map(|i| {
            let e = (i % 60) - 30;
            let m = 1.0 + (i as f32 * 0.618).fract();
            if i % 11 == 0 {
                0.0
            } else if i % 2 == 0 {
                -m * 2f32.powi(e)
            } else {
                m * 2f32.powi(e)
            }
        })
        .collect();
    wide.extend((0..64).map(|i| (i as f32 - 32.0) * 1e-41));
    wide.extend([0.0f32; 10]);
    for levels in [1u8, 3, 100, 127] {
        let mut cfg = Config::qsgd(levels);
        cfg.mode = Mode::PerLayer;
        compare(
            h,
            &layout,
            &cfg,
            &[wide.clone(), wide.clone()],
            &format!("qsgd wide s={levels}"),
        );
    }
    // 1,500 small layers, each with its own scale anywhere in f32's range: 3,000 quotients
    // per step (wgpu divides with integers, SPEC §13), each seen through codes and residual.
    let sizes: Vec<usize> = (0..1500).map(|l| 1 + l % 5).collect();
    let layout = Layout::new(&sizes).unwrap();
    let mut rng = common::Rng::new(77);
    let x: Vec<f32> = (0..layout.n())
        .map(|_| f32::from_bits(rng.next_u32() & 0xFF7F_FFFF)) // finite, either sign
        .collect();
    for (levels, error_feedback) in [(3u8, true), (100, true), (100, false)] {
        let mut cfg = Config::new(Method::Qsgd {
            levels,
            error_feedback,
        });
        cfg.mode = Mode::PerLayer;
        compare(
            h,
            &layout,
            &cfg,
            std::slice::from_ref(&x),
            &format!("qsgd scales everywhere s={levels} feedback={error_feedback}"),
        );
    }
}
pub(crate) fn momentum_exact_on_dyadic_inputs<H: Harness>(h: &H) {
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
            compare(
                h,
                &layout,
                &cfg,
                &grads,
                &format!("momentum {name} {mode:?}"),
            );
        }
    }
    // A momentum that is not a power of two: multiply-add may fuse, so values within 1 ulp.
    let layout = Layout::single(3000).unwrap();
    let mut cfg = Config::topk(0.5);
    cfg.momentum = 0.9;
    let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
    let mut g = h.device().compressor(&layout, &cfg).unwrap();
    let mut m = Vec::new();
    for t in 0..3 {
        let x = data(3000, t);
        c.step(&x, t).unwrap();
        g.step(&x, t).unwrap();
        g.momentum(&mut m).unwrap();
        compare_f32(c.momentum_slice(), &m, Tol::Within(2.4e-7), "momentum 0.9");
    }
}
pub(crate) fn adversarial_ties_resolve_to_lower_index<H: Harness>(h: &H) {
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
                    h,
                    &layout,
                    &cfg,
                    &[x.clone(), x.clone()],
                    &format!("ties {name} {m} n={n}"),
                );
            }
        }
    }
}
pub(crate) fn nan_injection_leaves_state_untouched<H: Harness>(h: &H) {
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
            compare(
                h,
                &layout,
                &cfg,
                &grads,
                &format!("nan {name} m={momentum}"),
            );
        }
    }
    // Overflow of e + g to infinity is non-finite too.
    let layout = Layout::single(10).unwrap();
    let mut g = h.device().compressor(&layout, &Config::topk(0.1)).unwrap();
    let big = vec![f32::MAX; 10];
    g.step(&big, 0).unwrap();
    let err = g.step(&big, 1).unwrap_err();
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
/// f32::MAX`) fails the step like a non-finite `p`: the same `Error::NonFinite` (count and
/// first index of those values) as the CPU, residual and momentum untouched, later steps
/// identical. Block-sized and grid-wide groups, f32 and f16 values, with and without
/// momentum, every top-r candidate overflowing (1 in 5 planted) or only some (1 in 97).
pub(crate) fn unbiased_scale_overflow_is_rejected<H: Harness>(h: &H) {
    let mut layouts = vec![mixed_layout(30, 4)];
    for n in [3000usize, 40_000, (1 << 20) + 3] {
        if n < 1 << 20 || h.full() {
            layouts.push(Layout::new(&[n / 2, n - n / 2]).unwrap());
        }
    }
    for layout in &layouts {
        let n = layout.n();
        for mode in [Mode::Global, Mode::PerLayer] {
            for (values, momentum) in [(DType::F32, 0.0), (DType::F16, 0.5)] {
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
                    let what =
                        format!("scaled overflow n={n} {mode:?} {values:?} m={momentum} 1/{every}");
                    // The reference rejects the planted step (compare steps at t = 3, 10, ..),
                    // so the comparison is not vacuous.
                    let mut c = gradsift::cpu::Compressor::new(layout, &cfg).unwrap();
                    c.step(&grads[0], 3).unwrap();
                    let r = c.step(&grads[1], 10).map(|_| ());
                    assert!(matches!(r, Err(Error::NonFinite { .. })), "{what}: {r:?}");
                    compare(h, layout, &cfg, &grads, &what);
                }
            }
        }
    }
}
pub(crate) fn large_buffer_two_to_the_twenty_plus_three<H: Harness>(h: &H) {
    let n = BIG;
    let layout = Layout::single(n).unwrap();
    let grads: Vec<Vec<f32>> = (0..2).map(|s| data(n, s)).collect();
    compare(
        h,
        &layout,
        &Config::rtopk(0.01, 0.001),
        &grads,
        "rtopk 2^20+3",
    );
    let g16: Vec<Vec<bf16>> = vec![to(&grads[0])];
    compare(h, &layout, &Config::topk(0.001), &g16, "topk bf16 2^20+3");
    let mut cfg = Config::sign();
    cfg.momentum = 0.5;
    compare(h, &layout, &cfg, &grads[..1], "sign 2^20+3");
    compare(
        h,
        &layout,
        &Config::randomk(0.001),
        &grads[..1],
        "randomk 2^20+3",
    );
}
pub(crate) fn device_buffer_api_and_errors<H: Harness>(h: &H) {
    let n = 1000;
    let layout = Layout::single(n).unwrap();
    let cfg = Config::topk(0.01);
    let mut g = h.compressor(&layout, &cfg).unwrap();
    let mut p = Payload::default();
    assert!(g.read_payload(&mut p).is_err(), "read before any step");
    // 16-bit elements on a device buffer (packed two per word on wgpu).
    let x: Vec<f16> = to(&data(n, 1));
    h.step_device(&mut g, &x, 5).unwrap();
    g.read_payload(&mut p).unwrap();
    let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
    compare_payload(c.step(&x, 5).unwrap(), &p, Tol::Bits, "device buffer", true);
    // A buffer too short for n elements: on wgpu the old suite's 16-bit buffer passed as
    // f32 (2000 of 4000 bytes) took this same byte-length check.
    let short: Vec<f32> = data(n - 1, 2);
    assert!(matches!(
        h.step_device(&mut g, &short, 6),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        g.step(&data(10, 1), 6),
        Err(Error::LengthMismatch { .. })
    ));
    let bad = Config::rtopk(0.1, 0.2);
    assert!(matches!(
        h.compressor(&layout, &bad),
        Err(Error::InvalidConfig(_))
    ));
    // A plan larger than one storage binding is rejected with the limit in the message.
    if let Some(max) = h.max_binding_bytes() {
        if max / 4 < u32::MAX as u64 {
            let huge = Layout::single((max / 4 + 1) as usize).unwrap();
            let e = h.compressor(&huge, &cfg).err().expect("above the limit");
            assert!(e.to_string().contains(&max.to_string()), "{e}");
        }
    }
}
pub(crate) fn randomized_configs_match_cpu<H: Harness>(h: &H) {
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
        cfg.seed = (next(u64::MAX) << 20) | next(1 << 20);
        cfg.worker = next(1 << 31) as u32;
        let grads: Vec<Vec<f32>> = (0..3).map(|t| dyadic(n, case * 10 + t)).collect();
        let what = format!("random case {case}: {cfg:?} layers {sizes:?}");
        match next(3) {
            0 => compare(h, &layout, &cfg, &grads, &what),
            1 => {
                let g: Vec<Vec<f16>> = grads.iter().map(|g| to(g)).collect();
                compare(h, &layout, &cfg, &g, &what)
            }
            _ => {
                let g: Vec<Vec<bf16>> = grads.iter().map(|g| to(g)).collect();
                compare(h, &layout, &cfg, &g, &what)
            }
        }
    }
}
pub(crate) fn rejected_step_rolls_back_on_the_device_without_a_host_read<H: Harness>(h: &H) {
    let n = 9000;
    let layout = Layout::single(n).unwrap();
    let mut cfg = Config::rtopk(0.05, 0.01);
    cfg.momentum = 0.5;
    let mut c = gradsift::cpu::Compressor::new(&layout, &cfg).unwrap();
    let mut g = h.compressor(&layout, &cfg).unwrap();
    let good: Vec<Vec<f32>> = (0..3).map(|s| dyadic(n, s)).collect();
    let mut bad = good[1].clone();
    bad[4321] = f32::NAN;
    c.step(&good[0], 0).unwrap();
    h.step_device(&mut g, &good[0], 0).unwrap();
    // Rejected on both; on a GPU the step is not read, so only the device knows (the CPU
    // reports it from the step itself).
    assert!(c.step(&bad, 1).is_err());
    let r = h.step_device(&mut g, &bad, 1);
    if h.backend() == Backend::Cpu {
        assert!(matches!(r, Err(Error::NonFinite { .. })), "{r:?}");
    } else {
        r.unwrap();
    }
    let want = c.step(&good[2], 2).unwrap().clone();
    h.step_device(&mut g, &good[2], 2).unwrap();
    let mut p = Payload::default();
    g.read_payload(&mut p).unwrap();
    assert_eq!(
        g.rejected_steps().unwrap(),
        1,
        "the unread rejection is counted"
    );
    compare_payload(&want, &p, Tol::Bits, "after an unread rejected step", true);
    h.step_device(&mut g, &good[2], 3).unwrap();
    g.read_payload(&mut p).unwrap();
    assert_eq!(
        g.rejected_steps().unwrap(),
        1,
        "counted since the plan was built, not since the last read"
    );
    c.step(&good[2], 3).unwrap();
    let mut r = Vec::new();
    g.residual(&mut r).unwrap();
    compare_f32(
        c.residual_slice(),
        &r,
        Tol::Bits,
        "residual after an unread rejected step",
    );
    g.momentum(&mut r).unwrap();
    compare_f32(
        c.momentum_slice(),
        &r,
        Tol::Bits,
        "momentum after an unread rejected step",
    );
    // reset() zeroes both on the device.
    g.reset().unwrap();
    g.residual(&mut r).unwrap();
    assert!(r.iter().all(|&v| v == 0.0));
    g.momentum(&mut r).unwrap();
    assert!(r.len() == n && r.iter().all(|&v| v == 0.0));
}
// ---- cases from the old CUDA suite ----------------------------------------------------------

pub(crate) fn run_all_configs<H: Harness, T: Element>(
    h: &H,
    sizes: &[usize],
    configs: &[(String, Config)],
) {
    for &n in sizes {
        for layout in if n == BIG {
            layouts_for(h, n)
        } else {
            sizes_layouts(n)
        } {
            let grads: Vec<Vec<T>> = (0..3).map(|s| gaussian::<T>(n, 17 + s, 1.0)).collect();
            for (name, config) in configs {
                compare(
                    h,
                    &layout,
                    config,
                    &grads,
                    &format!(
                        "{}/n={n}/L={}/{name}",
                        std::any::type_name::<T>(),
                        layout.num_layers()
                    ),
                );
            }
        }
    }
}
pub(crate) fn compressor_matches_cpu<H: Harness, T: Element>(h: &H) {
    run_all_configs::<H, T>(h, &EDGE_SIZES, &configs());
    let big = configs_for(
        h,
        &[0, 4, 7, 9, 11, 13, 16],
        &format!("{} 2^20+3", std::any::type_name::<T>()),
    );
    run_all_configs::<H, T>(h, &[BIG], &big);
}
pub(crate) fn compressor_matches_cpu_f32<H: Harness>(h: &H) {
    compressor_matches_cpu::<H, f32>(h);
}
pub(crate) fn compressor_matches_cpu_f16<H: Harness>(h: &H) {
    compressor_matches_cpu::<H, f16>(h);
}
pub(crate) fn compressor_matches_cpu_bf16<H: Harness>(h: &H) {
    compressor_matches_cpu::<H, bf16>(h);
}
pub(crate) fn compressor_matches_cpu_2_pow_26<H: Harness>(h: &H) {
    let n = 1usize << 26;
    let layout = Layout::single(n).unwrap();
    if let Some(max) = h.max_binding_bytes() {
        if (n as u64) * 4 > max {
            // Above this device's storage binding limit: the typed error that names it.
            let e = h
                .compressor(&layout, &Config::topk(0.001))
                .err()
                .expect("above the limit");
            assert!(
                matches!(&e, Error::Device { .. }) && e.to_string().contains(&max.to_string()),
                "{e:?}"
            );
            println!(
                "NOTE: {}: 2^26 f32 is above the {max}-byte binding limit: checked the error, no comparison",
                h.backend()
            );
            return;
        }
    }
    if !h.full() {
        println!(
            "NOTE: {}: the 2^26 comparison runs on CUDA only (too slow here)",
            h.backend()
        );
        return;
    }
    let grads: Vec<Vec<f32>> = (0..2).map(|s| gaussian::<f32>(n, 5 + s, 1.0)).collect();
    for config in [
        Config::rtopk(0.01, 0.001),
        Config::topk(0.001),
        Config::randomk(0.001),
    ] {
        compare(
            h,
            &layout,
            &config,
            &grads,
            &format!("2^26/{:?}", config.method),
        );
    }
    // 32 layers of 2^20 take CUDA's block path, two of 2^24 the grid path.
    let mut sizes: Vec<usize> = (0..32).map(|_| 1 << 20).collect();
    sizes.extend([1 << 24, 1 << 24]);
    let layout = Layout::new(&sizes).unwrap();
    let mut c = Config::rtopk(0.01, 0.001);
    c.mode = Mode::PerLayer;
    compare(h, &layout, &c, &grads, "2^26/per-layer");
}
pub(crate) fn thousand_mixed_layers<H: Harness>(h: &H) {
    let mut r = Lcg(99);
    let mut sizes: Vec<usize> = (0..1000)
        .map(|i| match i % 10 {
            0 => 0,
            1..=6 => 1 + r.below(3000) as usize,
            7 | 8 => 20_000 + r.below(20_000) as usize,
            _ => 1 + r.below(40) as usize,
        })
        .collect();
    // Around CUDA's per-layer block/grid threshold (2^20).
    sizes[500] = 1 << 20;
    sizes[501] = (1 << 20) + 1;
    sizes[999] = 300_001;
    let layout = Layout::new(&sizes).unwrap();
    let n = layout.n();
    let grads: Vec<Vec<f32>> = (0..3).map(|s| gaussian::<f32>(n, 40 + s, 1.0)).collect();
    for (name, mut config) in configs_for(h, &[3, 4, 9, 17], "1000 layers") {
        config.mode = Mode::PerLayer;
        compare(h, &layout, &config, &grads, &format!("1000 layers/{name}"));
    }
}
pub(crate) fn adversarial_ties<H: Harness>(h: &H) {
    for n in [1000usize, 32769, BIG] {
        let grads: Vec<Vec<f32>> = (0..3).map(|s| adversarial::<f32>(n, 7 + s)).collect();
        let zeros = vec![vec![0.0f32; n]; 2];
        let equal = vec![vec![1.5f32; n]; 2];
        let configs = if n == BIG {
            configs_for(h, &[0, 7, 17], "ties 2^20+3")
        } else {
            configs()
        };
        for layout in if n == BIG {
            layouts_for(h, n)
        } else {
            sizes_layouts(n)
        } {
            for (name, config) in &configs {
                let tag = format!("ties/n={n}/L={}/{name}", layout.num_layers());
                compare(h, &layout, config, &grads, &tag);
                compare(h, &layout, config, &zeros, &format!("{tag}/zeros"));
                compare(h, &layout, config, &equal, &format!("{tag}/equal"));
            }
        }
        let grads16: Vec<Vec<bf16>> = (0..2).map(|s| adversarial::<bf16>(n, 70 + s)).collect();
        compare(
            h,
            &Layout::single(n).unwrap(),
            &Config::rtopk(0.3, 0.1),
            &grads16,
            "ties/bf16",
        );
    }
}
pub(crate) fn nan_steps_are_rejected_and_leave_state_untouched<H: Harness>(h: &H) {
    for n in [100usize, 40_000, BIG] {
        let configs = if n == BIG {
            configs_for(h, &[1, 9, 17], "nan 2^20+3")
        } else {
            configs()
        };
        for (name, mut config) in configs {
            config.momentum = if name.contains("momentum") { 0.9 } else { 0.0 };
            let layout = Layout::new(&[n / 2, n - n / 2]).unwrap();
            let mut bad = gaussian::<f32>(n, 3, 1.0);
            bad[n / 3] = f32::NAN;
            bad[n - 1] = f32::INFINITY;
            let mut huge = gaussian::<f32>(n, 4, 1.0);
            huge[7] = f32::MAX;
            let grads = vec![
                gaussian::<f32>(n, 1, 1.0),
                bad,
                gaussian::<f32>(n, 2, 1.0),
                huge.clone(),
                huge,
            ];
            compare(h, &layout, &config, &grads, &format!("nan/n={n}/{name}"));
        }
    }
}
pub(crate) fn bad_input_is_an_error<H: Harness>(h: &H) {
    let layout = Layout::single(100).unwrap();
    let mut g = h.compressor(&layout, &Config::topk(0.1)).unwrap();
    assert!(matches!(
        h.step_device(&mut g, &[1.0f32; 99], 1),
        Err(Error::LengthMismatch { .. })
    ));
    let mut p = Payload::Sparse(SparsePayload::default());
    assert!(g.read_payload(&mut p).is_err(), "no step yet");
    assert!(h.compressor(&layout, &Config::rtopk(0.1, 0.2)).is_err());
    assert!(
        h.device()
            .compressor(&layout, &Config::rtopk(0.1, 0.2))
            .is_err()
    );
}
/// Philox through random-k with `r = n`: identical indices on every backend (SPEC §3).
pub(crate) fn random_k_uses_the_spec_keys<H: Harness>(h: &H) {
    for n in [10usize, 5000, 100_000] {
        let layout = Layout::single(n).unwrap();
        let x = gaussian::<f32>(n, 1, 1.0);
        let mut c = Config::randomk(0.05);
        c.seed = u64::MAX;
        c.worker = u32::MAX;
        let want = gradsift::cpu::rtopk(
            &x,
            n,
            Count::Ratio(0.05).resolve(n),
            c.worker,
            u64::MAX,
            c.seed,
        )
        .unwrap();
        let mut g = h.compressor(&layout, &c).unwrap();
        h.step_device(&mut g, &x, u64::MAX).unwrap();
        let p = g.payload().unwrap();
        assert_eq!(p.as_sparse().unwrap().indices, want, "n={n}");
    }
}
