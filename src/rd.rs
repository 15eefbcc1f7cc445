//! Rate-distortion bounds of model aggregation (SPEC §9) and the measured rate and distortion
//! of a real compressor on real gradients.
//!
//! The model is the seed paper's Section III (Zhang, Tao, Wang, Xu, *Fundamental Limits of
//! Communication Efficiency for Model Aggregation in Distributed Learning: A Rate-Distortion
//! Approach*): `K` workers observe `Y_k = X + N_k` per coordinate, with the global gradient
//! `X ~ N(0, sigma_X^2)` and independent noises `N_k ~ N(0, sigma_N^2)`; the server wants an
//! **unbiased** estimate `X_hat` of `X`, and the distortion `D = E (X - X_hat)^2` is its
//! variance per coordinate.
//!
//! Conventions, everywhere in this module:
//! - **Rates are bits per coordinate** (log base 2). The paper writes natural logarithms;
//!   every formula is of the form `1/2 log(.)`, so the change of base is the factor
//!   `1 / ln 2` throughout.
//! - A **sum-rate** is summed over the `K` workers: `R_sum(D)` bits per coordinate is what all
//!   `K` workers together must send for each coordinate of the gradient. Compare it with
//!   `K x` (bits per element per worker), never with one worker's bits.
//! - **Distortion** `D` is per coordinate, in squared gradient units. No unbiased estimator
//!   has `D <= sigma_N^2 / K` (the variance of the centralised mean of `K` exact
//!   gradients), so every rate is `+inf` there: the bounds are finite only on
//!   `D > sigma_N^2 / K`.
//! - Invalid arguments (a NaN, a negative variance or distortion, `K = 0`) give `NaN` from the
//!   scalar functions and an [`Error::InvalidConfig`] from the others; nothing panics.

use crate::{
    Aggregate, Aggregator, Average, Compress, Compressor, Config, Device, Element, Error, Layout,
    Payload, Result, SparsePayload, Statistics, Stats, VarianceEstimate, wire,
};
use std::f64::consts::{LN_2, PI};

fn valid_variances(sigma_x2: f64, sigma_n2: f64) -> bool {
    sigma_x2 >= 0.0 && sigma_n2 >= 0.0 && sigma_x2.is_finite() && sigma_n2.is_finite()
}

/// `K/2 log2(1 + sigma_N^2 / (K D - sigma_N^2)) = K/2 log2(K D / (K D - sigma_N^2))`, computed
/// so that it keeps full precision on the whole domain:
/// - far from the floor (`sigma_N^2 < K D / 2`) as `-K/2 log2(1 - sigma_N^2 / (K D))`, where
///   `ln_1p` gets an argument in `(-1/2, 0]` and is well conditioned;
/// - near the floor as `K/2 log2(K D / (K D - sigma_N^2))`, with the difference
///   `K D - sigma_N^2` taken by one fused multiply-add (exact up to its one final rounding),
///   so the log gets its argument to a few ulps. Going through `ln_1p` of a value near `-1`
///   there lost most digits (1.3e-3 bits off at `D = sigma_N^2 / K (1 + 1e-12)`).
///
/// `+inf` at or below the floor ([`at_floor`]).
fn noise_bits(d: f64, sigma_n2: f64, k: f64) -> f64 {
    if sigma_n2 == 0.0 {
        return 0.0;
    }
    if at_floor(d, sigma_n2, k) {
        return f64::INFINITY;
    }
    let gap = k.mul_add(d, -sigma_n2);
    let kd = k * d;
    if sigma_n2 < 0.5 * kd {
        -0.5 * k * (-sigma_n2 / kd).ln_1p() / LN_2
    } else {
        0.5 * k * (kd / gap).ln() / LN_2
    }
}

/// `D <= sigma_N^2 / K` as f64 arithmetic sees it: `K D <= sigma_N^2` in the rounded
/// product, or `D <= sigma_N^2 / K` in the rounded quotient (so `D = sigma_N^2 / K` written
/// either way is the floor, where every rate is `+inf`), or `K D - sigma_N^2 <= 0` exactly.
/// Above all three, `K D - sigma_N^2` is positive and the rates are finite (large within a
/// few ulps of the floor, as they should be).
fn at_floor(d: f64, sigma_n2: f64, k: f64) -> bool {
    k * d <= sigma_n2 || d <= sigma_n2 / k || k.mul_add(d, -sigma_n2) <= 0.0
}

/// Shared domain handling of [`sum_rate`] and [`independent_rate`]: `None` when the
/// arguments are valid and `D` lies in the finite domain, else the value to return.
fn domain(d: f64, sigma_x2: f64, sigma_n2: f64, k: usize) -> Option<f64> {
    if k == 0 || d.is_nan() || d < 0.0 || !valid_variances(sigma_x2, sigma_n2) {
        return Some(f64::NAN);
    }
    if sigma_x2 == 0.0 && sigma_n2 == 0.0 {
        // Every worker holds the constant 0: the zero estimator is exact and unbiased.
        return Some(0.0);
    }
    if at_floor(d, sigma_n2, k as f64) {
        return Some(f64::INFINITY);
    }
    None
}

/// Sum-rate-distortion function of homogeneous workers (eq. 22, Corollary 2):
///
/// `R_sum(D) = K/2 log2(1 + sigma_N^2 / (K D - sigma_N^2)) + 1/2 log2(1 + sigma_X^2 / D)`
///
/// in **bits per coordinate, summed over the `K` workers** (the least that any scheme,
/// including distributed source coding that exploits the correlation between workers, can
/// send for an unbiased estimate with variance `D` per coordinate).
///
/// Domain: `+inf` for `D <= sigma_N^2 / K`; `0` at `D = +inf`; `0` for every `D >= 0` when
/// both variances are 0. `NaN` for `K = 0`, a negative or NaN argument, or an infinite variance.
pub fn sum_rate(d: f64, sigma_x2: f64, sigma_n2: f64, k: usize) -> f64 {
    if let Some(v) = domain(d, sigma_x2, sigma_n2, k) {
        return v;
    }
    noise_bits(d, sigma_n2, k as f64) + 0.5 * (sigma_x2 / d).ln_1p() / LN_2
}

/// Sum-rate without distributed source coding (Remark 4): each worker quantises its own
/// gradient independently,
///
/// `R_in(D) = K/2 log2(1 + sigma_N^2 / (K D - sigma_N^2)) + K/2 log2(1 + sigma_X^2 / (K D))`
///
/// in bits per coordinate summed over the `K` workers. `R_in(D) >= R_sum(D)`; the difference
/// is what exploiting the correlation between workers can save. Same domain as [`sum_rate`].
pub fn independent_rate(d: f64, sigma_x2: f64, sigma_n2: f64, k: usize) -> f64 {
    if let Some(v) = domain(d, sigma_x2, sigma_n2, k) {
        return v;
    }
    let kf = k as f64;
    noise_bits(d, sigma_n2, kf) + 0.5 * kf * (sigma_x2 / (kf * d)).ln_1p() / LN_2
}

/// Distortion of scaled sign (signSGD with the quantiser `+-sqrt(2/pi) sigma`, Section VI-A),
/// per coordinate:
///
/// `D_sign = (sigma_N^2 + (pi - 2)/pi (sigma_N^2 + sigma_X^2)) / K`
///
/// Each worker's 1-bit quantiser of its `N(0, sigma_X^2 + sigma_N^2)` gradient adds
/// `(pi - 2)/pi` of that variance; the server's mean divides the sum of `K` independent
/// errors by `K`. `R_in(D_sign) = K/2 log2(1 + pi/(pi - 2))` whatever the variances (Fig. 7's
/// "ideal quantization" line). `NaN` for `K = 0` or invalid variances.
pub fn sign_distortion(sigma_x2: f64, sigma_n2: f64, k: usize) -> f64 {
    if k == 0 || !valid_variances(sigma_x2, sigma_n2) {
        return f64::NAN;
    }
    (sigma_n2 + (PI - 2.0) / PI * (sigma_n2 + sigma_x2)) / k as f64
}

/// Optimal rates of heterogeneous workers at one distortion (Theorem 2).
#[derive(Debug, Clone, PartialEq)]
pub struct HeterogeneousRate {
    /// `r_k`, worker `k`'s rate for quantising its gradient noise, bits per coordinate.
    /// `+inf` for every worker when `D` is below the domain.
    pub noise_rates: Vec<f64>,
    /// `1/2 log2(1 + sigma_X^2 / D)`, the rate of the common part, bits per coordinate.
    pub signal_rate: f64,
    /// `sum_k r_k + 1/2 log2(1 + sigma_X^2 / D)`: the minimum sum-rate over the `K` workers,
    /// bits per coordinate.
    pub sum_rate: f64,
    /// The Lagrange multiplier of the reverse water-filling
    /// `r_k = max(0, 1/2 ln(2 lambda / sigma_Nk^2))` (in nats there), in squared gradient
    /// units. `+inf` below the domain; `0` when some worker is noiseless.
    pub lambda: f64,
}

/// Relative width of the bisection bracket at which [`heterogeneous_sum_rate`] stops.
pub const WATER_LEVEL_TOLERANCE: f64 = 1e-15;

/// Minimum sum-rate of `K` heterogeneous workers with noise variances `sigma_n2[k]` (Theorem 2,
/// eq. 13-14): minimise `sum_k r_k` subject to `sum_k (1 - exp(-2 r_k)) / sigma_Nk^2 = 1/D`,
/// `r_k >= 0` (nats), then `R_sum = sum_k r_k + 1/2 ln(1 + sigma_X^2 / D)`; everything is
/// returned in bits per coordinate.
///
/// The optimum is a reverse water-filling, `r_k = max(0, 1/2 ln(2 lambda / sigma_Nk^2))`.
/// With the water level `w = 1/(2 lambda)` the constraint reads
/// `g(w) = sum_k max(0, 1/sigma_Nk^2 - w) = 1/D`, and `g` falls from `sum_k 1/sigma_Nk^2` at
/// `w = 0` to 0 at `w = max_k 1/sigma_Nk^2`; `w` is found by bisection in f64 on that
/// bracket until its width is at most [`WATER_LEVEL_TOLERANCE`] times its upper end (at
/// most 2200 halvings, enough for any f64 level). That fixes which workers are active
/// (`r_k > 0`); their depths `1/sigma_Nk^2 - w` are then solved from the constraint in closed
/// form, so each `r_k = -1/2 ln(1 - sigma_Nk^2 depth_k)` is accurate to a few ulps except
/// where the problem itself is ill-conditioned (`D` within a factor `1 + delta` of the floor,
/// where rounding `D` alone moves `R_sum` by about `1e-16 / delta` relative).
///
/// Domain: finite for `D > (sum_k 1/sigma_Nk^2)^-1` (the variance of the best linear
/// combination of exact gradients); below it every rate is `+inf`. With equal variances this
/// is eq. 22 (`D > sigma_N^2 / K`). A worker with `sigma_Nk^2 = 0` observes `X` itself: all
/// noise rates are then 0 (the limit `sigma_Nk^2 -> 0`) and only the signal rate remains.
///
/// Errors on an empty slice, a negative or non-finite variance, or a NaN or negative `D`.
pub fn heterogeneous_sum_rate(
    d: f64,
    sigma_x2: f64,
    sigma_n2: &[f64],
) -> Result<HeterogeneousRate> {
    if sigma_n2.is_empty() {
        return Err(Error::InvalidConfig(
            "heterogeneous sum-rate needs K >= 1 workers".into(),
        ));
    }
    if d.is_nan() || d < 0.0 || !valid_variances(sigma_x2, 0.0) {
        return Err(Error::InvalidConfig(format!(
            "heterogeneous sum-rate needs D >= 0 and a finite sigma_X^2 >= 0, got D = {d}, sigma_X^2 = {sigma_x2}"
        )));
    }
    if let Some(s) = sigma_n2.iter().find(|s| !valid_variances(0.0, **s)) {
        return Err(Error::InvalidConfig(format!(
            "noise variances must be finite and >= 0, got {s}"
        )));
    }
    let k = sigma_n2.len();
    let signal = if sigma_x2 == 0.0 {
        0.0
    } else {
        0.5 * (sigma_x2 / d).ln_1p() / LN_2
    };
    if sigma_n2.contains(&0.0) {
        return Ok(HeterogeneousRate {
            noise_rates: vec![0.0; k],
            signal_rate: signal,
            sum_rate: signal,
            lambda: 0.0,
        });
    }
    let target = 1.0 / d;
    let inv: Vec<f64> = sigma_n2.iter().map(|s| 1.0 / s).collect();
    let capacity: f64 = inv.iter().sum();
    // Within the rounding of the sum (a few ulps per term) of the floor, feasibility cannot
    // be told apart; report the floor's value rather than a huge finite rate.
    if target >= capacity * (1.0 - 4.0 * k as f64 * f64::EPSILON) {
        return Ok(HeterogeneousRate {
            noise_rates: vec![f64::INFINITY; k],
            signal_rate: signal,
            sum_rate: f64::INFINITY,
            lambda: f64::INFINITY,
        });
    }
    let g = |w: f64| inv.iter().map(|&i| (i - w).max(0.0)).sum::<f64>();
    let (mut lo, mut hi) = (0.0f64, inv.iter().cloned().fold(0.0, f64::max));
    if target > 0.0 {
        for _ in 0..2200 {
            if hi - lo <= WATER_LEVEL_TOLERANCE * hi {
                break;
            }
            let mid = 0.5 * (lo + hi);
            if g(mid) > target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    let w = 0.5 * (lo + hi);
    // Bisection fixes the active set; the depths 1/sigma_Nk^2 - w then come from the
    // constraint in closed form. Written as differences of the 1/sigma_Nk^2 (exact for equal
    // workers), they stay accurate when they are tiny against the level (large D, small
    // rates), where `ln(w sigma_Nk^2)` would lose every digit.
    let active: Vec<usize> = (0..k).filter(|&i| inv[i] > w).collect();
    let depth = |i: usize| {
        let spread: f64 = active.iter().map(|&j| inv[i] - inv[j]).sum();
        ((target + spread) / active.len() as f64).max(0.0)
    };
    let mut noise_rates = vec![0.0; k];
    for &i in &active {
        noise_rates[i] = (-0.5 * (-sigma_n2[i] * depth(i)).ln_1p()).max(0.0) / LN_2;
    }
    let level = active.first().map_or(w, |&i| inv[i] - depth(i));
    let sum_rate = noise_rates.iter().sum::<f64>() + signal;
    Ok(HeterogeneousRate {
        noise_rates,
        signal_rate: signal,
        sum_rate,
        lambda: 0.5 / level,
    })
}

/// One layer of the multi-layer model (Corollary 1): its size and its two variances.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct LayerModel {
    /// Number of coordinates `n_l`.
    pub n: usize,
    /// Global-gradient variance `sigma_Xl^2`.
    pub sigma_x2: f64,
    /// Gradient-noise variance `sigma_Nl^2` (the same at every worker).
    pub sigma_n2: f64,
}

impl LayerModel {
    /// A layer of `n` coordinates with the estimated variances `v`.
    pub fn new(n: usize, v: VarianceEstimate) -> Self {
        Self {
            n,
            sigma_x2: v.sigma_x2,
            sigma_n2: v.sigma_n2,
        }
    }

    /// A layer that costs nothing at any distortion: empty, or both variances 0.
    fn is_free(&self) -> bool {
        self.n == 0 || (self.sigma_x2 == 0.0 && self.sigma_n2 == 0.0)
    }
}

/// `-dR_sum/dD` of one layer in bits per coordinate per unit of distortion:
/// `(sigma_N^2 / (D (D - sigma_N^2/K)) + sigma_X^2 / (D (D + sigma_X^2))) / (2 ln 2)`.
/// Strictly decreasing on `D > sigma_N^2/K`, from `+inf` to 0.
fn slope(l: &LayerModel, k: f64, d: f64) -> f64 {
    let floor = l.sigma_n2 / k;
    let noise = if l.sigma_n2 == 0.0 {
        0.0
    } else {
        l.sigma_n2 / (d * (d - floor))
    };
    let signal = if l.sigma_x2 == 0.0 {
        0.0
    } else {
        l.sigma_x2 / (d * (d + l.sigma_x2))
    };
    (noise + signal) / (2.0 * LN_2)
}

/// The distortion at which layer `l`'s slope equals `mu`, by bisection to relative 1e-15.
fn distortion_at_slope(l: &LayerModel, k: f64, mu: f64) -> f64 {
    let lo0 = l.sigma_n2 / k;
    let mut hi = 2.0 * lo0.max(l.sigma_x2).max(f64::MIN_POSITIVE);
    for _ in 0..2200 {
        if slope(l, k, hi) <= mu || hi.is_infinite() {
            break;
        }
        hi *= 2.0;
    }
    let mut lo = lo0;
    for _ in 0..2200 {
        if hi - lo <= 1e-15 * hi {
            break;
        }
        let mid = 0.5 * (lo + hi);
        if slope(l, k, mid) > mu {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// A distortion allocation across layers (Corollary 1, problem P1).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Allocation {
    /// `D_l`, per-coordinate distortion of each layer. 0 for layers that cost nothing
    /// (empty, or both variances 0).
    pub distortion: Vec<f64>,
    /// `R_sum,l(D_l)`, bits per coordinate summed over the `K` workers.
    pub rates: Vec<f64>,
    /// `sum_l n_l R_sum,l(D_l)`: bits for the whole gradient, all `K` workers together.
    /// `+inf` when the budget is at or below the floor.
    pub total_bits: f64,
    /// `sum_l n_l D_l`, at most the budget.
    pub squared_error: f64,
    /// The common slope `-dR_l/dD_l` of the layers that cost something, bits per coordinate
    /// per unit of distortion (`+inf` below the floor, 0 for an infinite budget).
    pub slope: f64,
}

/// Splits a total squared-error budget `E = sum_l n_l D_l` across layers so that the total
/// bits `sum_l n_l R_sum,l(D_l)` (eq. 22 per layer, `K` homogeneous workers) are least:
/// problem P1 of Corollary 1 with equal worker weights.
///
/// Each `R_sum,l` is convex and decreasing on `D_l > sigma_Nl^2 / K`, so the optimum
/// equalises the slopes `R_l'(D_l) = -mu` across layers. For a given `mu` each `D_l(mu)` is
/// found by bisection (relative 1e-15), and `mu` by bisection on `ln mu` until
/// `E(mu) = sum_l n_l D_l(mu)` brackets the budget within relative 1e-13; the returned
/// allocation is the side of the bracket that meets the budget (`squared_error <= E`).
///
/// Edge cases: empty layers and layers with both variances 0 cost nothing at `D_l = 0` and
/// take no budget; a layer with `sigma_N^2 = 0` has its floor at 0. When
/// `E <= sum_l n_l sigma_Nl^2 / K` (the floor) no unbiased estimator meets the budget: the
/// result has `total_bits = +inf` and each `D_l` is its floor scaled down to fit the
/// budget. `E = +inf` gives `D_l = +inf` and 0 bits.
///
/// Errors on `K = 0`, a NaN or negative budget, or invalid variances.
pub fn allocate_distortion(layers: &[LayerModel], k: usize, budget: f64) -> Result<Allocation> {
    if k == 0 || budget.is_nan() || budget < 0.0 {
        return Err(Error::InvalidConfig(format!(
            "allocation needs K >= 1 and a budget >= 0, got K = {k}, E = {budget}"
        )));
    }
    if let Some(l) = layers
        .iter()
        .find(|l| !valid_variances(l.sigma_x2, l.sigma_n2))
    {
        return Err(Error::InvalidConfig(format!(
            "layer variances must be finite and >= 0, got {l:?}"
        )));
    }
    let kf = k as f64;
    let active: Vec<usize> = (0..layers.len())
        .filter(|&i| !layers[i].is_free())
        .collect();
    let mut distortion = vec![0.0; layers.len()];
    let mut rates = vec![0.0; layers.len()];
    // Folds from +0.0 rather than `sum` (whose empty value is -0.0): no layer, no bits.
    let floor: f64 = active.iter().fold(0.0, |a, &i| {
        a + layers[i].n as f64 * layers[i].sigma_n2 / kf
    });
    let finish = |distortion: Vec<f64>, rates: Vec<f64>, slope: f64| {
        let total_bits = active
            .iter()
            .fold(0.0, |a, &i| a + layers[i].n as f64 * rates[i]);
        let squared_error = active
            .iter()
            .fold(0.0, |a, &i| a + layers[i].n as f64 * distortion[i]);
        Allocation {
            distortion,
            rates,
            total_bits,
            squared_error,
            slope,
        }
    };
    if active.is_empty() {
        return Ok(finish(distortion, rates, 0.0));
    }
    if budget <= floor {
        let scale = if floor > 0.0 { budget / floor } else { 0.0 };
        for &i in &active {
            distortion[i] = layers[i].sigma_n2 / kf * scale;
            rates[i] = f64::INFINITY;
        }
        return Ok(finish(distortion, rates, f64::INFINITY));
    }
    if budget.is_infinite() {
        for &i in &active {
            distortion[i] = f64::INFINITY;
        }
        return Ok(finish(distortion, rates, 0.0));
    }
    let spent = |mu: f64, out: &mut Vec<f64>| -> f64 {
        let mut e = 0.0;
        for &i in &active {
            out[i] = distortion_at_slope(&layers[i], kf, mu);
            e += layers[i].n as f64 * out[i];
        }
        e
    };
    let mut scratch = vec![0.0; layers.len()];
    // Bracket mu: a larger slope means smaller distortions and less error spent.
    let (mut lo, mut hi) = (1.0f64, 1.0f64);
    while spent(lo, &mut scratch) < budget && lo > 1e-300 {
        lo *= 1e-4;
    }
    while spent(hi, &mut scratch) > budget && hi < 1e300 {
        hi *= 1e4;
    }
    for _ in 0..400 {
        if hi / lo - 1.0 <= 1e-13 {
            break;
        }
        let mid = (lo.ln() + 0.5 * (hi.ln() - lo.ln())).exp();
        if mid <= lo || mid >= hi {
            break;
        }
        if spent(mid, &mut scratch) > budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    spent(hi, &mut distortion);
    for &i in &active {
        let l = &layers[i];
        rates[i] = sum_rate(distortion[i], l.sigma_x2, l.sigma_n2, k);
    }
    Ok(finish(distortion, rates, hi))
}

/// Splits a budget of `total` sent elements per worker across layers the way problem P1
/// splits bits: solve [`allocate_distortion`] for the squared-error budget `budget`
/// (`sum_l n_l D_l`, e.g. what the compressor reached on the last step), then give each layer
/// a share of `total` proportional to its optimal bits `n_l R_sum,l(D_l)` (every sent element
/// costs the same wire bits, so element counts follow bits).
///
/// Every non-empty layer gets at least one element when `total` allows (a layer that sends
/// nothing would never be updated), no layer more than `n_l`, and the counts add up to
/// `min(total, n)`. Shares are rounded by largest remainder, ties to the lower layer; the
/// result is a deterministic function of the arguments. When the bits are not usable (the
/// budget at or below the floor `sum_l n_l sigma_Nl^2 / K`, where every rate is infinite, or
/// every layer free), the shares are proportional to `n_l` (the uniform per-layer split).
///
/// # Errors
///
/// Those of [`allocate_distortion`] (`K = 0`, a NaN or negative budget, invalid variances).
///
/// # Examples
///
/// ```
/// use gradsift::rd::{LayerModel, allocate_counts};
/// let layers = [
///     LayerModel { n: 1000, sigma_x2: 1e-4, sigma_n2: 1e-2 },
///     LayerModel { n: 1000, sigma_x2: 1e-8, sigma_n2: 1e-6 },
/// ];
/// let k = allocate_counts(&layers, 5, 1000.0 * (2e-3 + 2e-7), 20)?;
/// assert_eq!(k.iter().sum::<usize>(), 20);
/// # Ok::<(), gradsift::Error>(())
/// ```
pub fn allocate_counts(
    layers: &[LayerModel],
    k: usize,
    budget: f64,
    total: usize,
) -> Result<Vec<usize>> {
    let alloc = allocate_distortion(layers, k, budget)?;
    let mut weights: Vec<f64> = layers
        .iter()
        .zip(&alloc.rates)
        .map(|(l, &r)| if l.n == 0 { 0.0 } else { l.n as f64 * r })
        .collect();
    if !weights.iter().all(|w| w.is_finite()) || weights.iter().all(|&w| w <= 0.0) {
        weights = layers.iter().map(|l| l.n as f64).collect();
    }
    Ok(split_counts(layers, &weights, total))
}

/// `min(total, n)` elements over the layers in proportion to `weights`, at least one per
/// non-empty layer when possible, at most `n_l`; largest remainder, ties to the lower layer.
fn split_counts(layers: &[LayerModel], weights: &[f64], total: usize) -> Vec<usize> {
    let cap: Vec<usize> = layers.iter().map(|l| l.n).collect();
    let n: usize = cap.iter().sum();
    let mut left = total.min(n);
    let mut out = vec![0usize; layers.len()];
    let nonempty = cap.iter().filter(|&&c| c > 0).count();
    if left >= nonempty {
        for (o, &c) in out.iter_mut().zip(&cap) {
            if c > 0 {
                *o = 1;
                left -= 1;
            }
        }
    }
    while left > 0 {
        let open: Vec<usize> = (0..out.len()).filter(|&i| out[i] < cap[i]).collect();
        let wsum: f64 = open.iter().map(|&i| weights[i].max(0.0)).sum();
        // Layers with weight 0 take elements only once the weighted ones are full.
        let share = |i: usize| -> f64 {
            if wsum > 0.0 {
                left as f64 * weights[i].max(0.0) / wsum
            } else {
                left as f64 * cap[i] as f64 / open.iter().map(|&j| cap[j] as f64).sum::<f64>()
            }
        };
        let mut given = 0;
        let mut rema: Vec<(f64, usize)> = Vec::with_capacity(open.len());
        for &i in &open {
            let a = share(i);
            let take = (a.floor() as usize).min(cap[i] - out[i]);
            out[i] += take;
            given += take;
            if out[i] < cap[i] {
                rema.push((a - a.floor(), i));
            }
        }
        left -= given;
        if given == 0 {
            // Every share is below one: hand out single elements by largest remainder.
            rema.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for &(_, i) in rema.iter().take(left) {
                out[i] += 1;
                left -= 1;
            }
        }
    }
    out
}

/// The constants of the convergence bound (Theorem 1, Corollary 3) for a convex,
/// `beta`-smooth loss on a convex set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Convergence {
    /// `A^2 = sup_{w in omega} ||w - w(0)||^2`: squared radius of the feasible parameter set
    /// around the initial point, in squared parameter units.
    pub a2: f64,
    /// `beta`: smoothness of the loss (Lipschitz constant of its gradient), loss units per
    /// squared parameter unit.
    pub beta: f64,
    /// `epsilon > 0`: the target gap `E[F(mean_t w(t))] - min F`, in loss units.
    pub eps: f64,
}

/// Least number of iterations `T` that guarantees the gap `epsilon` (Corollary 3, eq. 23):
///
/// `T >= A^2 (sqrt(D/(2 eps^2) + beta/eps) + sqrt(D/(2 eps^2)))^2`
///
/// where `D` is Theorem 1's variance bound of the **whole** gradient estimate,
/// `E ||g_hat(t) - g(t)||^2` over all `P` coordinates (squared gradient units), and the step
/// size is `gamma / (beta + 1)` with `gamma = A sqrt(2/(D T))`. At this `T` the bound of
/// eq. 4, `A sqrt(2D/T) + beta A^2/T`, equals `epsilon`. Returns the real-valued bound (round
/// up for a count); `NaN` for a negative or NaN argument or `epsilon <= 0`.
pub fn iterations_bound(c: &Convergence, d: f64) -> f64 {
    let args = [c.a2, c.beta, d];
    if args.iter().any(|x| x.is_nan() || *x < 0.0) || c.eps.is_nan() || c.eps <= 0.0 {
        return f64::NAN;
    }
    let q = d / (2.0 * c.eps * c.eps);
    let root = (q + c.beta / c.eps).sqrt() + q.sqrt();
    c.a2 * root * root
}

/// Total bits of a training run, `sum_t P R_sum(D; sigma_X^2(t), sigma_N^2(t))` (eq. 24 summed
/// over iterations): `P` coordinates, `K` workers, per-coordinate distortion `d` at every
/// step, one [`VarianceEstimate`] per iteration (of a single-layer model, or the
/// size-weighted means of a multi-layer one). `+inf` if any step's `D` is below its floor.
pub fn total_bits(p: u64, k: usize, d: f64, per_step: &[VarianceEstimate]) -> f64 {
    per_step.iter().fold(0.0, |a, v| {
        a + p as f64 * sum_rate(d, v.sigma_x2, v.sigma_n2, k)
    })
}

/// Total communication of a run to the gap `epsilon` with static statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TotalCost {
    /// `T`, eq. 23 rounded up.
    pub iterations: f64,
    /// `P R_sum(D)`: bits of one iteration, all `K` workers together.
    pub bits_per_iteration: f64,
    /// `T P R_sum(D)`.
    pub total_bits: f64,
}

/// Corollary 3 end to end for a `P`-coordinate model with static per-coordinate statistics
/// `v`, `K` workers and per-coordinate distortion `d`: `T` from eq. 23 and `T P R_sum(d)`.
///
/// Units: the paper writes one symbol `D` in eq. 23 (Theorem 1's variance of the whole
/// `P`-dimensional estimate) and in eq. 24 (the per-coordinate distortion of eq. 11). Under
/// its model the first is `P` times the second, so this function passes `P d` to
/// [`iterations_bound`] and `d` to [`sum_rate`]. To reproduce the paper's formula with one
/// number for both, call the two functions yourself.
pub fn total_cost(c: &Convergence, p: u64, k: usize, d: f64, v: VarianceEstimate) -> TotalCost {
    let iterations = iterations_bound(c, p as f64 * d).ceil();
    let bits_per_iteration = p as f64 * sum_rate(d, v.sigma_x2, v.sigma_n2, k);
    TotalCost {
        iterations,
        bits_per_iteration,
        total_bits: iterations * bits_per_iteration,
    }
}

/// Measured figures of one layer for one step of a real compressor.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct LayerMeasurement {
    /// Coordinates `n_l`.
    pub n: usize,
    /// Estimated `sigma_Xl^2` (SPEC §8) of this step's gradients.
    pub sigma_x2: f64,
    /// Estimated `sigma_Nl^2` of this step's gradients.
    pub sigma_n2: f64,
    /// Compression-added distortion `D_c = ||g_hat - ybar||^2 / n_l`: the server's aggregate
    /// against the mean of the exact gradients, per coordinate (0 for an empty layer).
    pub d_c: f64,
    /// Total distortion `D = sigma_Nl^2 / K + D_c` per coordinate: the centralised mean's
    /// variance plus what compression added (taken as independent of the noise).
    pub d: f64,
    /// `rho = D K / sigma_N^2 - 1 = K D_c / sigma_N^2` (Fig. 8): compression noise against
    /// gradient noise. `+inf` when `sigma_N^2 = 0 < D`, 0 when both are 0.
    pub rho: f64,
    /// `R_sum(D)`, bits per coordinate summed over the `K` workers.
    pub r_sum: f64,
    /// `R_in(D)`, bits per coordinate summed over the `K` workers.
    pub r_in: f64,
}

/// Measured figures of one step of a real compressor on `K` workers' gradients.
///
/// Rates compare like with like: [`StepMeasurement::bits`] is what all `K` workers sent for
/// the whole gradient, and [`StepMeasurement::r_sum_bits`] is the least that all `K` workers
/// together could send for the whole gradient at the measured per-layer distortions, so
/// `efficiency = r_sum_bits / bits` (1 would be optimal; the bound assumes Gaussian data and
/// an unbiased estimate, so biased compressors such as top-k can exceed 1 in principle).
///
/// Empty inputs: an empty layer (`n_l = 0`) reports `sigma_X^2 = sigma_N^2 = D = D_c = rho = 0`
/// and zero rates, and counts in no size-weighted mean; a step with `n = 0` reports `+0.0`
/// (never `-0.0`) for every per-coordinate figure, `bits_per_element` and
/// [`StepMeasurement::sent_per_coordinate`] included (only `bits`, the payload headers, is
/// non-zero).
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct StepMeasurement {
    /// The training step `t`.
    pub step: u64,
    /// Workers `K`.
    pub workers: usize,
    /// Coordinates `n` of the gradient.
    pub n: usize,
    /// Per-layer figures, in layout order.
    pub layers: Vec<LayerMeasurement>,
    /// Wire bits of all `K` payloads (`wire::encode`, headers included).
    pub bits: u64,
    /// `bits / (K n)`: bits per gradient element per worker.
    pub bits_per_element: f64,
    /// Size-weighted mean of `sigma_Xl^2`.
    pub sigma_x2: f64,
    /// Size-weighted mean of `sigma_Nl^2`.
    pub sigma_n2: f64,
    /// Size-weighted mean of `D_c,l` (`||g_hat - ybar||^2 / n`).
    pub d_c: f64,
    /// Size-weighted mean of `D_l`.
    pub d: f64,
    /// `d K / sigma_n2 - 1` on the size-weighted means (`+inf` when `sigma_n2 = 0 < d`).
    pub rho: f64,
    /// `sum_l n_l R_sum,l(D_l)`: bits for the whole gradient, all `K` workers together.
    pub r_sum_bits: f64,
    /// `sum_l n_l R_in,l(D_l)`: the same without distributed source coding.
    pub r_in_bits: f64,
    /// The least bits of any per-layer split of the same squared error `sum_l n_l D_l`
    /// ([`allocate_distortion`]); at most `r_sum_bits`.
    pub r_sum_p1_bits: f64,
    /// `r_sum_bits / bits`.
    pub efficiency: f64,
}

impl StepMeasurement {
    /// `bits / n`: bits sent per coordinate, summed over the `K` workers (the unit of
    /// [`sum_rate`]).
    pub fn sent_per_coordinate(&self) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        self.bits as f64 / self.n as f64
    }

    /// `r_sum_bits / n`: the size-weighted mean of `R_sum,l(D_l)`, bits per coordinate.
    pub fn r_sum_per_coordinate(&self) -> f64 {
        self.r_sum_bits / self.n.max(1) as f64
    }

    /// `r_in_bits / n`, bits per coordinate.
    pub fn r_in_per_coordinate(&self) -> f64 {
        self.r_in_bits / self.n.max(1) as f64
    }
}

fn rho(d: f64, sigma_n2: f64, k: f64) -> f64 {
    if sigma_n2 > 0.0 {
        d * k / sigma_n2 - 1.0
    } else if d > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

/// What [`measure_step`] keeps between steps: the backend, one compressor per worker (with
/// its error-feedback residual and momentum), the server's aggregator, the statistics plan
/// and scratch buffers. `StepState::default()` runs on the CPU; [`StepState::new`] on any
/// [`Device`]. The plans are (re)built, with zero residuals, whenever the layout, selection
/// mode, averaging rule or `K` changes; a change of method or ratios alone keeps the
/// residuals ([`Compress::reconfigure`]).
#[derive(Debug)]
pub struct StepState {
    device: Device,
    key: Option<(Layout, Config, Average, usize)>,
    compressors: Vec<Compressor>,
    aggregator: Option<Aggregator>,
    stats: Option<Stats>,
    bytes: Vec<u8>,
    payloads: Vec<Payload>,
    estimate: Vec<f32>,
    variances: Vec<VarianceEstimate>,
}

impl Default for StepState {
    fn default() -> Self {
        Self::new(Device::cpu())
    }
}

impl StepState {
    /// Empty state whose plans will run on `device`.
    pub fn new(device: Device) -> Self {
        Self {
            device,
            key: None,
            compressors: Vec::new(),
            aggregator: None,
            stats: None,
            bytes: Vec::new(),
            payloads: Vec::new(),
            estimate: Vec::new(),
            variances: Vec::new(),
        }
    }

    /// The device the plans run on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The workers' compressors (their residuals are the error-feedback state).
    pub fn compressors_mut(&mut self) -> &mut [Compressor] {
        &mut self.compressors
    }

    /// The server's aggregate of the last [`measure_step`]: the update to apply, length `n`.
    pub fn estimate(&self) -> &[f32] {
        &self.estimate
    }

    /// Zeroes every worker's residual and momentum.
    ///
    /// # Errors
    /// [`crate::Error::Device`] when a GPU call fails.
    pub fn reset(&mut self) -> Result<()> {
        self.compressors.iter_mut().try_for_each(|c| c.reset())
    }

    fn prepare(
        &mut self,
        layout: &Layout,
        config: &Config,
        average: Average,
        k: usize,
    ) -> Result<()> {
        let key = (layout.clone(), config.clone(), average, k);
        if self.key.as_ref() == Some(&key) {
            return Ok(());
        }
        // Only the configuration changed (e.g. DGC's sparsity warm-up): keep every
        // worker's residual and momentum.
        if let Some((l, c, a, kk)) = &self.key {
            if l == layout && *a == average && *kk == k && c.mode == config.mode {
                for (w, plan) in self.compressors.iter_mut().enumerate() {
                    plan.reconfigure(&config.clone().with_worker(w as u32))?;
                }
                self.key = Some(key);
                return Ok(());
            }
        }
        self.key = None;
        self.compressors = (0..k)
            .map(|w| {
                self.device
                    .compressor(layout, &config.clone().with_worker(w as u32))
            })
            .collect::<Result<_>>()?;
        self.aggregator = Some(self.device.aggregator(layout, config.mode, average, k)?);
        self.stats = Some(self.device.stats(layout, k)?);
        self.payloads = vec![Payload::Sparse(SparsePayload::default()); k];
        self.estimate = vec![0.0; layout.n()];
        self.key = Some(key);
        Ok(())
    }
}

/// Runs one step of a real compressor on `K >= 2` workers' gradients and measures it.
///
/// Worker `k` compresses with `config` (its `worker` field set to `k`, so random keys
/// differ across workers) through its error-feedback plan in `state`; each payload is encoded
/// with [`wire::encode`] (its exact length is the bits counted) and decoded back, and the
/// server averages the decoded payloads with `average`. Then, per layer: `sigma_X^2`,
/// `sigma_N^2` ([`Statistics::estimate_variance`] on the state's device), `D_c = ||g_hat - ybar||^2 / n_l` against the
/// mean of the exact gradients, `D = sigma_N^2 / K + D_c`, `rho`, and `R_sum(D)`, `R_in(D)`.
///
/// Errors on `K < 2`, lengths that disagree with `layout`, a non-finite gradient, or an
/// invalid configuration. When a worker's step fails after others have advanced, every
/// residual is reset to zero so the workers stay consistent.
pub fn measure_step<T: Element>(
    grads: &[&[T]],
    layout: &Layout,
    config: &Config,
    average: Average,
    state: &mut StepState,
    step: u64,
) -> Result<StepMeasurement> {
    let k = grads.len();
    if k < 2 {
        return Err(crate::Error::InvalidConfig(format!(
            "measure_step needs K >= 2 workers, got {k}"
        )));
    }
    for g in grads {
        layout.check_len("worker gradient", g.len())?;
    }
    state.prepare(layout, config, average, k)?;
    let stats = state.stats.as_mut().expect("prepared above");
    stats.estimate_variance(grads, &mut state.variances)?;
    let mut bits = 0u64;
    let mut failed = None;
    for ((plan, grad), payload) in state
        .compressors
        .iter_mut()
        .zip(grads)
        .zip(state.payloads.iter_mut())
    {
        let sent = plan.step(grad, step).and_then(|p| {
            let b = wire::encode(p, &mut state.bytes)?;
            wire::decode_into(&state.bytes, payload)?;
            Ok(b)
        });
        match sent {
            Ok(b) => bits += b.total(),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if let Some(e) = failed {
        state.reset()?;
        return Err(e);
    }
    let agg = state.aggregator.as_mut().expect("prepared above");
    agg.aggregate(&state.payloads, &mut state.estimate)?;
    measure_aggregate(grads, layout, &state.variances, &state.estimate, bits, step)
}

/// The measurement half of [`measure_step`], for callers that compressed, moved and
/// aggregated the payloads themselves (a distributed run, [`crate::dist`]): from the `K`
/// workers' exact gradients, their per-layer variance estimates (`variances`, from
/// [`Statistics::estimate_variance`] on `grads`), the server's aggregate `estimate` and the
/// wire `bits` of all `K` payloads. The same arithmetic, in the same order, as
/// [`measure_step`], so equal inputs give equal bits.
///
/// # Errors
/// [`Error::LengthMismatch`] when the lengths disagree with `layout`.
pub fn measure_aggregate<T: Element>(
    grads: &[&[T]],
    layout: &Layout,
    variances: &[VarianceEstimate],
    estimate: &[f32],
    bits: u64,
    step: u64,
) -> Result<StepMeasurement> {
    let k = grads.len();
    for g in grads {
        layout.check_len("worker gradient", g.len())?;
    }
    layout.check_len("aggregate", estimate.len())?;
    if variances.len() != layout.num_layers() {
        return Err(Error::LengthMismatch {
            what: "variance estimates (one per layer)",
            expected: layout.num_layers(),
            got: variances.len(),
        });
    }
    let kf = k as f64;
    let n = layout.n();
    let mut layers = Vec::with_capacity(layout.num_layers());
    for (l, v) in variances.iter().enumerate() {
        let range = layout.layer(l);
        let nl = range.len();
        // An empty layer has nothing to estimate: it reports zero variances (whatever the
        // backend's estimator gives for no data), zero distortion and zero rates.
        let v = if nl == 0 {
            VarianceEstimate::default()
        } else {
            *v
        };
        let mut err = 0.0f64;
        for i in range {
            let ybar = grads.iter().map(|g| f64::from(g[i].to_f32())).sum::<f64>() / kf;
            err += (f64::from(estimate[i]) - ybar).powi(2);
        }
        let d_c = if nl == 0 { 0.0 } else { err / nl as f64 };
        let d = v.sigma_n2 / kf + d_c;
        layers.push(LayerMeasurement {
            n: nl,
            sigma_x2: v.sigma_x2,
            sigma_n2: v.sigma_n2,
            d_c,
            d,
            rho: rho(d, v.sigma_n2, kf),
            r_sum: if nl == 0 {
                0.0
            } else {
                sum_rate(d, v.sigma_x2, v.sigma_n2, k)
            },
            r_in: if nl == 0 {
                0.0
            } else {
                independent_rate(d, v.sigma_x2, v.sigma_n2, k)
            },
        });
    }
    // A fold from +0.0, not `sum`: an empty f64 sum is -0.0, which an empty step would
    // report as `sigma_x2: -0.0`.
    let weighted = |f: fn(&LayerMeasurement) -> f64| -> f64 {
        layers
            .iter()
            .filter(|l| l.n > 0)
            .fold(0.0, |a, l| a + l.n as f64 * f(l))
    };
    let nf = n.max(1) as f64;
    let (sigma_x2, sigma_n2) = (weighted(|l| l.sigma_x2) / nf, weighted(|l| l.sigma_n2) / nf);
    let (d_c, d) = (weighted(|l| l.d_c) / nf, weighted(|l| l.d) / nf);
    let r_sum_bits = weighted(|l| l.r_sum);
    let models: Vec<LayerModel> = layers
        .iter()
        .map(|l| LayerModel {
            n: l.n,
            sigma_x2: l.sigma_x2,
            sigma_n2: l.sigma_n2,
        })
        .collect();
    let r_sum_p1_bits = allocate_distortion(&models, k, weighted(|l| l.d))?.total_bits;
    Ok(StepMeasurement {
        step,
        workers: k,
        n,
        bits,
        bits_per_element: if n == 0 { 0.0 } else { bits as f64 / (kf * nf) },
        sigma_x2,
        sigma_n2,
        d_c,
        d,
        rho: rho(d, sigma_n2, kf),
        r_sum_bits,
        r_in_bits: weighted(|l| l.r_in),
        r_sum_p1_bits: r_sum_p1_bits.min(r_sum_bits),
        efficiency: r_sum_bits / bits as f64,
        layers,
    })
}
