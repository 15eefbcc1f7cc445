//! Rate-distortion bounds (SPEC §9) and the measurement of a real compressor.
//!
//! Each test compares against something computed another way: a closed form, a brute-force
//! search, or the Gaussian theory behind the paper's signSGD distortion.

use gradsift::rd::{
    self, Convergence, LayerModel, StepState, allocate_distortion, heterogeneous_sum_rate,
    independent_rate, iterations_bound, sign_distortion, sum_rate,
};
use gradsift::{Average, Compress, Config, Layout, Mode, VarianceEstimate};
use std::f64::consts::{LN_2, PI};

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-300)
}

/// Variance pairs spanning the regimes of Fig. 6: signal-dominated, noise-dominated, one of
/// them zero, and scales from 1e-12 to 1e6.
const VARIANCES: &[(f64, f64)] = &[
    (1.0, 1.0),
    (10.0, 0.1),
    (0.1, 10.0),
    (0.0, 1.0),
    (1.0, 0.0),
    (3.7e-12, 2.2e-11),
    (5e5, 1e6),
];
const WORKERS: &[usize] = &[1, 2, 5, 10, 100];

#[test]
fn independent_rate_at_sign_distortion_is_the_constant_of_fig7() {
    for &(sx, sn) in VARIANCES {
        for &k in WORKERS {
            let d = sign_distortion(sx, sn, k);
            let expected = k as f64 / 2.0 * (1.0 + PI / (PI - 2.0)).log2();
            let got = independent_rate(d, sx, sn, k);
            assert!(
                close(got, expected, 1e-12),
                "sx={sx} sn={sn} K={k}: R_in(D_sign) = {got}, expected {expected}"
            );
        }
    }
}

#[test]
fn sign_distortion_matches_the_formula() {
    let d = sign_distortion(2.0, 3.0, 4);
    assert!(close(d, (3.0 + (PI - 2.0) / PI * 5.0) / 4.0, 1e-15));
    assert!(sign_distortion(1.0, 1.0, 0).is_nan());
    assert!(sign_distortion(-1.0, 1.0, 3).is_nan());
}

/// Distortions from just above the floor to far above it.
fn distortions(sx: f64, sn: f64, k: usize) -> Vec<f64> {
    let floor = sn / k as f64;
    let base = if floor > 0.0 { floor } else { sx.max(1e-30) };
    [1.0 + 1e-9, 1.0 + 1e-3, 1.01, 1.5, 2.0, 10.0, 1e3, 1e8]
        .iter()
        .map(|f| base * f)
        .collect()
}

#[test]
fn sum_rate_never_exceeds_independent_rate() {
    for &(sx, sn) in VARIANCES {
        for &k in WORKERS {
            for d in distortions(sx, sn, k) {
                let (rs, ri) = (sum_rate(d, sx, sn, k), independent_rate(d, sx, sn, k));
                assert!(
                    rs.is_finite() && ri.is_finite(),
                    "sx={sx} sn={sn} K={k} D={d}"
                );
                assert!(
                    rs <= ri * (1.0 + 1e-12),
                    "sx={sx} sn={sn} K={k} D={d}: R_sum {rs} > R_in {ri}"
                );
                if sx > 0.0 && k > 1 {
                    assert!(rs < ri, "correlation must save bits: {rs} vs {ri}");
                }
                if k == 1 {
                    assert!(close(rs, ri, 1e-12), "one worker has nobody to share with");
                }
            }
        }
    }
}

#[test]
fn rates_fall_strictly_with_distortion_and_are_infinite_at_the_floor() {
    for &(sx, sn) in VARIANCES {
        for &k in WORKERS {
            let ds = distortions(sx, sn, k);
            for f in [sum_rate, independent_rate] {
                let r: Vec<f64> = ds.iter().map(|&d| f(d, sx, sn, k)).collect();
                for w in r.windows(2) {
                    assert!(w[1] < w[0], "sx={sx} sn={sn} K={k}: {r:?} not decreasing");
                }
                assert!(r[0] > 0.0);
                let floor = sn / k as f64;
                assert_eq!(f(floor, sx, sn, k), f64::INFINITY);
                assert_eq!(f(floor * 0.5, sx, sn, k), f64::INFINITY);
                assert_eq!(f(f64::INFINITY, sx, sn, k), 0.0);
            }
        }
    }
}

#[test]
fn sum_rate_matches_eq22_written_out() {
    // Eq. 22 with natural logs, as printed, converted to bits at the end.
    let (sx, sn, k, d) = (0.3f64, 0.8f64, 7usize, 0.2f64);
    let kf = k as f64;
    let nats = kf / 2.0 * (1.0 + sn / (kf * d - sn)).ln() + 0.5 * (1.0 + sx / d).ln();
    assert!(close(sum_rate(d, sx, sn, k), nats / LN_2, 1e-14));
    let nats_in =
        kf / 2.0 * (1.0 + sn / (kf * d - sn)).ln() + kf / 2.0 * (1.0 + sx / (kf * d)).ln();
    assert!(close(independent_rate(d, sx, sn, k), nats_in / LN_2, 1e-14));
}

#[test]
fn degenerate_and_invalid_arguments() {
    assert_eq!(sum_rate(0.0, 0.0, 0.0, 3), 0.0);
    assert_eq!(sum_rate(0.0, 1.0, 0.0, 3), f64::INFINITY);
    assert!(sum_rate(1.0, 1.0, 1.0, 0).is_nan());
    assert!(sum_rate(f64::NAN, 1.0, 1.0, 2).is_nan());
    assert!(sum_rate(-1.0, 1.0, 1.0, 2).is_nan());
    assert!(independent_rate(1.0, -1.0, 1.0, 2).is_nan());
    assert!(independent_rate(1.0, 1.0, f64::INFINITY, 2).is_nan());
}

#[test]
fn heterogeneous_solution_equals_closed_form_for_equal_workers() {
    for &(sx, sn) in VARIANCES {
        if sn == 0.0 {
            continue;
        }
        for &k in WORKERS {
            for d in distortions(sx, sn, k) {
                let h = heterogeneous_sum_rate(d, sx, &vec![sn; k]).unwrap();
                let closed = sum_rate(d, sx, sn, k);
                // Near the floor R(D) is ill-conditioned (dR/dD -> inf): the rounding of D
                // alone moves it by about 1e-16 / (D K / sigma_N^2 - 1) relative.
                let tol = if d * k as f64 / sn < 1.01 {
                    1e-6
                } else {
                    1e-10
                };
                assert!(
                    close(h.sum_rate, closed, tol),
                    "sx={sx} sn={sn} K={k} D={d}: water-filling {} vs eq. 22 {closed}",
                    h.sum_rate
                );
                let r0 = h.noise_rates[0];
                assert!(h.noise_rates.iter().all(|&r| close(r, r0, 1e-12)));
            }
            let below = heterogeneous_sum_rate(sn / k as f64, sx, &vec![sn; k]).unwrap();
            assert_eq!(below.sum_rate, f64::INFINITY);
        }
    }
}

/// Noise rates in nats satisfy the constraint of eq. 14.
fn constraint(rates_bits: &[f64], sn: &[f64]) -> f64 {
    rates_bits
        .iter()
        .zip(sn)
        .map(|(r, s)| (1.0 - (-2.0 * r * LN_2).exp()) / s)
        .sum()
}

#[test]
fn heterogeneous_solution_beats_every_feasible_grid_point() {
    let sn = [1.0, 2.0, 8.0];
    let sx = 3.0;
    for d in [0.7, 0.9, 1.5, 4.0] {
        let h = heterogeneous_sum_rate(d, sx, &sn).unwrap();
        assert!(
            close(constraint(&h.noise_rates, &sn), 1.0 / d, 1e-12),
            "solution off the constraint surface at D = {d}"
        );
        // Brute force: r1, r2 on a grid (nats), r3 from the constraint when feasible.
        // Each axis spans the rates its worker could have alone under the constraint.
        let span = |s: f64| {
            if s < d { -0.5 * (-s / d).ln_1p() } else { 8.0 }
        };
        let (step1, step2) = (span(sn[0]) / 1000.0, span(sn[1]) / 1000.0);
        let mut best = f64::INFINITY;
        let mut feasible = 0u32;
        for i in 0..=1000 {
            for j in 0..=1000 {
                let (r1, r2) = (i as f64 * step1, j as f64 * step2);
                let rest =
                    1.0 / d - (1.0 - (-2.0 * r1).exp()) / sn[0] - (1.0 - (-2.0 * r2).exp()) / sn[1];
                if rest < 0.0 || rest * sn[2] >= 1.0 {
                    continue;
                }
                let r3 = -0.5 * (-rest * sn[2]).ln_1p();
                feasible += 1;
                let total = (r1 + r2 + r3) / LN_2 + 0.5 * (sx / d).ln_1p() / LN_2;
                best = best.min(total);
            }
        }
        assert!(feasible > 1000, "grid too coarse at D = {d}");
        assert!(
            best >= h.sum_rate - 1e-9,
            "D = {d}: grid point with {best} bits beats water-filling {}",
            h.sum_rate
        );
        assert!(
            best <= h.sum_rate + 0.02,
            "D = {d}: grid never comes near the optimum ({best} vs {})",
            h.sum_rate
        );
    }
    // At D = 1.5 the water level leaves the noisiest worker dry.
    let h = heterogeneous_sum_rate(1.5, sx, &sn).unwrap();
    assert_eq!(h.noise_rates[2], 0.0);
    assert!(h.noise_rates[0] > h.noise_rates[1] && h.noise_rates[1] > 0.0);
    // Below the harmonic floor (sum 1/sn)^-1 = 1/1.625 every rate is infinite.
    let h = heterogeneous_sum_rate(1.0 / 1.625 * 0.999, sx, &sn).unwrap();
    assert_eq!(h.sum_rate, f64::INFINITY);
}

#[test]
fn heterogeneous_noiseless_worker_and_invalid_input() {
    let h = heterogeneous_sum_rate(0.5, 2.0, &[0.0, 1.0]).unwrap();
    assert_eq!(h.noise_rates, vec![0.0, 0.0]);
    assert!(close(h.sum_rate, 0.5 * (1.0f64 + 4.0).log2(), 1e-15));
    assert!(heterogeneous_sum_rate(0.5, 2.0, &[]).is_err());
    assert!(heterogeneous_sum_rate(0.5, 2.0, &[1.0, -1.0]).is_err());
    assert!(heterogeneous_sum_rate(f64::NAN, 2.0, &[1.0]).is_err());
}

fn layers() -> Vec<LayerModel> {
    let l = |n, sigma_x2, sigma_n2| LayerModel {
        n,
        sigma_x2,
        sigma_n2,
    };
    vec![
        l(1000, 1.0, 1.0),
        l(64, 100.0, 0.1),
        l(5000, 0.01, 2.0),
        l(0, 1.0, 1.0),    // empty
        l(10, 0.0, 0.0),   // all-zero gradients: costs nothing
        l(300, 0.5, 0.0),  // noiseless
        l(2000, 0.0, 0.3), // pure noise
    ]
}

fn total_bits(layers: &[LayerModel], k: usize, d: &[f64]) -> f64 {
    layers
        .iter()
        .zip(d)
        .filter(|(l, _)| l.n > 0)
        .map(|(l, &d)| l.n as f64 * sum_rate(d, l.sigma_x2, l.sigma_n2, k))
        .sum()
}

#[test]
fn multi_layer_allocation_meets_the_budget_and_beats_uniform() {
    let ls = layers();
    let k = 8;
    let n: usize = ls.iter().map(|l| l.n).sum();
    let floor: f64 = ls.iter().map(|l| l.n as f64 * l.sigma_n2 / k as f64).sum();
    for factor in [1.05, 2.0, 10.0, 1e4] {
        let budget = floor * factor;
        let a = allocate_distortion(&ls, k, budget).unwrap();
        assert!(
            a.squared_error <= budget && a.squared_error >= budget * (1.0 - 1e-9),
            "budget {budget}, spent {}",
            a.squared_error
        );
        let recomputed = total_bits(&ls, k, &a.distortion);
        assert!(close(a.total_bits, recomputed, 1e-12));
        assert_eq!(a.distortion[3], 0.0);
        assert_eq!(a.distortion[4], 0.0);

        // Uniform: the same per-coordinate distortion everywhere (infinite when some layer's
        // floor is above it, which the optimum must still beat).
        let uniform = total_bits(&ls, k, &vec![budget / n as f64; ls.len()]);
        assert!(
            a.total_bits < uniform,
            "factor {factor}: allocation {} bits, uniform {uniform}",
            a.total_bits
        );

        // Moving error between any two costly layers (keeping the budget) never helps.
        let active = [0usize, 1, 2, 5, 6];
        for &i in &active {
            for &j in &active {
                if i == j {
                    continue;
                }
                for frac in [1e-3, 1e-2, 0.2] {
                    let mut d = a.distortion.clone();
                    let moved = frac * d[i] * ls[i].n as f64;
                    d[i] -= moved / ls[i].n as f64;
                    d[j] += moved / ls[j].n as f64;
                    let other = total_bits(&ls, k, &d);
                    assert!(
                        other >= a.total_bits * (1.0 - 1e-12),
                        "moving {frac} of layer {i}'s error to {j} saves bits: {other} < {}",
                        a.total_bits
                    );
                }
            }
        }

        // Equal slopes (Corollary 1): numerical -dR/dD matches the reported slope.
        for &i in &active {
            let l = ls[i];
            let d = a.distortion[i];
            let h = d * 1e-6;
            let s = (sum_rate(d - h, l.sigma_x2, l.sigma_n2, k)
                - sum_rate(d + h, l.sigma_x2, l.sigma_n2, k))
                / (2.0 * h);
            assert!(
                close(s, a.slope, 1e-5),
                "layer {i}: slope {s} vs {}",
                a.slope
            );
        }
    }
}

#[test]
fn multi_layer_allocation_edge_cases() {
    let ls = layers();
    let k = 8;
    let floor: f64 = ls.iter().map(|l| l.n as f64 * l.sigma_n2 / k as f64).sum();
    let a = allocate_distortion(&ls, k, floor).unwrap();
    assert_eq!(a.total_bits, f64::INFINITY);
    assert!(a.squared_error <= floor * (1.0 + 1e-12));
    let a = allocate_distortion(&ls, k, f64::INFINITY).unwrap();
    assert_eq!(a.total_bits, 0.0);
    let free = [LayerModel {
        n: 5,
        sigma_x2: 0.0,
        sigma_n2: 0.0,
    }];
    let a = allocate_distortion(&free, k, 0.0).unwrap();
    assert_eq!((a.total_bits, a.distortion[0]), (0.0, 0.0));
    assert!(allocate_distortion(&ls, 0, 1.0).is_err());
    assert!(allocate_distortion(&ls, k, f64::NAN).is_err());
}

#[test]
fn iterations_bound_closes_the_convergence_gap_of_eq4() {
    let c = Convergence {
        a2: 4.0,
        beta: 3.0,
        eps: 0.01,
    };
    let mut prev = 0.0;
    for d in [0.0, 1e-4, 1e-2, 1.0, 100.0] {
        let t = iterations_bound(&c, d);
        // Theorem 1's bound A sqrt(2D/T) + beta A^2 / T equals epsilon at T.
        let gap = c.a2.sqrt() * (2.0 * d / t).sqrt() + c.beta * c.a2 / t;
        assert!(close(gap, c.eps, 1e-12), "D = {d}: gap {gap} at T = {t}");
        assert!(t > prev, "more distortion needs more iterations");
        prev = t;
    }
    // D = 0 leaves the deterministic rate beta A^2 / epsilon.
    assert!(close(iterations_bound(&c, 0.0), 3.0 * 4.0 / 0.01, 1e-12));
    assert!(iterations_bound(&Convergence { eps: 0.0, ..c }, 1.0).is_nan());

    let v = VarianceEstimate {
        sigma_x2: 0.5,
        sigma_n2: 2.0,
    };
    let (p, k, d) = (1000u64, 10usize, 0.5);
    let cost = rd::total_cost(&c, p, k, d, v);
    assert_eq!(cost.iterations, iterations_bound(&c, p as f64 * d).ceil());
    assert!(close(
        cost.bits_per_iteration,
        p as f64 * sum_rate(d, 0.5, 2.0, k),
        1e-15
    ));
    assert!(close(
        cost.total_bits,
        cost.iterations * cost.bits_per_iteration,
        1e-15
    ));
    let steps = vec![v; 3];
    assert!(close(
        rd::total_bits(p, k, d, &steps),
        3.0 * cost.bits_per_iteration,
        1e-15
    ));
}

/// Deterministic standard normals (SplitMix64 + Box-Muller).
struct Normal(u64);

impl Normal {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 + 0.5 / (1u64 << 53) as f64
    }
    fn sample(&mut self) -> f64 {
        (-2.0 * self.uniform().ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }
}

/// `K` workers' `y_k = x + n_k` with per-layer standard deviations.
fn gaussian_workers(layout: &Layout, k: usize, sd: &[(f64, f64)], seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Normal(seed);
    let mut x = vec![0.0f64; layout.n()];
    for (l, &(sx, _)) in sd.iter().enumerate() {
        for i in layout.layer(l) {
            x[i] = sx * rng.sample();
        }
    }
    (0..k)
        .map(|_| {
            let mut y = vec![0f32; layout.n()];
            for (l, &(_, sn)) in sd.iter().enumerate() {
                for i in layout.layer(l) {
                    y[i] = (x[i] + sn * rng.sample()) as f32;
                }
            }
            y
        })
        .collect()
}

#[test]
fn measured_sign_distortion_matches_section_vi_a() {
    // Pure noise (sigma_X = 0) makes the workers' quantisation errors independent, the
    // assumption behind D_sign.
    let layout = Layout::new(&[150_000, 50_000]).unwrap();
    let k = 4;
    let grads = gaussian_workers(&layout, k, &[(0.0, 1.0), (0.0, 0.01)], 7);
    let views: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
    let config = Config {
        mode: Mode::PerLayer,
        ..Config::sign()
    };
    let mut state = StepState::default();
    let m = rd::measure_step(
        &views,
        &layout,
        &config,
        Average::OverWorkers,
        &mut state,
        0,
    )
    .unwrap();
    assert_eq!(m.layers.len(), 2);
    for l in &m.layers {
        let expected = sign_distortion(l.sigma_x2, l.sigma_n2, k);
        assert!(
            close(l.d, expected, 0.02),
            "measured D {} vs D_sign {expected} (sigma_n2 {})",
            l.d,
            l.sigma_n2
        );
        assert!(close(l.rho, k as f64 * l.d / l.sigma_n2 - 1.0, 1e-12));
        assert!(close(l.d, l.sigma_n2 / k as f64 + l.d_c, 1e-15));
    }
    // Bits come from the wire format: per worker an 8-byte header, the group count, one f32
    // per layer and one bit per element, padded to a byte.
    let per_worker = 8 * (8 + 4 + 4 * 2) + (200_000u64).div_ceil(8) * 8;
    assert_eq!(m.bits, k as u64 * per_worker);
    assert!(close(
        m.bits_per_element,
        per_worker as f64 / 200_000.0,
        1e-15
    ));
    assert!(close(m.efficiency, m.r_sum_bits / m.bits as f64, 1e-15));
    assert!(m.efficiency > 0.0 && m.efficiency < 1.0);
    assert!(m.r_sum_p1_bits <= m.r_sum_bits && m.r_sum_bits <= m.r_in_bits);
}

#[test]
fn measure_step_sending_everything_adds_almost_no_distortion() {
    let layout = Layout::new(&[3000, 0, 1000]).unwrap();
    let k = 3;
    let grads = gaussian_workers(&layout, k, &[(1.0, 0.5), (0.0, 0.0), (0.1, 0.2)], 11);
    let views: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
    let mut state = StepState::default();
    let m = rd::measure_step(
        &views,
        &layout,
        &Config::topk(1.0),
        Average::OverWorkers,
        &mut state,
        0,
    )
    .unwrap();
    for l in m.layers.iter().filter(|l| l.n > 0) {
        // Only f32 rounding of the server's sum separates g_hat from ybar.
        assert!(l.d_c < 1e-12 * l.sigma_n2, "D_c = {}", l.d_c);
        assert!(l.rho < 1e-10 && l.r_sum > 20.0);
    }
    assert_eq!(m.layers[1], Default::default());
    // No residual is left, so the next step starts clean.
    let mut e = Vec::new();
    state.compressors_mut()[0].residual(&mut e).unwrap();
    assert!(e.iter().all(|&e| e == 0.0));
}

#[test]
fn measure_step_keeps_error_feedback_between_steps() {
    let layout = Layout::single(4000).unwrap();
    let k = 2;
    let config = Config::topk(0.01);
    let mut state = StepState::default();
    let mut last = None;
    for t in 0..3 {
        let grads = gaussian_workers(&layout, k, &[(1.0, 1.0)], 100 + t);
        let views: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        let m = rd::measure_step(
            &views,
            &layout,
            &config,
            Average::OverWorkers,
            &mut state,
            t,
        )
        .unwrap();
        last = Some((grads, m));
    }
    let mut e = Vec::new();
    state.compressors_mut()[1].residual(&mut e).unwrap();
    assert!(e.iter().any(|&e| e != 0.0));
    // The same step from a fresh state sends only this step's gradient: a different estimate.
    let (grads, m) = last.unwrap();
    let views: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
    let fresh = rd::measure_step(
        &views,
        &layout,
        &config,
        Average::OverWorkers,
        &mut StepState::default(),
        2,
    )
    .unwrap();
    assert_ne!(fresh.d_c, m.d_c);
    assert_eq!((fresh.bits > 0, fresh.sigma_n2), (true, m.sigma_n2));
    let one = [vec![0f32; 4000]];
    let views: Vec<&[f32]> = one.iter().map(|g| g.as_slice()).collect();
    assert!(
        rd::measure_step(
            &views,
            &layout,
            &config,
            Average::OverWorkers,
            &mut state,
            3
        )
        .is_err()
    );
}

/// Just above the floor `D = sigma_N^2 / K` the noise term `K/2 log2(K D / (K D - sigma_N^2))`
/// must keep full precision (it went through `ln_1p` of a value near -1 and was off by up to
/// 1.3e-3 bits at `D = sigma_N^2/K (1 + 1e-12)`). References by exact rational reasoning:
/// with `sigma_N^2 = K c` and `D = c d` for a power of two `c` and `d` in `(1, 2)`,
/// `K D - sigma_N^2 = K c (d - 1)`, and `d - 1` is exact in f64 (Sterbenz), so the noise term
/// is `K/2 log2(d / (d - 1))` with one rounding inside the log.
#[test]
fn noise_term_is_exact_just_above_the_floor() {
    let mut worst = 0.0f64;
    for k in [2usize, 3, 5, 7, 10, 100] {
        let kf = k as f64;
        for c in [1.0, 0.25, 2f64.powi(-30), 2f64.powi(40)] {
            let sn = kf * c;
            for eps in [1e-15, 1e-12, 1e-9, 1e-6, 1e-3, 0.1, 0.5, 0.9] {
                let d = 1.0 + eps;
                let dist = c * d;
                assert_eq!(dist / c, d, "c is a power of two");
                // sigma_X^2 = 0 isolates the noise term (the signal term is 0).
                let expected = 0.5 * kf * (d / (d - 1.0)).log2();
                let got = sum_rate(dist, 0.0, sn, k);
                let rel = ((got - expected) / expected).abs();
                worst = worst.max(rel);
                assert!(
                    rel <= 1e-14,
                    "K={k} c={c} D = floor (1 + {eps}): R = {got}, expected {expected} (rel {rel:e})"
                );
                // R_in has the same noise term.
                let got_in = independent_rate(dist, 0.0, sn, k);
                assert!(
                    close(got_in, expected, 1e-14),
                    "R_in {got_in} vs {expected}"
                );
                // And the signal term adds what it should on top.
                let sx = 3.0 * c;
                let signal = 0.5 * (sx / dist).ln_1p() / LN_2;
                assert!(close(sum_rate(dist, sx, sn, k), expected + signal, 1e-14));
            }
        }
    }
    // The floor itself is decided exactly: one ulp above it is finite, at it infinite.
    let (k, sn) = (3usize, 3.0);
    assert_eq!(sum_rate(1.0, 0.0, sn, k), f64::INFINITY);
    let up = f64::from_bits(1.0f64.to_bits() + 1);
    let r = sum_rate(up, 0.0, sn, k);
    assert!(
        r.is_finite() && close(r, 1.5 * (up / (up - 1.0)).log2(), 1e-14),
        "{r}"
    );
    assert!(worst <= 1e-14, "{worst}");
}

/// `allocate_counts`: P1's bits turned into element counts that keep the budget.
#[test]
fn allocate_counts_follows_p1_and_keeps_the_budget() {
    use gradsift::rd::allocate_counts;
    let layers = [
        LayerModel {
            n: 1000,
            sigma_x2: 1e-4,
            sigma_n2: 1e-2,
        },
        LayerModel {
            n: 0,
            sigma_x2: 0.0,
            sigma_n2: 0.0,
        },
        LayerModel {
            n: 1000,
            sigma_x2: 1e-8,
            sigma_n2: 1e-6,
        },
        LayerModel {
            n: 10,
            sigma_x2: 1e-3,
            sigma_n2: 1e-1,
        },
    ];
    let k = 5;
    let floor: f64 = layers
        .iter()
        .map(|l| l.n as f64 * l.sigma_n2 / k as f64)
        .sum();
    let budget = 3.0 * floor;
    let c = allocate_counts(&layers, k, budget, 40).unwrap();
    assert_eq!(c.iter().sum::<usize>(), 40);
    assert_eq!(c[1], 0);
    assert!(c[0] >= 1 && c[2] >= 1 && c[3] >= 1 && c[3] <= 10);
    // Shares follow n_l R_l of P1's optimum.
    let a = allocate_distortion(&layers, k, budget).unwrap();
    let bits0 = 1000.0 * a.rates[0];
    let bits2 = 1000.0 * a.rates[2];
    assert_eq!(c[0] > c[2], bits0 > bits2, "{c:?} {:?}", a.rates);
    // At or below the floor the rates are infinite: the split is uniform (by n_l).
    let c = allocate_counts(&layers, k, floor, 201).unwrap();
    assert_eq!(c.iter().sum::<usize>(), 201);
    assert!((c[0] as i64 - c[2] as i64).abs() <= 1, "{c:?}");
    // More than there is: every element; fewer than the layers: what there is.
    assert_eq!(
        allocate_counts(&layers, k, budget, 10_000).unwrap(),
        [1000, 0, 1000, 10]
    );
    assert_eq!(
        allocate_counts(&layers, k, budget, 2)
            .unwrap()
            .iter()
            .sum::<usize>(),
        2
    );
    // The same arguments, the same counts.
    assert_eq!(
        allocate_counts(&layers, k, budget, 40).unwrap(),
        allocate_counts(&layers, k, budget, 40).unwrap()
    );
    assert!(allocate_counts(&layers, 0, budget, 40).is_err());
    assert!(allocate_counts(&layers, k, f64::NAN, 40).is_err());
}
