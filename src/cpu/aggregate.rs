//! The parameter server's decoder (SPEC §7).

use super::par::chunk_len;
use crate::codec::qsgd;
use crate::contract::{Average, check_payload, reciprocals};
use crate::{Aggregate, Error, Layout, Mode, Payload, Result};
use rayon::prelude::*;
use std::ops::Range;

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
        out.fill(0.0);
        if !self.merge_range(payloads, a, out) {
            self.dense_range(payloads, a, out, counts);
        }
    }

    /// [`Self::fill_range`]'s general path on a zeroed `out`: scatter-adds every payload
    /// in worker order, then scales every coordinate.
    fn dense_range(&self, payloads: &[Payload], a: usize, out: &mut [f32], counts: &mut [u32]) {
        let b = a + out.len();
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
                Payload::Qsgd(p) => {
                    for (g, &s) in self.groups.iter().zip(&p.scales) {
                        let d = qsgd::step(s, p.levels);
                        for i in g.start.max(a)..g.end.min(b) {
                            out[i - a] += qsgd::decode(p.codes[i], d);
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

/// Most workers [`Aggregator::merge_range`] merges (its cursors live on the stack).
const MERGE_MAX_WORKERS: usize = 32;

impl Aggregator {
    /// The sparse fast path of [`Self::fill_range`] on a zeroed `out`: merges the workers'
    /// ascending index lists and writes each coordinate that some worker sent once, as
    /// `(0 + v_0 + v_1 + ..) * f32(1/c)` in worker order, the very operations the dense path
    /// does, so the same bits; untouched coordinates keep the `+0.0` of the fill, which is
    /// what `0 * f32(1/c)` gives. It saves the dense path's scaling pass over every
    /// coordinate (and the sender counts), which dominates when few coordinates are sent.
    /// Returns `false`, having written nothing, when it does not apply: a sign payload, more
    /// than [`MERGE_MAX_WORKERS`] workers, or more merge work (`K` x values in the range)
    /// than the pass it saves.
    fn merge_range(&self, payloads: &[Payload], a: usize, out: &mut [f32]) -> bool {
        let k = payloads.len();
        if k > MERGE_MAX_WORKERS {
            return false;
        }
        let b = a + out.len();
        let mut cur = [(0usize, 0usize); MERGE_MAX_WORKERS];
        let mut sent = 0;
        for (c, p) in cur.iter_mut().zip(payloads) {
            let Payload::Sparse(p) = p else { return false };
            let lo = p.indices.partition_point(|&i| (i as usize) < a);
            let hi = lo + p.indices[lo..].partition_point(|&i| (i as usize) < b);
            *c = (lo, hi);
            sent += hi - lo;
        }
        if k * sent >= out.len() {
            return false;
        }
        let sparse = |w: usize| match &payloads[w] {
            Payload::Sparse(p) => p,
            Payload::Sign(_) | Payload::Qsgd(_) => unreachable!("checked above"),
        };
        let cur = &mut cur[..k];
        loop {
            let next = (0..k)
                .filter(|&w| cur[w].0 < cur[w].1)
                .map(|w| sparse(w).indices[cur[w].0])
                .min();
            let Some(i) = next else { return true };
            let (mut sum, mut senders) = (0.0f32, 0usize);
            for (w, c) in cur.iter_mut().enumerate() {
                let p = sparse(w);
                if c.0 < c.1 && p.indices[c.0] == i {
                    sum += p.values[c.0];
                    senders += 1;
                    c.0 += 1;
                }
            }
            let inv = match self.rule {
                Average::OverWorkers => self.inv[self.workers],
                Average::OverSenders => self.inv[senders],
            };
            out[i as usize - a] = sum * inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SparsePayload;

    /// The merge and the dense path write the same bits, signed zeros, shared and lone
    /// coordinates, both rules.
    #[test]
    fn merge_equals_dense() {
        let n: usize = 40_000;
        let mut rng = 0x9e37_79b9_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for workers in [1usize, 2, 3, 7, MERGE_MAX_WORKERS] {
            let payloads: Vec<Payload> = (0..workers)
                .map(|_| {
                    // about 10 of 40,000 coordinates each, half of them in a shared window,
                    // so that coordinates are sent by several workers
                    let mut idx: Vec<u32> = (0..10)
                        .map(|j| (next() % if j % 2 == 0 { 40 } else { n as u64 }) as u32)
                        .collect();
                    idx.sort_unstable();
                    idx.dedup();
                    let values = idx
                        .iter()
                        .map(|_| match next() % 4 {
                            0 => -0.0,
                            1 => 0.0,
                            _ => (next() % 2001) as f32 / 7.0 - 140.0,
                        })
                        .collect();
                    Payload::Sparse(SparsePayload {
                        n: n as u32,
                        indices: idx,
                        values,
                        ..Default::default()
                    })
                })
                .collect();
            for rule in [Average::OverWorkers, Average::OverSenders] {
                let layout = Layout::single(n).unwrap();
                let agg = Aggregator::new(&layout, Mode::Global, rule, workers).unwrap();
                let (mut merged, mut dense) = (vec![1.0f32; n], vec![0.0f32; n]);
                merged.fill(0.0);
                assert!(agg.merge_range(&payloads, 0, &mut merged), "K = {workers}");
                let mut counts = vec![0u32; n];
                agg.dense_range(&payloads, 0, &mut dense, &mut counts);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&merged), bits(&dense), "K = {workers}, {rule:?}");
                // and a range that starts inside the output
                let (mut m2, mut d2) = (vec![0.0f32; 20_000], vec![0.0f32; 20_000]);
                assert!(agg.merge_range(&payloads, 20, &mut m2));
                agg.dense_range(&payloads, 20, &mut d2, &mut counts[..20_000]);
                assert_eq!(bits(&m2), bits(&d2));
                assert_eq!(bits(&m2), bits(&dense[20..20_020]));
            }
        }
    }
}
