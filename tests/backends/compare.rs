//! Comparison against the CPU reference (SPEC §11's tolerances) and the configuration
//! matrices the cases share.

use super::*;

// ---- comparison -----------------------------------------------------------------------------

/// How closely a backend must reproduce the CPU (SPEC §11).
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Tol {
    /// Payload, residual and momentum bit-identical.
    Bits,
    /// Indices (and first-step signs) identical, floating results within `rel` of the
    /// element or of the vector's largest magnitude.
    Within(f32),
}
impl Tol {
    /// Sparse methods and QSGD (a maximum, SPEC §13) are bit-identical unless a momentum
    /// that is not a power of two lets a GPU fuse `m u + g` (1 ulp); scaled sign has a
    /// reduction in its scale.
    pub(crate) fn of(config: &Config) -> Tol {
        let m = config.momentum;
        if config.method == Method::Sign {
            Tol::Within(1e-5)
        } else if m == 0.0 || (m.to_bits() & 0x007F_FFFF) == 0 {
            Tol::Bits
        } else {
            Tol::Within(2.4e-7)
        }
    }
}
pub(crate) fn close(a: f32, b: f32, rel: f32) -> bool {
    a == b || (a - b).abs() <= rel * a.abs().max(b.abs()) || (a.is_nan() && b.is_nan())
}
/// `Within(rel)` compares elementwise relative to the vector's largest magnitude: residuals
/// of a sign step are differences of nearly equal numbers.
pub(crate) fn compare_f32(want: &[f32], got: &[f32], tol: Tol, what: &str) {
    assert_eq!(want.len(), got.len(), "{what}: lengths");
    let norm = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in want.iter().zip(got).enumerate() {
        let ok = match tol {
            Tol::Bits => a.to_bits() == b.to_bits(),
            Tol::Within(rel) => close(*a, *b, rel) || (a - b).abs() <= rel * norm,
        };
        assert!(ok, "{what}: element {i}: cpu {a:e} backend {b:e}");
    }
}
pub(crate) fn compare_payload(want: &Payload, got: &Payload, tol: Tol, what: &str, first: bool) {
    match (want, got) {
        (Payload::Sparse(w), Payload::Sparse(g)) => {
            assert_eq!(w.n, g.n, "{what}: n");
            assert_eq!(w.values_dtype, g.values_dtype, "{what}: dtype");
            if w.indices != g.indices {
                let i = w
                    .indices
                    .iter()
                    .zip(&g.indices)
                    .position(|(a, b)| a != b)
                    .unwrap_or(w.indices.len().min(g.indices.len()));
                panic!(
                    "{what}: indices differ at {i} of {}/{}: cpu {:?} backend {:?}",
                    w.indices.len(),
                    g.indices.len(),
                    &w.indices[i.saturating_sub(2)..(i + 3).min(w.indices.len())],
                    &g.indices[i.saturating_sub(2)..(i + 3).min(g.indices.len())]
                );
            }
            // Values rounded to 16 bits may land one 16-bit ulp apart when p is 1 ulp apart.
            let tol = match (tol, w.values_dtype) {
                (Tol::Bits, _) => Tol::Bits,
                (Tol::Within(r), DType::F32) => Tol::Within(r),
                (Tol::Within(r), DType::F16) => Tol::Within(r.max(1e-3)),
                (Tol::Within(r), DType::BF16) => Tol::Within(r.max(8e-3)),
            };
            compare_f32(&w.values, &g.values, tol, &format!("{what}: values"));
        }
        (Payload::Sign(w), Payload::Sign(g)) => {
            assert_eq!(w.n, g.n, "{what}: n");
            if first || tol == Tol::Bits {
                assert_eq!(w.negative, g.negative, "{what}: sign bits");
            } else {
                // Later steps: only elements whose p sits at rounding distance from 0 may
                // flip, since the scales (a reduction) may differ in the last bits.
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
            assert_eq!(w.scales.len(), g.scales.len(), "{what}: scales");
            compare_f32(
                &w.scales,
                &g.scales,
                Tol::Within(1e-5),
                &format!("{what}: scales"),
            );
        }
        (Payload::Qsgd(w), Payload::Qsgd(g)) => {
            assert_eq!((w.n, w.levels), (g.n, g.levels), "{what}: n, levels");
            if tol == Tol::Bits {
                assert_eq!(
                    common::bits(&w.scales),
                    common::bits(&g.scales),
                    "{what}: scales"
                );
                if let Some(i) = (0..w.codes.len()).find(|&i| w.codes[i] != g.codes[i]) {
                    panic!(
                        "{what}: code {i}: cpu {} backend {}",
                        w.codes[i], g.codes[i]
                    );
                }
            } else {
                // 1-ulp inputs move a level only where a - floor(a) meets u.
                compare_f32(&w.scales, &g.scales, tol, &format!("{what}: scales"));
                let moved = w.codes.iter().zip(&g.codes).filter(|(a, b)| a != b).count();
                assert!(
                    moved <= 1 + w.n as usize / 1000,
                    "{what}: {moved} codes differ"
                );
            }
        }
        _ => panic!("{what}: payload kinds differ"),
    }
}
/// Runs the gradients through the CPU reference and the backend's own plan and compares
/// payloads, errors, residuals and momenta after every step. Steps alternate between the
/// host entry point (`step`) and the device one (`step_device` on a device buffer, then
/// `read_payload` into a reused payload), so both paths see every configuration.
pub(crate) fn compare<H: Harness, T: Element>(
    h: &H,
    layout: &Layout,
    config: &Config,
    grads: &[Vec<T>],
    what: &str,
) {
    let tol = Tol::of(config);
    let mut c = gradsift::cpu::Compressor::new(layout, config).unwrap();
    let mut g = h
        .compressor(layout, config)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut slot = Payload::default();
    let (mut re, mut rm) = (Vec::new(), Vec::new());
    for (i, grad) in grads.iter().enumerate() {
        // Reductions (sign scales) differ in the last bits, so after the first step the
        // residuals, hence the inputs of later steps, are no longer bit-identical.
        let first = i == 0;
        let t = i as u64 * 7 + 3;
        let want = c.step(grad, t).cloned();
        let got = if i % 2 == 0 {
            g.step(grad, t).cloned()
        } else {
            h.step_device(&mut g, grad, t)
                .and_then(|()| g.read_payload(&mut slot))
                .map(|()| slot.clone())
        };
        let path = if i % 2 == 0 { "host" } else { "device" };
        // Elements whose sign flipped (allowed after the first step, see compare_payload)
        // have residuals p - s and p + s: equal magnitudes, opposite signs.
        let flips: Vec<usize> = match (&want, &got) {
            (Ok(Payload::Sign(w)), Ok(Payload::Sign(p))) => (0..w.n as usize)
                .filter(|&i| w.is_negative(i) != p.is_negative(i))
                .collect(),
            _ => Vec::new(),
        };
        match (&want, &got) {
            (Ok(w), Ok(p)) => {
                compare_payload(w, p, tol, &format!("{what} step {t} ({path})"), first)
            }
            (Err(a), Err(b)) => assert_eq!(a, b, "{what} step {t} ({path}): errors differ"),
            _ => panic!("{what} step {t} ({path}): cpu {want:?} vs backend {got:?}"),
        }
        g.residual(&mut re).unwrap();
        let mut want_e = c.residual_slice().to_vec();
        for &i in &flips {
            assert!(
                close(want_e[i].abs(), re[i].abs(), 1e-5),
                "{what} residual step {t}: flipped element {i}: cpu {} backend {}",
                want_e[i],
                re[i]
            );
            want_e[i] = re[i];
        }
        compare_f32(&want_e, &re, tol, &format!("{what} residual step {t}"));
        g.momentum(&mut rm).unwrap();
        compare_f32(
            c.momentum_slice(),
            &rm,
            tol,
            &format!("{what} momentum step {t}"),
        );
    }
}
pub(crate) fn sparse_methods() -> Vec<(&'static str, Config)> {
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
/// The old CUDA suite's configuration matrix (14 configurations).
pub(crate) fn configs() -> Vec<(String, Config)> {
    let mut out = Vec::new();
    let methods = [
        (
            "rtopk",
            Method::RTopK {
                r: Count::Ratio(0.05),
                k: Count::Ratio(0.01),
            },
        ),
        (
            "topk",
            Method::TopK {
                k: Count::Ratio(0.01),
            },
        ),
        (
            "randomk",
            Method::RandomK {
                k: Count::Ratio(0.01),
            },
        ),
        (
            "rtopk_exact",
            Method::RTopK {
                r: Count::Exact(300),
                k: Count::Exact(7),
            },
        ),
        (
            "all",
            Method::TopK {
                k: Count::Ratio(1.0),
            },
        ),
        ("sign", Method::Sign),
    ];
    for (name, m) in methods {
        for mode in [Mode::Global, Mode::PerLayer] {
            let mut c = Config::new(m);
            c.mode = mode;
            c.seed = 0x1234_5678_9abc_def0;
            c.worker = 3;
            out.push((format!("{name}/{mode:?}"), c.clone()));
            if name == "rtopk" {
                let mut c2 = c.clone();
                c2.momentum = 0.9;
                c2.scale = Scale::Unbiased;
                c2.values = DType::F16;
                out.push((format!("{name}/{mode:?}/momentum/unbiased/f16"), c2));
                let mut c3 = c.clone();
                c3.values = DType::BF16;
                c3.scale = Scale::Unbiased;
                out.push((format!("{name}/{mode:?}/bf16"), c3));
            }
            if name == "sign" {
                let mut c2 = c.clone();
                c2.momentum = 0.5;
                out.push((format!("{name}/{mode:?}/momentum"), c2));
            }
        }
    }
    out
}
/// The configurations a big-size case runs: all of them where the backend is fast
/// ([`Harness::full`]), else the ones at `picks` (with a printed note).
pub(crate) fn configs_for<H: Harness>(h: &H, picks: &[usize], what: &str) -> Vec<(String, Config)> {
    let all = configs();
    if h.full() {
        return all;
    }
    let total = all.len();
    let some: Vec<_> = all
        .into_iter()
        .enumerate()
        .filter(|(i, _)| picks.contains(i))
        .map(|(_, c)| c)
        .collect();
    let names: Vec<&str> = some.iter().map(|(n, _)| n.as_str()).collect();
    println!(
        "NOTE: {}: {what}: {} of {total} configurations ({names:?}); the full matrix runs on CUDA",
        h.backend(),
        some.len()
    );
    some
}
/// The layouts of a big-size case: both where the backend is fast, else the single layer.
pub(crate) fn layouts_for<H: Harness>(h: &H, n: usize) -> Vec<Layout> {
    let mut v = sizes_layouts(n);
    if !h.full() {
        v.truncate(1);
    }
    v
}
/// Around the thread-block sizes (256, 512, 1024) and the global block/grid threshold (2^15).
pub(crate) const EDGE_SIZES: [usize; 14] = [
    0, 1, 2, 255, 256, 257, 511, 512, 513, 1023, 1025, 32767, 32768, 32769,
];

pub(crate) const BIG: usize = (1 << 20) + 3;

pub(crate) fn payloads_from(
    c: &mut gradsift::cpu::Compressor,
    workers: usize,
    n: usize,
) -> Vec<Payload> {
    (0..workers)
        .map(|k| c.step(&data(n, k as u64 + 50), k as u64).unwrap().clone())
        .collect()
}
pub(crate) fn payloads_for(layout: &Layout, config: &Config, k: usize, step: u64) -> Vec<Payload> {
    (0..k)
        .map(|w| {
            let mut c = config.clone();
            c.worker = w as u32;
            let mut comp = gradsift::cpu::Compressor::new(layout, &c).unwrap();
            comp.step(&gaussian::<f32>(layout.n(), 1000 + w as u64, 1.0), step)
                .unwrap()
                .clone()
        })
        .collect()
}
/// The aggregation of `payloads` on the CPU, then on the backend through the host entry
/// point (the dispatched `Device` plan) and the device one (the backend's own plan on its
/// own buffer): all bit-identical.
pub(crate) fn compare_aggregation<H: Harness>(
    h: &H,
    layout: &Layout,
    mode: Mode,
    rule: Average,
    payloads: &[Payload],
    what: &str,
) {
    let n = layout.n();
    let k = payloads.len();
    let mut want = vec![0.0f32; n];
    gradsift::cpu::Aggregator::new(layout, mode, rule, k)
        .unwrap()
        .aggregate(payloads, &mut want)
        .unwrap();
    let mut got = vec![7.0f32; n];
    h.device()
        .aggregator(layout, mode, rule, k)
        .unwrap()
        .aggregate(payloads, &mut got)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    compare_f32(&want, &got, Tol::Bits, what);
    let mut agg = h.aggregator(layout, mode, rule, k).unwrap();
    let mut dev = vec![f32::NAN; n];
    h.aggregate_device(&mut agg, payloads, &mut dev)
        .unwrap_or_else(|e| panic!("{what} (device): {e}"));
    compare_f32(&want, &dev, Tol::Bits, &format!("{what} (device)"));
}
pub(crate) fn close_var(w: &VarianceEstimate, g: &VarianceEstimate, what: &str) {
    let scale = w.sigma_x2 + w.sigma_n2;
    assert!(
        (w.sigma_n2 - g.sigma_n2).abs() <= 1e-4 * w.sigma_n2.abs() + 1e-12,
        "{what}: sigma_n2 {w:?} vs {g:?}"
    );
    assert!(
        (w.sigma_x2 - g.sigma_x2).abs() <= 1e-4 * scale + 1e-12,
        "{what}: sigma_x2 {w:?} vs {g:?}"
    );
}
/// The wgpu backend cannot stack 16-bit device buffers of odd length (a worker would start
/// mid-word); it says so with `InvalidConfig` (documented on its `estimate_variance_device`).
pub(crate) fn odd_16bit_on_wgpu<H: Harness, T: Element>(h: &H, n: usize) -> bool {
    h.backend() == Backend::Wgpu && T::DTYPE != DType::F32 && n % 2 == 1
}
