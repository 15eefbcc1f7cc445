//! O(n) selection of the `m` smallest `(key, index)` pairs: the one primitive behind top-r
//! (key = inverted magnitude bits) and random-k (key = Philox word).
//!
//! The usual case `m << len` takes one pass: a strided sample of the keys gives a threshold
//! that a little more than `m` elements reach, one filtering pass keeps every key at or below
//! it (in index order), and an exact select on those few finishes. Otherwise (or when the
//! sample misjudged) a three-digit radix select (11 + 11 + 10 bits) runs: one histogram pass,
//! one pass that emits everything below the pivot digit and compacts the ties, then the same
//! on the (usually tiny) tie list. Lists of up to `PACKED_MAX` items use a select on packed
//! `(key << 32) | index` words instead, which is cheaper than clearing 2048-bin histograms.
//!
//! Threads (see `par.rs`): over `PAR_MIN` items or more, the filtering pass and each radix
//! pass split the items into contiguous chunks on rayon's current pool. Every chunk writes its
//! hits into its own span and the spans are joined in chunk order; radix histograms are one
//! per chunk, merged by integer addition, and give each chunk its exact output offsets. The
//! selected set is fixed by the keys alone (ties to the lower index), and it comes out in
//! index order, so the result is the same for any thread count.

use super::par::{MAX_CHUNKS, PAR_MIN, chunk_len, for_spans};
use crate::contract::magnitude_key;
use rayon::prelude::*;
use std::ops::Range;

/// Lists up to this size take the packed-word path even in a plan built for less.
const SMALL: usize = 4096;
/// Lists up to this size (and up to the packed scratch's capacity) take the packed-word path.
const PACKED_MAX: usize = 1 << 18;
/// Target sample size of the sampled path: enough for a tight threshold, small enough that
/// selecting in it costs little next to the filtering pass.
const SAMPLE: usize = 1 << 15;
const DIGITS: [(u32, u32); 3] = [(21, 11), (10, 11), (0, 10)];
const BINS: usize = 1 << 11;

/// The items a [`Selector`] chooses from, in ascending index order: a range of indices
/// (`&(a..b)`) or a sorted list (`&list[..]`). Random access is what lets a pass split them
/// into chunks.
pub trait Items: Sync {
    /// Number of items.
    fn len(&self) -> usize;
    /// Whether there is none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The `j`-th item (`j < len()`).
    fn at(&self, j: usize) -> u32;
}

impl Items for Range<u32> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.end.saturating_sub(self.start) as usize
    }
    #[inline(always)]
    fn at(&self, j: usize) -> u32 {
        self.start + j as u32
    }
}

impl Items for [u32] {
    #[inline(always)]
    fn len(&self) -> usize {
        <[u32]>::len(self)
    }
    #[inline(always)]
    fn at(&self, j: usize) -> u32 {
        self[j]
    }
}

/// Reusable scratch for [`Selector::select`]; allocating it once per plan keeps steps
/// allocation-free, whatever the thread count.
#[derive(Debug, Default)]
pub struct Selector {
    /// One `BINS`-bin histogram per chunk of a radix pass.
    hist: Vec<u32>,
    /// Per chunk of a radix pass: where its below-pivot items and its ties start in the
    /// outputs (`MAX_CHUNKS + 1` prefix offsets).
    starts: Vec<(usize, usize)>,
    cand: Vec<u32>,
    next: Vec<u32>,
    /// The sampled path's candidates: each chunk writes into its own span (so the buffer is
    /// as long as the largest group; pages never written are never mapped), then the spans
    /// are moved to the front in chunk order.
    filtered: Vec<u32>,
    /// Candidates per chunk of the sampled path.
    counts: Vec<usize>,
    packed: Vec<u64>,
}

impl Selector {
    /// Scratch for groups of up to `max_group` elements (the chunk histograms only when a
    /// group can reach the parallel cut-off [`super::PAR_MIN`]). A selector built smaller
    /// still works, growing its scratch on first use.
    ///
    /// # Examples
    /// ```
    /// let mut sel = gradsift::cpu::Selector::with_capacity(1000);
    /// let x: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32).collect();
    /// let mut top = Vec::new();
    /// sel.select_top_magnitude(&x, 0..1000, 3, &mut top);
    /// assert_eq!(top, [321, 642, 963]); // the elements 999, 998, 997, in index order
    /// ```
    pub fn with_capacity(max_group: usize) -> Self {
        let chunks = if max_group >= PAR_MIN { MAX_CHUNKS } else { 1 };
        Self {
            hist: vec![0; chunks * BINS],
            starts: Vec::with_capacity(MAX_CHUNKS + 1),
            cand: Vec::with_capacity(max_group),
            next: Vec::with_capacity(max_group),
            filtered: vec![0; max_group],
            counts: Vec::with_capacity(chunks),
            // Exact path: up to PACKED_MAX words; sampled path: max_group / stride words.
            packed: Vec::with_capacity(
                max_group.min(PACKED_MAX.max(2 * SAMPLE).max(max_group / 1024 + 1)),
            ),
        }
    }

    /// Appends to `out` the `min(m, items.len())` items with the smallest `(key(i), i)`, in
    /// ascending index order: ties resolve to the lower index. `items` must be ascending.
    /// Runs on rayon's current pool from [`super::PAR_MIN`] items on (wrap the call in
    /// `ThreadPool::install` to choose the threads); the result is the same for any thread
    /// count. Allocates only when `out` or the selector's scratch is too small.
    ///
    /// # Examples
    /// ```
    /// let keys = [5u32, 1, 3, 1, 9];
    /// let mut out = Vec::new();
    /// gradsift::cpu::Selector::default().select(&(0..5), 2, |i| keys[i as usize], &mut out);
    /// assert_eq!(out, [1, 3]); // the two keys 1
    /// ```
    pub fn select<S, K>(&mut self, items: &S, m: usize, key: K, out: &mut Vec<u32>)
    where
        S: Items + ?Sized,
        K: Fn(u32) -> u32 + Sync,
    {
        let len = items.len();
        let m = m.min(len);
        if m == 0 {
            return;
        }
        if m == len {
            out.extend((0..len).map(|j| items.at(j)));
            return;
        }
        let filter = |r: Range<usize>, t: u32, span: &mut [u32], cap: usize| {
            filter_keys(items, &key, r, t, span, cap)
        };
        if !sampling_pays(len, m) || !self.select_sampled(items, m, &key, &filter, out) {
            self.select_exact(items, m, &key, out);
        }
    }

    /// [`Selector::select`] with the magnitude key over the contiguous `p[range]`, where the
    /// filtering pass runs over the slice in blocks that the compiler vectorises. NaN ranks
    /// by its bits, above infinity, as in [`magnitude_key`].
    ///
    /// # Examples
    /// ```
    /// let mut out = Vec::new();
    /// gradsift::cpu::Selector::default().select_top_magnitude(&[1.0, -4.0, 4.0, 2.0], 1..4, 2, &mut out);
    /// assert_eq!(out, [1, 2]);
    /// ```
    pub fn select_top_magnitude(
        &mut self,
        p: &[f32],
        range: Range<usize>,
        m: usize,
        out: &mut Vec<u32>,
    ) {
        let len = range.len();
        let m = m.min(len);
        let key = |i: u32| magnitude_key(p[i as usize]);
        let items = range.start as u32..range.end as u32;
        if m == 0 || m == len || !sampling_pays(len, m) {
            return self.select(&items, m, key, out);
        }
        let filter = |r: Range<usize>, t: u32, span: &mut [u32], cap: usize| {
            let at = range.start + r.start;
            // key <= t  <=>  |x| bits >= 0x7FFF_FFFF ^ t.
            filter_magnitude(
                &p[at..range.start + r.end],
                at as u32,
                0x7FFF_FFFF ^ t,
                span,
                cap,
            )
        };
        if !self.select_sampled(&items, m, &key, &filter, out) {
            self.select_exact(&items, m, &key, out);
        }
    }

    /// Packed-word select for short lists, radix select otherwise; appends in index order.
    fn select_exact<S, K>(&mut self, items: &S, m: usize, key: &K, out: &mut Vec<u32>)
    where
        S: Items + ?Sized,
        K: Fn(u32) -> u32 + Sync,
    {
        let len = items.len();
        if len <= SMALL || len <= PACKED_MAX.min(self.packed.capacity()) {
            // Words are unique (the index is in them), so exactly m are <= the m-th.
            let word = |i: u32| (u64::from(key(i)) << 32) | u64::from(i);
            self.packed.clear();
            self.packed.extend((0..len).map(|j| word(items.at(j))));
            // The m smallest words are the first m after the partition: their low halves
            // are the answer, so no key is computed twice (random keys cost a Philox block).
            self.packed.select_nth_unstable(m - 1);
            let start = out.len();
            out.extend(self.packed[..m].iter().map(|&w| w as u32));
            out[start..].sort_unstable();
        } else {
            self.select_radix(items, m, key, out);
        }
    }

    /// The sampled path: a strided sample of the keys gives a threshold `t` that, with
    /// overwhelming probability, a little more than `m` elements reach; `filter(chunk, t,
    /// span, cap)` writes the chunk's items with `key <= t` (ties included, in index order)
    /// to `span` and returns their number (it may stop once past `cap`); an exact select on
    /// those finishes. Returns false, having appended nothing, when the sample misjudged (too
    /// few or far too many candidates); the caller then runs the exact select, so the answer
    /// never depends on the sample.
    fn select_sampled<S, K, F>(
        &mut self,
        items: &S,
        m: usize,
        key: &K,
        filter: &F,
        out: &mut Vec<u32>,
    ) -> bool
    where
        S: Items + ?Sized,
        K: Fn(u32) -> u32 + Sync,
        F: Fn(Range<usize>, u32, &mut [u32], usize) -> usize + Sync,
    {
        let len = items.len();
        // At least 16 apart: a sample of a third of a 100k-element bucket cost more to
        // partition than the filtering pass it saves; 16x fewer keys keep the threshold tight
        // enough (the exact select runs on the filtered candidates either way).
        let stride = (len / SAMPLE).clamp(16, 1024);
        self.packed.clear();
        self.packed.extend(
            (0..len)
                .step_by(stride)
                .map(|j| u64::from(key(items.at(j)))),
        );
        let s = self.packed.len();
        let expected = m as f64 * s as f64 / len as f64;
        let rank = (expected + 4.0 * expected.sqrt() + 8.0).ceil() as usize;
        if rank >= s {
            return false;
        }
        let threshold = *self.packed.select_nth_unstable(rank).1 as u32;
        let cap = 4 * rank * stride + SMALL;

        if self.filtered.len() < len {
            self.filtered.resize(len, 0);
        }
        let cl = chunk_len(len);
        let chunks = len.div_ceil(cl);
        self.counts.clear();
        self.counts.resize(chunks, 0);
        let spans = &mut self.filtered[..len];
        if chunks == 1 {
            self.counts[0] = filter(0..len, threshold, spans, cap);
        } else {
            spans
                .par_chunks_mut(cl)
                .zip(self.counts.par_iter_mut())
                .enumerate()
                .for_each(|(c, (span, n))| {
                    *n = filter(c * cl..c * cl + span.len(), threshold, span, cap);
                });
        }
        let mut total = 0;
        for (c, &n) in self.counts.iter().enumerate() {
            self.filtered.copy_within(c * cl..c * cl + n, total);
            total += n;
            if total > cap {
                break;
            }
        }
        let ok = total >= m && total <= cap;
        if ok {
            let cand = std::mem::take(&mut self.filtered);
            self.select_exact(&cand[..total], m, key, out);
            self.filtered = cand;
        }
        ok
    }

    /// Three-digit radix select; appends the `m` smallest to `out`, then sorts them.
    fn select_radix<S, K>(&mut self, items: &S, m: usize, key: &K, out: &mut Vec<u32>)
    where
        S: Items + ?Sized,
        K: Fn(u32) -> u32 + Sync,
    {
        let start = out.len();
        let mut cand = std::mem::take(&mut self.cand);
        let mut next = std::mem::take(&mut self.next);
        let mut scratch = (&mut self.hist, &mut self.starts);
        let mut need = radix_digit(&mut scratch, items, m, key, DIGITS[0], out, &mut cand);
        // The remaining digits over the ties only; the digit-0 prefix is implied by
        // membership.
        for &digit in &DIGITS[1..] {
            if need == 0 || need == cand.len() {
                break;
            }
            need = radix_digit(&mut scratch, &cand[..], need, key, digit, out, &mut next);
            std::mem::swap(&mut cand, &mut next);
        }
        // All remaining ties share the full key; they are in ascending index order.
        out.extend_from_slice(&cand[..need]);
        self.cand = cand;
        self.next = next;
        out[start..].sort_unstable();
    }
}

/// One radix digit `(shift, bits)` over `items`, of which the `need` smallest are wanted:
/// appends to `out` every item whose digit is below the pivot digit (the digit of the
/// `need`-th smallest), writes those at the pivot to `ties` (replacing its contents), both in
/// item order, and returns how many of the ties are still needed.
fn radix_digit<S, K>(
    (hist, starts): &mut (&mut Vec<u32>, &mut Vec<(usize, usize)>),
    items: &S,
    need: usize,
    key: &K,
    (shift, bits): (u32, u32),
    out: &mut Vec<u32>,
    ties: &mut Vec<u32>,
) -> usize
where
    S: Items + ?Sized,
    K: Fn(u32) -> u32 + Sync,
{
    let len = items.len();
    let cl = chunk_len(len);
    let chunks = len.div_ceil(cl);
    let width = 1usize << bits;
    let mask = (width - 1) as u32;
    let digit = |i: u32| ((key(i) >> shift) & mask) as usize;
    let chunk = |c: usize| c * cl..((c + 1) * cl).min(len);
    if hist.len() < chunks * width {
        hist.resize(chunks * width, 0);
    }
    let hists = &mut hist[..chunks * width];
    let count = |c: usize, h: &mut [u32]| {
        h.fill(0);
        for j in chunk(c) {
            h[digit(items.at(j))] += 1;
        }
    };
    if chunks == 1 {
        count(0, hists);
    } else {
        hists
            .par_chunks_mut(width)
            .enumerate()
            .for_each(|(c, h)| count(c, h));
    }
    // The pivot from the merged histogram: integer sums, the same for any chunking.
    let (mut below, mut pivot) = (0usize, 0usize);
    loop {
        let c: usize = (0..chunks).map(|c| hists[c * width + pivot] as usize).sum();
        if below + c >= need {
            break;
        }
        below += c;
        pivot += 1;
    }
    // Each chunk's exact spans of the two outputs.
    starts.clear();
    let (mut lo, mut eq) = (0usize, 0usize);
    for h in hists.chunks(width) {
        starts.push((lo, eq));
        lo += h[..pivot].iter().map(|&x| x as usize).sum::<usize>();
        eq += h[pivot] as usize;
    }
    starts.push((lo, eq));
    let at = out.len();
    out.resize(at + lo, 0);
    ties.clear();
    ties.resize(eq, 0);
    let emit = |c: usize, lower: &mut [u32], tied: &mut [u32]| {
        let (mut a, mut b) = (0, 0);
        for j in chunk(c) {
            let i = items.at(j);
            let d = digit(i);
            if d < pivot {
                lower[a] = i;
                a += 1;
            } else if d == pivot {
                tied[b] = i;
                b += 1;
            }
        }
    };
    for_spans(0..chunks, &starts[..], &mut out[at..], ties, &emit);
    need - below
}

/// The sampled path's filter for any key: writes the items `j in range` with
/// `key(items.at(j)) <= t` to `span`; stops once past `cap`; returns how many it wrote.
fn filter_keys<S, K>(
    items: &S,
    key: &K,
    range: Range<usize>,
    t: u32,
    span: &mut [u32],
    cap: usize,
) -> usize
where
    S: Items + ?Sized,
    K: Fn(u32) -> u32,
{
    let mut n = 0;
    for j in range {
        let i = items.at(j);
        if key(i) <= t {
            span[n] = i;
            n += 1;
            if n > cap {
                break;
            }
        }
    }
    n
}

/// The sampled path's filter for the magnitude key over a slice `xs` starting at index
/// `base`: the indices with `|x| bits >= floor`, tested in 64-element blocks (vectorised),
/// written to `span`; stops once past `cap`; returns how many it wrote.
fn filter_magnitude(xs: &[f32], base: u32, floor: u32, span: &mut [u32], cap: usize) -> usize {
    const B: usize = 64;
    let hit = |x: f32| (x.to_bits() & 0x7FFF_FFFF) >= floor;
    let emit = |n: &mut usize, span: &mut [u32], at: usize, xs: &[f32]| {
        for (j, &x) in xs.iter().enumerate() {
            if hit(x) {
                span[*n] = base + (at + j) as u32;
                *n += 1;
            }
        }
    };
    let mut n = 0;
    let blocks = xs.chunks_exact(B);
    let tail = blocks.remainder();
    for (b, block) in blocks.enumerate() {
        // A max over the block's magnitude bits vectorises into one compare per block.
        if block
            .iter()
            .fold(0, |a, &x| a.max(x.to_bits() & 0x7FFF_FFFF))
            >= floor
        {
            emit(&mut n, span, b * B, block);
            if n > cap {
                return n;
            }
        }
    }
    emit(&mut n, span, xs.len() - tail.len(), tail);
    n
}

/// Sampling needs a stride of at least 2 to read less than the group, and a target well
/// below the group size to filter much out; otherwise the exact select is cheaper.
fn sampling_pays(len: usize, m: usize) -> bool {
    len >= 2 * SAMPLE && m <= len / 8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(keys: &[u32], m: usize) -> Vec<u32> {
        let mut v: Vec<(u32, u32)> = keys
            .iter()
            .enumerate()
            .map(|(i, &k)| (k, i as u32))
            .collect();
        v.sort();
        let mut out: Vec<u32> = v[..m.min(keys.len())].iter().map(|p| p.1).collect();
        out.sort();
        out
    }

    #[test]
    fn matches_sort_on_random_and_tied_keys() {
        let mut s = Selector::with_capacity(0);
        let mut state = 12345u64;
        for &n in &[0usize, 1, 5, 4096, 4097, 20_000] {
            for &spread in &[u32::MAX, 1000, 3, 0] {
                let keys: Vec<u32> = (0..n)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let x = (state >> 32) as u32;
                        if spread == u32::MAX {
                            x
                        } else if spread == 0 {
                            7
                        } else {
                            x % spread
                        }
                    })
                    .collect();
                for &m in &[0, 1, n / 3, n.saturating_sub(1), n, n + 4] {
                    let mut out = vec![];
                    s.select(&(0..n as u32), m, |i| keys[i as usize], &mut out);
                    assert_eq!(out, reference(&keys, m), "n={n} spread={spread} m={m}");
                }
            }
        }
    }

    #[test]
    fn magnitude_fast_path_matches_generic_select() {
        let mut state = 99u64;
        let mut s = Selector::default();
        for &n in &[4097usize, 50_000, 300_001] {
            for &levels in &[0u32, 5, 1] {
                let p: Vec<f32> = (0..n)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let u = (state >> 40) as u32;
                        let v = if levels == 0 {
                            f32::from_bits(u & 0x3FFF_FFFF)
                        } else {
                            (u % levels) as f32
                        };
                        if u & 1 == 1 { -v } else { v }
                    })
                    .collect();
                for &(lo, hi) in &[(0, n), (3, n - 5)] {
                    for &m in &[1usize, 17, (hi - lo) / 100, (hi - lo) / 9] {
                        let (mut a, mut b) = (vec![], vec![]);
                        s.select_top_magnitude(&p, lo..hi, m, &mut a);
                        s.select(
                            &(lo as u32..hi as u32),
                            m,
                            |i| magnitude_key(p[i as usize]),
                            &mut b,
                        );
                        let mut c: Vec<(u32, u32)> =
                            (lo..hi).map(|i| (magnitude_key(p[i]), i as u32)).collect();
                        c.sort();
                        let mut want: Vec<u32> = c[..m].iter().map(|x| x.1).collect();
                        want.sort();
                        assert_eq!(a, want, "fast n={n} levels={levels} m={m}");
                        assert_eq!(b, want, "generic n={n} levels={levels} m={m}");
                    }
                }
            }
        }
    }

    #[test]
    fn selects_from_an_index_list() {
        let keys: Vec<u32> = (0..10_000u32)
            .map(|i| i.wrapping_mul(2654435761) >> 7)
            .collect();
        let list: Vec<u32> = (0..10_000u32).filter(|i| i % 3 == 0).collect();
        let mut out = vec![];
        Selector::default().select(&list[..], 100, |i| keys[i as usize], &mut out);
        let mut v: Vec<(u32, u32)> = list.iter().map(|&i| (keys[i as usize], i)).collect();
        v.sort();
        let mut want: Vec<u32> = v[..100].iter().map(|p| p.1).collect();
        want.sort();
        assert_eq!(out, want);
    }
}
