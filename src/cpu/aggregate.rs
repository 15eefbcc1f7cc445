//! The parameter server's decoder (SPEC §7).

use super::par::chunk_len;
use crate::{Aggregate, Error, Layout, Mode, Payload, Result};
use rayon::prelude::*;
use std::ops::Range;

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

/// Server-side plan: built once for a layout, a selection mode (for sign payloads' groups),
/// an averaging rule and `K` workers; owns the per-coordinate sender counts.
///
/// Threads: from [`super::PAR_MIN`] coordinates on, the output is split into contiguous
/// coordinate ranges on rayon's current pool; each coordinate still sums its workers in the
/// order `k = 0..K-1` (SPEC §7), so the aggregate is the same bits for any thread count.
#[derive(Debug)]
pub struct Aggregator {
    n: usize,
    groups: Vec<Range<usize>>,
    rule: Average,
    workers: usize,
    counts: Vec<u32>,
    /// `inv[c] = f32(1 / c)` for `c in 1..=K`, `inv[0] = 0`.
    inv: Vec<f32>,
}

impl Aggregator {
    /// Errors when `workers == 0`.
    pub fn new(layout: &Layout, mode: Mode, rule: Average, workers: usize) -> Result<Self> {
        if workers == 0 {
            return Err(Error::InvalidConfig(
                "aggregation needs K >= 1 workers".into(),
            ));
        }
        let inv = reciprocals(workers);
        Ok(Self {
            n: layout.n(),
            groups: layout.groups(mode),
            rule,
            workers,
            counts: if rule == Average::OverSenders {
                vec![0; layout.n()]
            } else {
                Vec::new()
            },
            inv,
        })
    }
}

impl Aggregate for Aggregator {
    type Output = [f32];

    fn aggregate_device(&mut self, payloads: &[Payload], out: &mut [f32]) -> Result<()> {
        self.aggregate(payloads, out)
    }

    fn rule(&self) -> Average {
        self.rule
    }

    fn aggregate(&mut self, payloads: &[Payload], out: &mut [f32]) -> Result<()> {
        if payloads.len() != self.workers {
            return Err(Error::LengthMismatch {
                what: "payloads (one per worker)",
                expected: self.workers,
                got: payloads.len(),
            });
        }
        if out.len() != self.n {
            return Err(Error::LengthMismatch {
                what: "aggregation output",
                expected: self.n,
                got: out.len(),
            });
        }
        for (k, p) in payloads.iter().enumerate() {
            check_payload(p, self.n, self.groups.len())
                .map_err(|reason| Error::BadPayload { worker: k, reason })?;
        }
        // Parallel over coordinate ranges; `counts` is empty under `OverWorkers`.
        let cl = chunk_len(self.n);
        let mut counts = std::mem::take(&mut self.counts);
        let this = &*self;
        let fill = |c: usize, out: &mut [f32], counts: &mut [u32]| {
            this.fill_range(payloads, c * cl, out, counts);
        };
        if cl >= self.n {
            fill(0, out, &mut counts);
        } else if counts.is_empty() {
            out.par_chunks_mut(cl)
                .enumerate()
                .for_each(|(c, out)| fill(c, out, &mut []));
        } else {
            out.par_chunks_mut(cl)
                .zip(counts.par_chunks_mut(cl))
                .enumerate()
                .for_each(|(c, (out, counts))| fill(c, out, counts));
        }
        self.counts = counts;
        Ok(())
    }
}

impl Aggregator {
    /// The aggregate of the coordinates `a..a + out.len()` into `out` (and, for
    /// `OverSenders`, their sender counts into `counts`; empty otherwise): each coordinate
    /// sums its workers' values in the order `k = 0..K-1` (SPEC §7) whatever the range, so
    /// splitting the coordinates across threads changes no bit.
    fn fill_range(&self, payloads: &[Payload], a: usize, out: &mut [f32], counts: &mut [u32]) {
        let b = a + out.len();
        out.fill(0.0);
        counts.fill(0);
        for p in payloads {
            match p {
                Payload::Sparse(p) => {
                    let lo = p.indices.partition_point(|&i| (i as usize) < a);
                    let hi = lo + p.indices[lo..].partition_point(|&i| (i as usize) < b);
                    for (&i, &v) in p.indices[lo..hi].iter().zip(&p.values[lo..hi]) {
                        let j = i as usize - a;
                        out[j] += v;
                        if let Some(c) = counts.get_mut(j) {
                            *c += 1;
                        }
                    }
                }
                Payload::Sign(p) => {
                    for (g, &s) in self.groups.iter().zip(&p.scales) {
                        for i in g.start.max(a)..g.end.min(b) {
                            out[i - a] += if p.is_negative(i) { -s } else { s };
                        }
                    }
                    counts.iter_mut().for_each(|c| *c += 1);
                }
            }
        }
        match self.rule {
            Average::OverWorkers => {
                let inv = self.inv[self.workers];
                out.iter_mut().for_each(|x| *x *= inv);
            }
            Average::OverSenders => {
                for (x, &c) in out.iter_mut().zip(counts.iter()) {
                    *x *= self.inv[c as usize];
                }
            }
        }
    }
}

/// `[0, f32(1/1), .., f32(1/K)]`: the multipliers of both averaging rules, rounded once on
/// the host so that every backend multiplies by the same bits.
pub(crate) fn reciprocals(workers: usize) -> Vec<f32> {
    std::iter::once(0.0)
        .chain((1..=workers).map(|c| (1.0 / c as f64) as f32))
        .collect()
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
        Payload::Sparse(p) => {
            if p.indices.len() != p.values.len() {
                return Err(format!(
                    "{} indices but {} values",
                    p.indices.len(),
                    p.values.len()
                ));
            }
            let mut prev: Option<u32> = None;
            for (j, &i) in p.indices.iter().enumerate() {
                if i as usize >= n {
                    return Err(format!(
                        "index {i} at position {j} is out of range (n = {n})"
                    ));
                }
                if prev.is_some_and(|q| q >= i) {
                    return Err(format!(
                        "index {i} at position {j} is not above its predecessor (unsorted or duplicate)"
                    ));
                }
                prev = Some(i);
            }
            if let Some(j) = p.values.iter().position(|v| !v.is_finite()) {
                return Err(format!("value at position {j} is not finite"));
            }
        }
        Payload::Sign(p) => {
            if p.scales.len() != groups {
                return Err(format!("{} scales for {groups} groups", p.scales.len()));
            }
            if p.negative.len() != n.div_ceil(64) {
                return Err(format!("{} sign words for {n} elements", p.negative.len()));
            }
            if let Some(j) = p.scales.iter().position(|v| !v.is_finite()) {
                return Err(format!("scale {j} is not finite"));
            }
        }
    }
    Ok(())
}
