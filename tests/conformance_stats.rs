//! SPEC-conformance tests for per-layer statistics and the sigma_X^2 / sigma_N^2 estimator
//! (SPEC §8), against naive two-pass f64 loops and synthetic data with known variances.

#![allow(
    clippy::needless_range_loop,
    clippy::single_range_in_vec_init,
    clippy::type_complexity
)]

mod common;

use common::*;
use gradsift::cpu::{estimate_variance, layer_stats};
use gradsift::{Error, LayerStats, Layout, VarianceEstimate, VarianceTracker};

/// Naive two-pass f64 statistics of one layer. Mean and variance are over the finite
/// elements (a non-finite element has no place in a mean; it is counted separately), the
/// variance divides by their number (population variance); with no finite element both are
/// NaN (SPEC §8).
struct Naive {
    count: u64,
    mean: f64,
    var: f64,
    min: f32,
    max: f32,
    max_abs: f32,
    non_finite: u64,
}

fn naive_stats(x: &[f32]) -> Naive {
    let fin: Vec<f64> = x
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| f64::from(v))
        .collect();
    let m = fin.len() as f64;
    let (mean, var) = if fin.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        let mean = fin.iter().sum::<f64>() / m;
        (
            mean,
            fin.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / m,
        )
    };
    let finite = x.iter().copied().filter(|v| v.is_finite());
    Naive {
        count: x.len() as u64,
        mean,
        var,
        min: finite.clone().fold(f32::INFINITY, f32::min),
        max: finite.clone().fold(f32::NEG_INFINITY, f32::max),
        max_abs: finite.map(f32::abs).fold(0.0, f32::max),
        non_finite: (x.len() - fin.len()) as u64,
    }
}

fn check_stats(got: &LayerStats, x: &[f32], ctx: &str) {
    let w = naive_stats(x);
    assert_eq!(got.count, w.count, "{ctx}: count");
    assert_eq!(got.non_finite, w.non_finite, "{ctx}: non-finite");
    if w.count == w.non_finite {
        // Empty, or nothing finite: mean and variance NaN (SPEC §8), max |x| 0.
        assert!(got.mean.is_nan() && got.var.is_nan(), "{ctx}: {got:?}");
        assert_eq!(got.max_abs, 0.0, "{ctx}");
        assert_eq!(
            (got.min, got.max),
            (f32::INFINITY, f32::NEG_INFINITY),
            "{ctx}"
        );
        return;
    }
    let sd = w.var.sqrt();
    // The reference accumulates in f64 (SPEC §8); allow f64 rounding of any summation order.
    assert!(
        (got.mean - w.mean).abs() <= 1e-12 * (w.mean.abs() + sd) + 1e-300,
        "{ctx}: mean {} vs {}",
        got.mean,
        w.mean
    );
    assert!(
        (got.var - w.var).abs() <= 1e-10 * w.var + 1e-300,
        "{ctx}: var {} vs {}",
        got.var,
        w.var
    );
    assert_eq!(got.min, w.min, "{ctx}: min");
    assert_eq!(got.max, w.max, "{ctx}: max");
    assert_eq!(got.max_abs, w.max_abs, "{ctx}: max |x|");
}

fn layer_data(n: usize, l: usize, rng: &mut Rng) -> Vec<f32> {
    // A different location and spread per layer; one layer far from zero relative to its
    // spread (cancellation in a one-pass sum of squares would show there).
    let (mu, sd) = match l % 4 {
        0 => (0.0, 1.0),
        1 => (1000.0, 1e-3),
        2 => (-3.0, 50.0),
        _ => (1e-30, 1e-32),
    };
    (0..n).map(|_| (mu + sd * rng.gauss()) as f32).collect()
}

#[test]
fn layer_stats_match_naive_f64() {
    let sizes = [0usize, 1, 2, 7, 4095, 4096, 4097, 100_003, 0, 12_345];
    let layout = Layout::new(&sizes).unwrap();
    let off = offsets(&sizes);
    let mut rng = Rng::new(41);
    let mut x = Vec::new();
    for (l, &s) in sizes.iter().enumerate() {
        x.extend(layer_data(s, l, &mut rng));
    }
    let mut out = Vec::new();
    layer_stats(&x, &layout, &mut out).unwrap();
    assert_eq!(out.len(), sizes.len());
    for l in 0..sizes.len() {
        check_stats(&out[l], &x[off[l]..off[l + 1]], &format!("layer {l}"));
    }

    // Non-finite elements: counted, and excluded from the moments and extremes.
    let mut y = x.clone();
    for (j, i) in [
        off[1],
        off[3] + 2,
        off[5] + 100,
        off[5] + 101,
        off[7] + 50_000,
    ]
    .into_iter()
    .enumerate()
    {
        y[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][j % 3];
    }
    for i in off[6]..off[7] {
        y[i] = f32::NAN; // a layer with nothing finite
    }
    // Reuse `out`: it is cleared first.
    layer_stats(&y, &layout, &mut out).unwrap();
    assert_eq!(out.len(), sizes.len());
    for l in 0..sizes.len() {
        check_stats(
            &out[l],
            &y[off[l]..off[l + 1]],
            &format!("non-finite, layer {l}"),
        );
    }
    assert_eq!(out[5].non_finite, 2);
    assert_eq!(out[6].non_finite, 4097);
    assert_eq!(out[1].non_finite, 1);

    // No layers at all, and a layout/buffer mismatch.
    let empty = Layout::new(&[]).unwrap();
    layer_stats::<f32>(&[], &empty, &mut out).unwrap();
    assert!(out.is_empty());
    assert!(matches!(
        layer_stats(&x[1..], &layout, &mut out),
        Err(Error::LengthMismatch { .. })
    ));
}

#[test]
fn layer_stats_half_precision() {
    let sizes = [3usize, 0, 5000, 4097];
    let layout = Layout::new(&sizes).unwrap();
    let off = offsets(&sizes);
    let mut rng = Rng::new(42);
    let mut x: Vec<f32> = (0..layout.n())
        .map(|i| (rng.gauss() * if i % 2 == 0 { 1e-5 } else { 3.0 }) as f32)
        .collect();
    x[7] = f32::NAN;
    x[9000] = f32::INFINITY;
    let h = to_f16(&x);
    let hw = widen_f16(&h);
    let b = to_bf16(&x);
    let bw = widen_bf16(&b);
    let (mut sh, mut sb, mut sf) = (Vec::new(), Vec::new(), Vec::new());
    layer_stats(&h, &layout, &mut sh).unwrap();
    layer_stats(&b, &layout, &mut sb).unwrap();
    for l in 0..sizes.len() {
        let r = off[l]..off[l + 1];
        check_stats(&sh[l], &hw[r.clone()], &format!("f16 layer {l}"));
        check_stats(&sb[l], &bw[r], &format!("bf16 layer {l}"));
    }
    // Widening is exact, so the 16-bit buffers give exactly their widening's statistics.
    layer_stats(&hw, &layout, &mut sf).unwrap();
    assert_eq!(format!("{sh:?}"), format!("{sf:?}"), "f16 (NaN-aware)");
    layer_stats(&bw, &layout, &mut sf).unwrap();
    assert_eq!(format!("{sb:?}"), format!("{sf:?}"), "bf16 (NaN-aware)");
}

// ---------------------------------------------------------------------------------------
// sigma_X^2 / sigma_N^2
// ---------------------------------------------------------------------------------------

/// Naive SPEC §8 estimator for one layer, two-pass f64.
fn naive_variance(workers: &[Vec<f32>], r: std::ops::Range<usize>) -> (f64, f64) {
    let k = workers.len() as f64;
    let nl = r.len() as f64;
    if r.is_empty() {
        return (0.0, 0.0);
    }
    let ybar: Vec<f64> = r
        .clone()
        .map(|i| workers.iter().map(|w| f64::from(w[i])).sum::<f64>() / k)
        .collect();
    let noise: f64 = r
        .clone()
        .enumerate()
        .map(|(j, i)| {
            workers
                .iter()
                .map(|w| (f64::from(w[i]) - ybar[j]).powi(2))
                .sum::<f64>()
        })
        .sum();
    let sn2 = noise / (nl * (k - 1.0));
    let m = ybar.iter().sum::<f64>() / nl;
    let var_ybar = ybar.iter().map(|y| (y - m) * (y - m)).sum::<f64>() / nl;
    ((var_ybar - sn2 / k).max(0.0), sn2)
}

/// Synthetic `Y_k = X + N_k`. Per layer: (n_l, mean of X, sigma_X^2, sigma_N^2).
fn synthetic(layers: &[(usize, f64, f64, f64)], kk: usize, rng: &mut Rng) -> Vec<Vec<f32>> {
    let n: usize = layers.iter().map(|l| l.0).sum();
    let mut ws = vec![Vec::with_capacity(n); kk];
    for &(nl, mu, sx2, sn2) in layers {
        for _ in 0..nl {
            let x = mu + sx2.sqrt() * rng.gauss();
            for w in ws.iter_mut() {
                w.push((x + sn2.sqrt() * rng.gauss()) as f32);
            }
        }
    }
    ws
}

/// SPEC §8 on synthetic data with known variances, K = 5: both estimates within 2%.
/// Standard errors (relative): sigma_N^2 ~ sqrt(2 / (n_l (K-1))) < 0.2%; sigma_X^2 ~
/// sqrt(2/n_l) (sigma_X^2 + sigma_N^2/K) / sigma_X^2 < 0.4% for these layers, so 2% is more
/// than 5 standard errors. Also checks the formula itself against a naive two-pass loop.
#[test]
fn estimate_variance_recovers_synthetic_variances() {
    let layers = [
        (200_000usize, 0.0, 1.0, 0.5),
        (0, 0.0, 1.0, 1.0),
        (150_000, 3.0, 0.04, 0.01), // non-zero mean: the variance is centred
        (7, 0.0, 1.0, 1.0),
        (300_000, 0.0, 2.5e-5, 2.5e-5),
    ];
    let kk = 5;
    let mut rng = Rng::new(43);
    let ws = synthetic(&layers, kk, &mut rng);
    let sizes: Vec<usize> = layers.iter().map(|l| l.0).collect();
    let layout = Layout::new(&sizes).unwrap();
    let off = offsets(&sizes);
    let views: Vec<&[f32]> = ws.iter().map(|w| w.as_slice()).collect();
    let mut out = Vec::new();
    estimate_variance(&views, &layout, &mut out).unwrap();
    assert_eq!(out.len(), layers.len());
    for (l, &(nl, _, sx2, sn2)) in layers.iter().enumerate() {
        let (nx, nn) = naive_variance(&ws, off[l]..off[l + 1]);
        let e = out[l];
        assert!(
            (e.sigma_x2 - nx).abs() <= 1e-9 * (nx + nn) + 1e-300,
            "layer {l}: sigma_X^2 {} vs naive {nx}",
            e.sigma_x2
        );
        assert!(
            (e.sigma_n2 - nn).abs() <= 1e-9 * nn + 1e-300,
            "layer {l}: sigma_N^2 {} vs naive {nn}",
            e.sigma_n2
        );
        if nl == 0 {
            assert_eq!((e.sigma_x2, e.sigma_n2), (0.0, 0.0), "empty layer");
        }
        if nl >= 100_000 {
            assert!(
                (e.sigma_n2 / sn2 - 1.0).abs() < 0.02,
                "layer {l}: sigma_N^2 {} vs true {sn2}",
                e.sigma_n2
            );
            assert!(
                (e.sigma_x2 / sx2 - 1.0).abs() < 0.02,
                "layer {l}: sigma_X^2 {} vs true {sx2}",
                e.sigma_x2
            );
        }
    }

    // Identical workers: no noise, sigma_N^2 = 0 and sigma_X^2 = the plain variance.
    let same = [ws[0].clone(), ws[0].clone(), ws[0].clone()];
    let views: Vec<&[f32]> = same.iter().map(|w| w.as_slice()).collect();
    estimate_variance(&views, &layout, &mut out).unwrap();
    for l in 0..layers.len() {
        assert_eq!(out[l].sigma_n2, 0.0);
        let w = naive_stats(&ws[0][off[l]..off[l + 1]]);
        // An empty layer: the estimator gives 0, the layer statistics NaN (SPEC §8).
        let var = if w.count == 0 { 0.0 } else { w.var };
        assert!((out[l].sigma_x2 - var).abs() <= 1e-10 * var + 1e-300);
    }

    // sigma_X^2 is clamped at 0 when the noise term exceeds the spread of the means.
    let (a, b) = (vec![1.0f32, -1.0, 1.0, -1.0], vec![-1.0f32, 1.0, -1.0, 1.0]);
    let mut out1 = Vec::new();
    estimate_variance(&[&a[..], &b[..]], &Layout::single(4).unwrap(), &mut out1).unwrap();
    // ybar = 0 everywhere: var(ybar) = 0, sigma_N^2 = 4*2 / (4*1) = 2, sigma_X^2 = max(0, -1).
    assert_eq!(out1[0].sigma_n2, 2.0);
    assert_eq!(out1[0].sigma_x2, 0.0);
}

#[test]
fn estimate_variance_half_precision_and_errors() {
    let layers = [
        (5000usize, 0.5, 1.0, 0.3),
        (0, 0.0, 1.0, 1.0),
        (4097, 0.0, 0.01, 0.02),
    ];
    let mut rng = Rng::new(44);
    let ws = synthetic(&layers, 3, &mut rng);
    let sizes: Vec<usize> = layers.iter().map(|l| l.0).collect();
    let layout = Layout::new(&sizes).unwrap();
    let off = offsets(&sizes);
    let hs: Vec<Vec<gradsift::f16>> = ws.iter().map(|w| to_f16(w)).collect();
    let hw: Vec<Vec<f32>> = hs.iter().map(|h| widen_f16(h)).collect();
    let hv: Vec<&[gradsift::f16]> = hs.iter().map(|h| h.as_slice()).collect();
    let mut out = Vec::new();
    estimate_variance(&hv, &layout, &mut out).unwrap();
    for l in 0..layers.len() {
        let (nx, nn) = naive_variance(&hw, off[l]..off[l + 1]);
        assert!((out[l].sigma_x2 - nx).abs() <= 1e-9 * (nx + nn) + 1e-300);
        assert!((out[l].sigma_n2 - nn).abs() <= 1e-9 * nn + 1e-300);
    }
    let bs: Vec<Vec<gradsift::bf16>> = ws.iter().map(|w| to_bf16(w)).collect();
    let bw: Vec<Vec<f32>> = bs.iter().map(|b| widen_bf16(b)).collect();
    let bv: Vec<&[gradsift::bf16]> = bs.iter().map(|b| b.as_slice()).collect();
    estimate_variance(&bv, &layout, &mut out).unwrap();
    for l in 0..layers.len() {
        let (nx, nn) = naive_variance(&bw, off[l]..off[l + 1]);
        assert!((out[l].sigma_x2 - nx).abs() <= 1e-9 * (nx + nn) + 1e-300);
        assert!((out[l].sigma_n2 - nn).abs() <= 1e-9 * nn + 1e-300);
    }

    // K < 2 is an error, K = 0 included.
    let v0: Vec<&[f32]> = vec![];
    assert!(matches!(
        estimate_variance(&v0, &layout, &mut out),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(
        estimate_variance(&[&ws[0][..]], &layout, &mut out),
        Err(Error::InvalidConfig(_))
    ));
    // Mismatched lengths.
    assert!(matches!(
        estimate_variance(&[&ws[0][..], &ws[1][1..]], &layout, &mut out),
        Err(Error::LengthMismatch { .. })
    ));
    // A non-finite element is an error, not a NaN estimate.
    let mut bad = ws[1].clone();
    bad[123] = f32::NAN;
    assert!(matches!(
        estimate_variance(&[&ws[0][..], &bad[..]], &layout, &mut out),
        Err(Error::NonFinite { .. })
    ));
}

#[test]
fn variance_tracker_ema() {
    let e = |x: f64, n: f64| VarianceEstimate {
        sigma_x2: x,
        sigma_n2: n,
    };
    let mut t = VarianceTracker::new(0.9).unwrap();
    assert!(t.current().is_empty());
    // The first observation initialises the average.
    let s = t.update(&[e(1.0, 2.0), e(0.0, 0.0)]).unwrap().to_vec();
    assert_eq!(s, vec![e(1.0, 2.0), e(0.0, 0.0)]);
    // Then s <- beta s + (1 - beta) x.
    let s = t.update(&[e(3.0, 4.0), e(10.0, 20.0)]).unwrap().to_vec();
    let want = [
        e(0.9 * 1.0 + 0.1 * 3.0, 0.9 * 2.0 + 0.1 * 4.0),
        e(0.9 * 0.0 + 0.1 * 10.0, 0.9 * 0.0 + 0.1 * 20.0),
    ];
    for (a, b) in s.iter().zip(&want) {
        assert!((a.sigma_x2 - b.sigma_x2).abs() < 1e-15);
        assert!((a.sigma_n2 - b.sigma_n2).abs() < 1e-15);
    }
    assert_eq!(t.current(), &s[..]);
    // A constant input is a fixed point; a step input converges geometrically.
    let mut t = VarianceTracker::new(0.5).unwrap();
    t.update(&[e(0.0, 0.0)]).unwrap();
    for i in 1..=10 {
        let s = t.update(&[e(1.0, 8.0)]).unwrap()[0];
        let want = 1.0 - 0.5f64.powi(i);
        assert!((s.sigma_x2 - want).abs() < 1e-15, "step {i}");
        assert!((s.sigma_n2 - 8.0 * want).abs() < 1e-14, "step {i}");
    }
    // beta = 0 keeps only the latest estimate.
    let mut t = VarianceTracker::new(0.0).unwrap();
    t.update(&[e(5.0, 5.0)]).unwrap();
    assert_eq!(t.update(&[e(1.0, 2.0)]).unwrap(), &[e(1.0, 2.0)]);
    // The layer count must not change.
    assert!(matches!(
        t.update(&[e(1.0, 2.0), e(1.0, 2.0)]),
        Err(Error::LengthMismatch { .. })
    ));
    assert_eq!(t.current(), &[e(1.0, 2.0)]);
    // beta outside [0, 1).
    for b in [-0.1, 1.0, 1.5, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            VarianceTracker::new(b),
            Err(Error::InvalidConfig(_))
        ));
    }

    // Fed with the estimator over steps of synthetic data, the tracker follows the truth.
    let mut rng = Rng::new(45);
    let layers = [(20_000usize, 0.0, 0.5, 2.0)];
    let layout = Layout::single(20_000).unwrap();
    let mut t = VarianceTracker::new(0.8).unwrap();
    let mut out = Vec::new();
    for _ in 0..20 {
        let ws = synthetic(&layers, 4, &mut rng);
        let v: Vec<&[f32]> = ws.iter().map(|w| w.as_slice()).collect();
        estimate_variance(&v, &layout, &mut out).unwrap();
        t.update(&out).unwrap();
    }
    let s = t.current()[0];
    assert!((s.sigma_x2 / 0.5 - 1.0).abs() < 0.03, "{s:?}");
    assert!((s.sigma_n2 / 2.0 - 1.0).abs() < 0.03, "{s:?}");
}
