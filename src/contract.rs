//! What every backend shares beside the traits of [`crate::backend`]: the types the
//! contract's operations take and return ([`Average`], [`LayerStats`],
//! [`VarianceEstimate`]), the magnitude order and the averaging multipliers that make every
//! backend compute the same bits (docs/SPEC.md §1, §7), and the host-side checks each
//! backend runs before anything touches its state or device memory (§10, §12). The CPU
//! backend is one implementation of the contract among three; nothing here is its own.

use crate::{Config, Error, Group, Payload, Result, SparsePayload};

// ---- the magnitude order (§1) ----

/// The magnitude order of SPEC §1 as a key where smaller sorts first: larger `|x|` (IEEE bits,
/// sign cleared) gives a smaller key. NaN (bits above infinity's) gets the smallest keys;
/// the compressor rejects it before selecting.
///
/// # Examples
/// ```
/// use gradsift::contract::magnitude_key;
/// assert!(magnitude_key(-3.0) < magnitude_key(2.0));
/// assert_eq!(magnitude_key(-1.5), magnitude_key(1.5));
/// ```
#[inline(always)]
pub fn magnitude_key(x: f32) -> u32 {
    0x7FFF_FFFF ^ (x.to_bits() & 0x7FFF_FFFF)
}

// ---- averaging (§7) ----

/// How the server averages what it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Average {
    /// `out_i = (sum_k v_k,i) * f32(1/K)`: unbiased with [`crate::Scale::Unbiased`].
    #[default]
    OverWorkers,
    /// `out_i = (sum_k v_k,i) * f32(1/c_i)` where `c_i` workers sent coordinate `i`; 0 where
    /// nobody did (the rTop-k paper's rule). The reciprocal is a host-computed f32 so that
    /// every backend gets the same bits (a GPU division need not be correctly rounded).
    OverSenders,
}

/// `[0, f32(1/1), .., f32(1/K)]`: the multipliers of both averaging rules, rounded once on
/// the host so that every backend multiplies by the same bits.
pub(crate) fn reciprocals(workers: usize) -> Vec<f32> {
    std::iter::once(0.0)
        .chain((1..=workers).map(|c| (1.0 / c as f64) as f32))
        .collect()
}

// ---- statistics (§8) ----

/// Statistics of one layer (SPEC §8). Mean and variance cover the finite elements only
/// (dividing by their number); a layer with no finite element (an empty one included) has
/// mean and variance NaN, `min = +inf`, `max = -inf`, `max_abs = 0`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerStats {
    /// Number of elements `n_l`, finite or not.
    pub count: u64,
    /// Mean of the finite elements; NaN when there is none.
    pub mean: f64,
    /// Population variance (divide by the number of finite elements) of the finite elements;
    /// NaN when there is none.
    pub var: f64,
    /// Smallest finite element.
    pub min: f32,
    /// Largest finite element.
    pub max: f32,
    /// Largest finite `|x|`.
    pub max_abs: f32,
    /// Number of NaN or infinite elements.
    pub non_finite: u64,
}

/// The two variances of the seed paper's Section III model `Y_k = X + N_k`, for one layer.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct VarianceEstimate {
    /// `sigma_X^2`: variance of the global gradient, `max(0, var_i(ybar_i) - sigma_N^2 / K)`.
    pub sigma_x2: f64,
    /// `sigma_N^2`: gradient-noise variance, `sum_i sum_k (y_k,i - ybar_i)^2 / (n_l (K - 1))`.
    pub sigma_n2: f64,
}

// ---- checks every backend runs ----

/// The variance estimator's `K >= 2` (SPEC §8), checked the same way by every backend.
pub(crate) fn check_workers(k: usize) -> Result<()> {
    if k < 2 {
        return Err(Error::InvalidConfig(format!(
            "the variance estimator needs K >= 2 workers, got {k}"
        )));
    }
    Ok(())
}

/// Everything SPEC §7/§10 asks of a payload before it may touch the output.
pub(crate) fn check_payload(
    p: &Payload,
    n: usize,
    groups: usize,
) -> std::result::Result<(), String> {
    if p.n() as usize != n {
        return Err(format!(
            "it describes {} elements, the server expects {n}",
            p.n()
        ));
    }
    match p {
        Payload::Sparse(p) => crate::codec::sparse::check(p, n),
        Payload::Sign(p) => crate::codec::sign::check(p, n, groups),
        Payload::Qsgd(p) => crate::codec::qsgd::check(p, n, groups),
    }
}

/// What [`Compress::refund`] asks of its argument on every backend, before any state is
/// read: a sparse plan (a sign payload has no entries to return), `back` over this plan's
/// `n` with strictly ascending indices, and at most as many entries as one payload of the
/// plan sends (the sum of the groups' `k`), so that the GPU backends' refund buffers, sized
/// once when the plan is built, always hold it.
pub(crate) fn check_refund(
    back: &SparsePayload,
    config: &Config,
    groups: &[Group],
    n: usize,
) -> Result<()> {
    if !config.is_sparse() {
        return Err(Error::InvalidConfig(format!(
            "refund returns entries of a sparse payload; this plan sends {}",
            config.method.kind()
        )));
    }
    let sent: usize = groups.iter().map(|g| g.k).sum();
    let reason = if back.n as usize != n {
        format!("it describes {} elements, the plan has {n}", back.n)
    } else if back.indices.len() != back.values.len() {
        format!(
            "{} indices but {} values",
            back.indices.len(),
            back.values.len()
        )
    } else if back.indices.len() > sent {
        format!(
            "{} entries, more than the {sent} that one payload of this plan sends",
            back.indices.len()
        )
    } else if back.indices.windows(2).any(|w| w[0] >= w[1])
        || back.indices.last().is_some_and(|&i| i as usize >= n)
    {
        "its indices are not strictly ascending below n".to_string()
    } else {
        return Ok(());
    };
    Err(Error::BadPayload { worker: 0, reason })
}
