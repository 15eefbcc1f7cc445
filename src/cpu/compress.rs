//! The fused error-feedback compression step on the CPU (SPEC §4-6, §10, §13).

use super::par::chunk_len;
use super::select::Selector;
use crate::codec::{qsgd, sign, sparse};
use crate::contract::{check_refund, magnitude_key};
use crate::philox::{random_key, random_keys};
use crate::{
    Compress, Config, Element, Error, Group, Layout, Method, Payload, QsgdPayload, Result,
    SignPayload, SparsePayload,
};
use rayon::prelude::*;

/// A worker's compression plan: built once for a layout and a configuration, it owns the
/// residual `e`, the momentum `u` and every scratch buffer, so [`Compress::step`]
/// allocates nothing.
///
/// The step computes `p = e + g` (or `u = m u + g; p = e + u`) into a second buffer,
/// selects and computes the sent values on it, and swaps it in only once `p` and every sent
/// value are known to be finite (SPEC §5, §10), so a rejected step leaves `e` and `u`
/// exactly as they were at the cost of one extra buffer per state vector.
///
/// Threads: the accumulate pass and each group's selection run on rayon's current pool (the
/// global one, or the caller's `ThreadPool::install`) once they cover [`super::PAR_MIN`]
/// elements; smaller groups, and every group in a 1-thread pool, stay on the calling thread.
/// The payload, the residual and the momentum are the same bits for any thread count, and
/// the per-chunk scratch is allocated here, once, so a step allocates nothing either way.
#[derive(Debug)]
pub struct Compressor {
    layout: Layout,
    config: Config,
    groups: Vec<Group>,
    residual: Vec<f32>,
    momentum: Vec<f32>,
    /// Next `p` (becomes the residual) and next `u`, filled before the finiteness check.
    scratch_p: Vec<f32>,
    scratch_u: Vec<f32>,
    selector: Selector,
    top_r: Vec<u32>,
    /// Random keys of the group being selected (random-k: the whole group; rTop-k: its top r).
    keys: Vec<u32>,
    payload: Payload,
    /// Whether `payload` belongs to the last step (false before the first and after a
    /// rejected one).
    fresh: bool,
    /// The last step's rejection, reported again by `check` and `payload`.
    last_error: Option<Error>,
    /// Whether `scratch_p`/`scratch_u` hold the state from before the last (accepted) step,
    /// which `revert` swaps back (SPEC §5).
    revertible: bool,
    rejected: u64,
}

impl Compressor {
    /// Builds the plan. Errors when the configuration is out of its domain.
    pub fn new(layout: &Layout, config: &Config) -> Result<Self> {
        let groups = config.plan_groups(layout)?;
        let n = layout.n();
        let with_momentum = config.momentum > 0.0;
        let max_group = groups.iter().map(|g| g.range.len()).max().unwrap_or(0);
        let max_r = groups.iter().map(|g| g.r).max().unwrap_or(0);
        let max_keys = groups
            .iter()
            .filter(|g| g.k > 0 && g.k < g.r)
            .map(|g| g.r)
            .max()
            .unwrap_or(0);
        let sent: usize = groups.iter().map(|g| g.k).sum();
        let payload = match config.method {
            Method::Sign => Payload::Sign(SignPayload {
                n: n as u32,
                scales: Vec::with_capacity(groups.len()),
                negative: Vec::with_capacity(n.div_ceil(64)),
            }),
            Method::Qsgd { levels, .. } => Payload::Qsgd(QsgdPayload {
                n: n as u32,
                levels,
                scales: Vec::with_capacity(groups.len()),
                codes: vec![0; n],
            }),
            Method::RTopK { .. } | Method::TopK { .. } | Method::RandomK { .. } => {
                Payload::Sparse(SparsePayload {
                    n: n as u32,
                    values_dtype: config.values,
                    indices: Vec::with_capacity(sent),
                    values: Vec::with_capacity(sent),
                })
            }
        };
        Ok(Self {
            layout: layout.clone(),
            config: config.clone(),
            residual: touched_zeros(n),
            momentum: touched_zeros(if with_momentum { n } else { 0 }),
            scratch_p: touched_zeros(n),
            scratch_u: touched_zeros(if with_momentum { n } else { 0 }),
            selector: Selector::with_capacity(max_group),
            top_r: Vec::with_capacity(max_r),
            keys: Vec::with_capacity(max_keys),
            groups,
            payload,
            fresh: false,
            last_error: None,
            revertible: false,
            rejected: 0,
        })
    }

    /// [`Compress::step`] without the bookkeeping of the last step's outcome: SPEC §5's
    /// error-feedback frame, written once around the codecs (`crate::codec`). `p` and `u'`
    /// go into the scratch halves; a non-finite `p` fails before anything changes; each codec
    /// encodes, and the new state is committed only once nothing can fail any more.
    fn step_once<T: Element>(&mut self, grad: &[T], step: u64) -> Result<&Payload> {
        self.layout.check_len("gradient", grad.len())?;
        let momentum = self.config.momentum > 0.0;
        // Without momentum both `u` buffers are empty (see `new`).
        let bad = accumulate(
            &mut self.scratch_p,
            &mut self.scratch_u,
            &self.residual,
            &self.momentum,
            grad,
            self.config.momentum,
        );
        if bad > 0 {
            let first = self
                .scratch_p
                .iter()
                .position(|x| !x.is_finite())
                .unwrap_or(0);
            return Err(Error::NonFinite {
                count: bad,
                first_index: first as u32,
            });
        }
        let (worker, seed) = (self.config.worker, self.config.seed);
        let (e, p) = (&mut self.residual, &mut self.scratch_p);
        let (u, u_next) = (&mut self.momentum, &mut self.scratch_u);
        match &mut self.payload {
            Payload::Sparse(out) => {
                out.indices.clear();
                for g in &self.groups {
                    select_group(
                        &mut self.selector,
                        &mut self.top_r,
                        &mut self.keys,
                        p,
                        g,
                        (worker, step, seed),
                        &mut out.indices,
                    );
                }
                // The values of the uncommitted `p`: one that only `Scale::Unbiased` makes
                // non-finite fails the step like a non-finite `p` (SPEC §5).
                let values = self.config.values;
                let (bad, first) =
                    sparse::values(p, &self.groups, &out.indices, values, &mut out.values);
                if bad > 0 {
                    // Never hand out a payload the server would have to reject.
                    out.indices.clear();
                    out.values.clear();
                    return Err(Error::NonFinite {
                        count: bad,
                        first_index: first,
                    });
                }
                commit(e, p, u, u_next, momentum);
                // Remove what was sent, and mask its momentum.
                for (&i, &v) in out.indices.iter().zip(&out.values) {
                    e[i as usize] -= v;
                    if momentum {
                        u[i as usize] = 0.0;
                    }
                }
            }
            // Neither can fail once `p` is finite (a scale is a mean or a maximum of finite
            // |p|, a level decodes to at most its group's): commit, then encode the committed
            // `p` in place. Every element sends something, so momentum masking clears all of
            // `u` (SPEC §5, §6, §13); without momentum `u` is empty.
            Payload::Sign(out) => {
                commit(e, p, u, u_next, momentum);
                sign::encode(e, &self.groups, out);
                u.fill(0.0);
            }
            Payload::Qsgd(out) => {
                commit(e, p, u, u_next, momentum);
                let feedback = matches!(
                    self.config.method,
                    Method::Qsgd {
                        error_feedback: true,
                        ..
                    }
                );
                qsgd::encode(e, &self.groups, feedback, (worker, step, seed), out);
                u.fill(0.0);
            }
        }
        Ok(&self.payload)
    }

    /// The residual `e` (f32, length `n`) in place: the CPU's zero-copy view of what
    /// [`Compress::residual`] copies.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Compress, Config, Layout, cpu};
    /// let mut plan = cpu::Compressor::new(&Layout::new(&[2])?, &Config::topk(0.5))?;
    /// plan.step(&[3.0f32, 1.0], 0)?;
    /// assert_eq!(plan.residual_slice(), [0.0, 1.0]);
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    pub fn residual_slice(&self) -> &[f32] {
        &self.residual
    }

    /// The momentum `u` in place; empty when the configuration has no momentum.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Compress, Config, Layout, cpu};
    /// let mut plan = cpu::Compressor::new(&Layout::new(&[2])?, &Config::topk(0.5))?;
    /// assert!(plan.momentum_slice().is_empty());
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    pub fn momentum_slice(&self) -> &[f32] {
        &self.momentum
    }
}

impl Compress for Compressor {
    type Buffer<T: Element> = [T];

    fn step<T: Element>(&mut self, grad: &[T], step: u64) -> Result<&Payload> {
        self.fresh = false;
        // `accumulate` overwrites the halves that held the previous state.
        self.revertible = false;
        match self.step_once(grad, step).map(|_| ()) {
            Ok(()) => {
                self.fresh = true;
                self.revertible = true;
                self.last_error = None;
                Ok(&self.payload)
            }
            Err(e) => {
                if matches!(e, Error::NonFinite { .. }) {
                    self.rejected += 1;
                    self.last_error = Some(e.clone());
                }
                Err(e)
            }
        }
    }

    fn step_device<T: Element>(&mut self, grad: &[T], step: u64) -> Result<()> {
        self.step(grad, step).map(|_| ())
    }

    fn payload(&mut self) -> Result<&Payload> {
        if let Some(e) = &self.last_error {
            return Err(e.clone());
        }
        if !self.fresh {
            return Err(Error::InvalidConfig(
                "no payload to read: no step has succeeded since the plan was built".into(),
            ));
        }
        Ok(&self.payload)
    }

    fn check(&mut self) -> Result<()> {
        self.last_error.clone().map_or(Ok(()), Err)
    }

    fn rejected_steps(&mut self) -> Result<u64> {
        Ok(self.rejected)
    }

    fn residual(&mut self, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        out.extend_from_slice(&self.residual);
        Ok(())
    }

    fn momentum(&mut self, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        out.extend_from_slice(&self.momentum);
        Ok(())
    }

    fn revert(&mut self) -> Result<()> {
        if self.revertible {
            // The step swapped the halves and then changed only the new current one.
            std::mem::swap(&mut self.residual, &mut self.scratch_p);
            std::mem::swap(&mut self.momentum, &mut self.scratch_u);
            self.revertible = false;
            self.fresh = false;
        }
        Ok(())
    }

    fn refund(&mut self, back: &SparsePayload) -> Result<()> {
        check_refund(back, &self.config, &self.groups, self.layout.n())?;
        // The entries belong to the last accepted step: none after a revert, a rejection
        // (its error) or before the first step.
        if let Some(e) = &self.last_error {
            return Err(e.clone());
        }
        if !self.fresh {
            return Err(crate::backend::nothing_to_refund());
        }
        for (&i, &v) in back.indices.iter().zip(&back.values) {
            self.residual[i as usize] += v;
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<()> {
        self.revertible = false;
        self.residual.fill(0.0);
        self.momentum.fill(0.0);
        Ok(())
    }

    fn reconfigure(&mut self, config: &Config) -> Result<()> {
        let fresh = Self::new(&self.layout, config)?;
        let old = std::mem::replace(self, fresh);
        self.residual = old.residual;
        if !self.momentum.is_empty() && !old.momentum.is_empty() {
            self.momentum = old.momentum;
        }
        self.rejected = old.rejected;
        Ok(())
    }

    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn config(&self) -> &Config {
        &self.config
    }

    fn groups(&self) -> &[Group] {
        &self.groups
    }
}

/// Zeros written explicitly, so the pages are mapped at plan construction instead of
/// faulting in during the first step (`vec![0.0; n]` is lazily zeroed by the OS).
fn touched_zeros(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, 0.0);
    v
}

/// `p = e + g` (plain error feedback: `u_next` and `u` empty), or `u' = m u + g; p = e + u'`
/// into `u_next` (momentum; two roundings: GPUs may fuse, SPEC §11 allows 1 ulp); returns
/// how many elements of `p` are not finite. Chunked across rayon's current pool from
/// [`super::PAR_MIN`] elements on: elementwise, so the same bits for any thread count, and
/// the count is an integer sum.
/// Makes the step's `p` the residual and `u'` the momentum; the state before the step stays
/// in the scratch halves, for `revert`.
fn commit(
    e: &mut Vec<f32>,
    p: &mut Vec<f32>,
    u: &mut Vec<f32>,
    u_next: &mut Vec<f32>,
    momentum: bool,
) {
    std::mem::swap(e, p);
    if momentum {
        std::mem::swap(u, u_next);
    }
}

fn accumulate<T: Element>(
    p: &mut [f32],
    u_next: &mut [f32],
    e: &[f32],
    u: &[f32],
    g: &[T],
    m: f32,
) -> u64 {
    // One chunk: the plain loop when `u` is empty, the momentum loop otherwise.
    let chunk = |p: &mut [f32], un: &mut [f32], e: &[f32], u: &[f32], g: &[T]| {
        let mut bad = 0u64;
        if u.is_empty() {
            for ((p, &e), &g) in p.iter_mut().zip(e).zip(g) {
                *p = e + g.to_f32();
                bad += u64::from(!p.is_finite());
            }
            return bad;
        }
        for (((p, un), (&e, &u)), &g) in p.iter_mut().zip(un).zip(e.iter().zip(u)).zip(g) {
            *un = m * u + g.to_f32();
            *p = e + *un;
            bad += u64::from(!p.is_finite());
        }
        bad
    };
    let cl = chunk_len(p.len());
    if cl >= p.len() {
        chunk(p, u_next, e, u, g)
    } else if u.is_empty() {
        p.par_chunks_mut(cl)
            .zip(e.par_chunks(cl).zip(g.par_chunks(cl)))
            .map(|(p, (e, g))| chunk(p, &mut [], e, &[], g))
            .sum()
    } else {
        p.par_chunks_mut(cl)
            .zip(u_next.par_chunks_mut(cl))
            .zip(e.par_chunks(cl).zip(u.par_chunks(cl)).zip(g.par_chunks(cl)))
            .map(|((p, un), ((e, u), g))| chunk(p, un, e, u, g))
            .sum()
    }
}

/// Appends group `g`'s sent indices (ascending) for rTop-k on `p`, taking the cheaper
/// equivalent path when `r == k` (top-k) or `r == n_g` (random-k).
#[allow(clippy::too_many_arguments)]
fn select_group(
    sel: &mut Selector,
    top_r: &mut Vec<u32>,
    keys: &mut Vec<u32>,
    p: &[f32],
    g: &Group,
    (worker, step, seed): (u32, u64, u64),
    out: &mut Vec<u32>,
) {
    if g.k == 0 {
    } else if g.r == g.k {
        sel.select_top_magnitude(p, g.range.clone(), g.k, out);
    } else if g.r == g.range.len() {
        // Every key of the group at once (batched Philox), then a select on the table.
        let start = g.range.start as u32;
        keys.resize(g.range.len(), 0);
        random_keys(|j| start + j as u32, worker, step, seed, keys);
        let keys = &keys[..];
        let range = start..g.range.end as u32;
        sel.select(&range, g.k, |i| keys[(i - start) as usize], out);
    } else {
        top_r.clear();
        sel.select_top_magnitude(p, g.range.clone(), g.r, top_r);
        keys.resize(top_r.len(), 0);
        random_keys(|j| top_r[j], worker, step, seed, keys);
        // Positions in the ascending top-r list order like its indices, ties included.
        let at = out.len();
        let keys = &keys[..];
        sel.select(&(0..top_r.len() as u32), g.k, |j| keys[j as usize], out);
        for o in &mut out[at..] {
            *o = top_r[*o as usize];
        }
    }
}

/// Indices (ascending) of the `min(r, n)` largest-magnitude elements of `x` (SPEC §2),
/// ties to the lower index. NaN ranks above infinity. Allocates; plans use
/// [`Compressor`] instead.
pub fn top_r<T: Element>(x: &[T], r: usize) -> Result<Vec<u32>> {
    crate::Layout::single(x.len())?;
    let mut out = Vec::with_capacity(r.min(x.len()));
    let mut sel = Selector::with_capacity(x.len());
    if T::DTYPE == crate::DType::F32 {
        // The vectorised filter of the magnitude path; its bit order ranks NaN first too.
        let p: &[f32] = bytemuck::cast_slice(x);
        sel.select_top_magnitude(p, 0..x.len(), r, &mut out);
        return Ok(out);
    }
    sel.select(
        &(0..x.len() as u32),
        r,
        |i| magnitude_key(x[i as usize].to_f32()),
        &mut out,
    );
    Ok(out)
}

/// The `min(k, |C|)` candidates with the smallest `(key_i, i)` (SPEC §3), ascending. The
/// result does not depend on the order of `candidates`; duplicates are an error.
pub fn random_k(
    candidates: &[u32],
    k: usize,
    worker: u32,
    step: u64,
    seed: u64,
) -> Result<Vec<u32>> {
    let mut sorted = candidates.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::InvalidConfig(format!(
            "duplicate candidate index {}",
            w[0]
        )));
    }
    let mut out = Vec::with_capacity(k.min(sorted.len()));
    Selector::with_capacity(sorted.len()).select(
        &sorted[..],
        k,
        |i| random_key(i, worker, step, seed),
        &mut out,
    );
    Ok(out)
}

/// rTop-k indices (ascending): `random_k(top_r(x, r), k)` (SPEC §4). Errors when `k > r`.
pub fn rtopk<T: Element>(
    x: &[T],
    r: usize,
    k: usize,
    worker: u32,
    step: u64,
    seed: u64,
) -> Result<Vec<u32>> {
    if k > r {
        return Err(Error::InvalidConfig(format!(
            "rTop-k needs k <= r, got r = {r}, k = {k}"
        )));
    }
    random_k(&top_r(x, r)?, k, worker, step, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconfigure_keeps_residual_and_momentum_and_fails_cleanly() {
        let layout = Layout::new(&[100, 50]).unwrap();
        let mut c = Config::topk(0.5);
        c.momentum = 0.9;
        let mut plan = Compressor::new(&layout, &c).unwrap();
        let g: Vec<f32> = (0..150).map(|i| (i as f32 * 0.37).sin()).collect();
        plan.step(&g, 0).unwrap();
        let (e, u) = (
            plan.residual_slice().to_vec(),
            plan.momentum_slice().to_vec(),
        );
        assert!(e.iter().any(|&x| x != 0.0) && u.iter().any(|&x| x != 0.0));
        assert!(plan.reconfigure(&Config::rtopk(0.1, 0.2)).is_err());
        assert_eq!(
            (plan.residual_slice(), plan.momentum_slice()),
            (&e[..], &u[..])
        );
        let mut c2 = Config::topk(0.05);
        c2.momentum = 0.9;
        plan.reconfigure(&c2).unwrap();
        assert_eq!(
            (plan.residual_slice(), plan.momentum_slice()),
            (&e[..], &u[..])
        );
        let Payload::Sparse(p) = plan.step(&g, 1).unwrap() else {
            panic!()
        };
        assert_eq!(p.indices.len(), 8);
    }
}
