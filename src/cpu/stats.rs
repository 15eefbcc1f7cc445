//! Per-layer statistics and the K-worker variance estimator (SPEC §8), in f64.

use super::par::PAR_MIN;
use crate::contract::{LayerStats, VarianceEstimate, check_workers};
use crate::{Element, Error, Layout, Result};
use rayon::prelude::*;
use std::ops::Range;

/// Chunk length of the one-pass mean/M2 merge (Chan et al.): within a chunk a plain f64 sum
/// around the chunk's own mean keeps cancellation harmless, and merging is exact in form.
const CHUNK: usize = 4096;

#[derive(Clone, Copy)]
struct Moments {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    const EMPTY: Self = Self {
        n: 0.0,
        mean: 0.0,
        m2: 0.0,
    };

    fn merge(self, o: Self) -> Self {
        if o.n == 0.0 {
            return self;
        }
        if self.n == 0.0 {
            return o;
        }
        let n = self.n + o.n;
        let d = o.mean - self.mean;
        Self {
            n,
            mean: self.mean + d * o.n / n,
            m2: self.m2 + o.m2 + d * d * self.n * o.n / n,
        }
    }

    /// Moments of the finite values of one chunk (at most [`CHUNK`] values).
    fn of(values: impl Iterator<Item = f64> + Clone) -> Self {
        let (mut n, mut s) = (0usize, 0.0f64);
        for v in values.clone() {
            n += 1;
            s += v;
        }
        if n == 0 {
            return Self::EMPTY;
        }
        let mean = s / n as f64;
        let m2 = values.map(|v| (v - mean) * (v - mean)).sum();
        Self {
            n: n as f64,
            mean,
            m2,
        }
    }
}

/// Statistics of each layer of `x` under `layout`, written to `out` (cleared first; reuse it
/// across steps to avoid allocating). Layers are computed in parallel on rayon's current pool
/// when `x` has at least [`super::PAR_MIN`] elements and more than one layer (each layer on
/// one thread, in the same order as serially: the same bits for any thread count).
///
/// # Errors
/// [`Error::LengthMismatch`] when `x.len()` is not the layout's `n`.
///
/// # Examples
/// ```
/// use gradsift::{Layout, cpu};
/// let mut out = Vec::new();
/// cpu::layer_stats(&[1.0f32, 3.0, f32::NAN], &Layout::new(&[2, 1])?, &mut out)?;
/// assert_eq!((out[0].mean, out[0].var, out[1].non_finite), (2.0, 1.0, 1));
/// # Ok::<(), gradsift::Error>(())
/// ```
pub fn layer_stats<T: Element>(x: &[T], layout: &Layout, out: &mut Vec<LayerStats>) -> Result<()> {
    layout.check_len("buffer", x.len())?;
    per_layer(layout, x.len(), out, |l| {
        layer_stats_one(&x[layout.layer(l)])
    })
}

/// `out[l] = f(l)` for every layer `l`, over the layers in parallel when the buffer has at
/// least `PAR_MIN` elements, the pool more than one thread and the layout more than one layer.
fn per_layer<S, F>(layout: &Layout, n: usize, out: &mut Vec<S>, f: F) -> Result<()>
where
    S: Send,
    F: Fn(usize) -> S + Sync + Send,
{
    let layers = layout.num_layers();
    out.clear();
    if n < PAR_MIN || layers < 2 || rayon::current_num_threads() < 2 {
        out.extend((0..layers).map(f));
    } else {
        out.par_extend((0..layers).into_par_iter().map(f));
    }
    Ok(())
}

fn layer_stats_one<T: Element>(layer: &[T]) -> LayerStats {
    let mut st = LayerStats {
        count: layer.len() as u64,
        mean: f64::NAN,
        var: f64::NAN,
        min: f32::INFINITY,
        max: f32::NEG_INFINITY,
        max_abs: 0.0,
        non_finite: 0,
    };
    let mut mom = Moments::EMPTY;
    for chunk in layer.chunks(CHUNK) {
        let finite = chunk.iter().map(|v| v.to_f32()).filter(|v| v.is_finite());
        for v in finite.clone() {
            st.min = st.min.min(v);
            st.max = st.max.max(v);
            st.max_abs = st.max_abs.max(v.abs());
        }
        let c = Moments::of(finite.map(f64::from));
        st.non_finite += chunk.len() as u64 - c.n as u64;
        mom = mom.merge(c);
    }
    if mom.n > 0.0 {
        st.mean = mom.mean;
        st.var = mom.m2 / mom.n;
    }
    st
}

/// Per-layer `sigma_X^2` and `sigma_N^2` from `K >= 2` workers' buffers of one step (SPEC §8),
/// written to `out` (cleared first). Empty layers give zeros. Errors on `K < 2`, buffers of
/// the wrong length, or a non-finite element (with its worker-0-based index).
pub fn estimate_variance<T: Element>(
    workers: &[&[T]],
    layout: &Layout,
    out: &mut Vec<VarianceEstimate>,
) -> Result<()> {
    let k = workers.len();
    check_workers(k)?;
    for w in workers {
        layout.check_len("worker buffer", w.len())?;
    }
    for w in workers {
        if let Some(i) = w.iter().position(|v| !v.to_f32().is_finite()) {
            let count = w.iter().filter(|v| !v.to_f32().is_finite()).count() as u64;
            return Err(Error::NonFinite {
                count,
                first_index: i as u32,
            });
        }
    }
    let kf = k as f64;
    per_layer(layout, layout.n(), out, |l| {
        variance_one(workers, layout.layer(l), kf)
    })
}

/// [`estimate_variance`] of the layer `range`.
fn variance_one<T: Element>(workers: &[&[T]], range: Range<usize>, kf: f64) -> VarianceEstimate {
    let nl = range.len();
    if nl == 0 {
        return VarianceEstimate::default();
    }
    let mut noise = 0.0f64;
    let mut mom = Moments::EMPTY;
    let mut start = range.start;
    while start < range.end {
        let end = (start + CHUNK).min(range.end);
        let ybar = |i: usize| {
            workers
                .iter()
                .map(|w| f64::from(w[i].to_f32()))
                .sum::<f64>()
                / kf
        };
        for i in start..end {
            let m = ybar(i);
            noise += workers
                .iter()
                .map(|w| (f64::from(w[i].to_f32()) - m).powi(2))
                .sum::<f64>();
        }
        mom = mom.merge(Moments::of((start..end).map(ybar)));
        start = end;
    }
    let sigma_n2 = noise / (nl as f64 * (kf - 1.0));
    let var_ybar = mom.m2 / nl as f64;
    VarianceEstimate {
        sigma_x2: (var_ybar - sigma_n2 / kf).max(0.0),
        sigma_n2,
    }
}

/// Streaming form of [`estimate_variance`]: an exponential moving average per layer,
/// `s <- beta s + (1 - beta) x`, initialised by the first observation.
#[derive(Debug, Clone, PartialEq)]
pub struct VarianceTracker {
    beta: f64,
    state: Vec<VarianceEstimate>,
    seen: bool,
}

impl VarianceTracker {
    /// `beta` in `[0, 1)`: weight of the past (0 keeps only the latest step).
    pub fn new(beta: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&beta) {
            return Err(Error::InvalidConfig(format!(
                "EMA factor must lie in [0, 1), got {beta}"
            )));
        }
        Ok(Self {
            beta,
            state: Vec::new(),
            seen: false,
        })
    }

    /// Folds in one step's estimates (one per layer; the layer count must not change).
    pub fn update(&mut self, step: &[VarianceEstimate]) -> Result<&[VarianceEstimate]> {
        if !self.seen {
            self.state.clear();
            self.state.extend_from_slice(step);
            self.seen = true;
            return Ok(&self.state);
        }
        if step.len() != self.state.len() {
            return Err(Error::LengthMismatch {
                what: "per-layer estimates",
                expected: self.state.len(),
                got: step.len(),
            });
        }
        let b = self.beta;
        for (s, x) in self.state.iter_mut().zip(step) {
            s.sigma_x2 = b * s.sigma_x2 + (1.0 - b) * x.sigma_x2;
            s.sigma_n2 = b * s.sigma_n2 + (1.0 - b) * x.sigma_n2;
        }
        Ok(&self.state)
    }

    /// The current averages (empty before the first update).
    pub fn current(&self) -> &[VarianceEstimate] {
        &self.state
    }
}

/// A statistics plan for one layout: the CPU's form of [`crate::Statistics`] (it holds no
/// scratch; [`layer_stats`] and [`estimate_variance`] are the same computations as free
/// functions).
#[derive(Debug, Clone)]
pub struct Stats {
    layout: Layout,
}

impl Stats {
    /// A plan for `layout`.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Layout, Statistics, cpu};
    /// let mut stats = cpu::Stats::new(&Layout::new(&[2])?);
    /// let mut out = Vec::new();
    /// stats.layer_stats(&[gradsift::f16::from_f32(1.5), gradsift::f16::from_f32(-0.5)], &mut out)?;
    /// assert_eq!((out[0].mean, out[0].max_abs), (0.5, 1.5));
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    pub fn new(layout: &Layout) -> Self {
        Self {
            layout: layout.clone(),
        }
    }
}

impl crate::Statistics for Stats {
    type Buffer<T: Element> = [T];

    fn layer_stats<T: Element>(&mut self, x: &[T], out: &mut Vec<LayerStats>) -> Result<()> {
        layer_stats(x, &self.layout, out)
    }

    fn layer_stats_device<T: Element>(&mut self, x: &[T], out: &mut Vec<LayerStats>) -> Result<()> {
        layer_stats(x, &self.layout, out)
    }

    fn estimate_variance<T: Element>(
        &mut self,
        workers: &[&[T]],
        out: &mut Vec<VarianceEstimate>,
    ) -> Result<()> {
        estimate_variance(workers, &self.layout, out)
    }

    fn estimate_variance_device<T: Element>(
        &mut self,
        workers: &[&[T]],
        out: &mut Vec<VarianceEstimate>,
    ) -> Result<()> {
        estimate_variance(workers, &self.layout, out)
    }
}
