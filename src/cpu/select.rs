//! O(n) selection of the `m` smallest `(key, index)` pairs: the one primitive behind top-r
//! (key = inverted magnitude bits) and random-k (key = Philox word).
//!
//! Large groups use a three-digit radix select (11 + 11 + 10 bits): one histogram pass over
//! the group, one pass that emits everything below the pivot digit and compacts the ties
//! into a candidate list, then the same on the (usually tiny) candidate list. Small groups
//! use introselect on packed `(key << 32) | index` words, which is cheaper than clearing a
//! 2048-bin histogram for a handful of elements.

/// Groups up to this size take the packed-word path.
const SMALL: usize = 4096;
/// Target sample size of the sampled path: enough for a tight threshold, small enough that
/// selecting in it costs little next to the filtering pass.
const SAMPLE: usize = 1 << 15;
const DIGITS: [(u32, u32); 3] = [(21, 11), (10, 11), (0, 10)];

/// The magnitude order of SPEC §1 as a key where smaller sorts first: larger `|x|` (IEEE bits,
/// sign cleared) gives a smaller key. Callers exclude NaN beforehand.
#[inline(always)]
pub fn magnitude_key(x: f32) -> u32 {
    0x7FFF_FFFF ^ (x.to_bits() & 0x7FFF_FFFF)
}

/// Reusable scratch for [`Selector::select`]; allocating it once per plan keeps steps
/// allocation-free.
#[derive(Debug, Default)]
pub struct Selector {
    hist: Vec<u32>,
    cand: Vec<u32>,
    next: Vec<u32>,
    /// Candidates of the sampled path (kept apart from the radix path's lists).
    filtered: Vec<u32>,
    packed: Vec<u64>,
}

impl Selector {
    /// Scratch sized for groups of up to `max_group` elements.
    pub fn with_capacity(max_group: usize) -> Self {
        Self {
            hist: vec![0; 1 << 11],
            cand: Vec::with_capacity(max_group),
            next: Vec::with_capacity(max_group),
            filtered: Vec::with_capacity(max_group),
            // Exact path: up to SMALL words; sampled path: at most max_group / stride words.
            packed: Vec::with_capacity(
                max_group.min(SMALL.max(2 * SAMPLE).max(max_group / 1024 + 1)),
            ),
        }
    }

    /// Appends to `out` the indices of the `m` smallest `(key(i), i)` over `items`, in
    /// ascending index order. `items` must yield ascending indices (a range or a sorted list),
    /// which is what makes ties resolve to the lower index without comparing indices.
    pub fn select<I, K>(&mut self, items: I, m: usize, key: K, out: &mut Vec<u32>)
    where
        I: ExactSizeIterator<Item = u32> + Clone,
        K: Fn(u32) -> u32,
    {
        let len = items.len();
        let m = m.min(len);
        let start = out.len();
        if m == 0 {
            return;
        }
        if m == len {
            out.extend(items);
            return;
        }
        if !sampling_pays(len, m) || !self.select_sampled(items.clone(), m, &key, out) {
            self.select_exact(items, m, &key, out);
        }
        out[start..].sort_unstable();
    }

    /// Introselect on packed words for short lists, radix select otherwise; appends unsorted.
    fn select_exact<I, K>(&mut self, items: I, m: usize, key: &K, out: &mut Vec<u32>)
    where
        I: ExactSizeIterator<Item = u32> + Clone,
        K: Fn(u32) -> u32,
    {
        if items.len() <= SMALL {
            self.packed.clear();
            self.packed
                .extend(items.map(|i| (u64::from(key(i)) << 32) | u64::from(i)));
            self.packed.select_nth_unstable(m - 1);
            out.extend(self.packed[..m].iter().map(|&w| w as u32));
        } else {
            self.select_radix(items, m, key, out);
        }
    }

    /// [`Selector::select`] with the magnitude key over the contiguous `p[range]`, where the
    /// filtering pass runs over the slice in blocks that the compiler vectorises.
    pub fn select_top_magnitude(
        &mut self,
        p: &[f32],
        range: std::ops::Range<usize>,
        m: usize,
        out: &mut Vec<u32>,
    ) {
        let len = range.len();
        let m = m.min(len);
        let key = |i: u32| magnitude_key(p[i as usize]);
        let items = range.start as u32..range.end as u32;
        if m == 0 || m == len || !sampling_pays(len, m) {
            return self.select(items, m, key, out);
        }
        let start = out.len();
        let xs = &p[range.clone()];
        let stride = (len / SAMPLE).clamp(1, 1024);
        self.packed.clear();
        self.packed.extend(
            xs.iter()
                .step_by(stride)
                .map(|&x| u64::from(magnitude_key(x))),
        );
        let s = self.packed.len();
        let expected = m as f64 * s as f64 / len as f64;
        let rank = (expected + 4.0 * expected.sqrt() + 8.0).ceil() as usize;
        let cap = 4 * rank * stride + SMALL;
        let mut cand = std::mem::take(&mut self.filtered);
        cand.clear();
        if rank < s {
            // key <= t  <=>  |x| bits >= floor.
            let floor = 0x7FFF_FFFF ^ (*self.packed.select_nth_unstable(rank).1 as u32);
            const B: usize = 16;
            let blocks = xs.chunks_exact(B);
            let tail = blocks.remainder();
            let hit = |x: &f32| (x.to_bits() & 0x7FFF_FFFF) >= floor;
            for (b, block) in blocks.enumerate() {
                if block.iter().fold(false, |a, x| a | hit(x)) {
                    let base = (range.start + b * B) as u32;
                    cand.extend(
                        (0..B as u32)
                            .filter(|&j| hit(&block[j as usize]))
                            .map(|j| base + j),
                    );
                    if cand.len() > cap {
                        break;
                    }
                }
            }
            let base = (range.end - tail.len()) as u32;
            cand.extend(
                (0..tail.len() as u32)
                    .filter(|&j| hit(&tail[j as usize]))
                    .map(|j| base + j),
            );
        }
        if cand.len() >= m && cand.len() <= cap {
            self.select_exact(cand.iter().copied(), m, &key, out);
        } else {
            self.select_radix(items, m, &key, out);
        }
        out[start..].sort_unstable();
        self.filtered = cand;
    }

    /// One pass instead of two for the usual case `m << len`: a strided sample of the keys
    /// gives a threshold `t` that, with overwhelming probability, a little more than `m`
    /// elements reach; one filtering pass keeps every `key <= t` (ties included, in index
    /// order) and an exact select on those finishes. Returns false, having appended nothing,
    /// when the sample misjudged (too few or far too many candidates); the caller then runs
    /// the radix select, so the answer never depends on the sample.
    fn select_sampled<I, K>(&mut self, items: I, m: usize, key: &K, out: &mut Vec<u32>) -> bool
    where
        I: ExactSizeIterator<Item = u32> + Clone,
        K: Fn(u32) -> u32,
    {
        let len = items.len();
        let stride = (len / SAMPLE).clamp(1, 1024);
        self.packed.clear();
        self.packed
            .extend(items.clone().step_by(stride).map(|i| u64::from(key(i))));
        let s = self.packed.len();
        let expected = m as f64 * s as f64 / len as f64;
        let rank = (expected + 4.0 * expected.sqrt() + 8.0).ceil() as usize;
        if rank >= s {
            return false;
        }
        let threshold = *self.packed.select_nth_unstable(rank).1 as u32;
        let cap = 4 * rank * stride + SMALL;
        let mut cand = std::mem::take(&mut self.filtered);
        cand.clear();
        for i in items {
            if key(i) <= threshold {
                cand.push(i);
                if cand.len() > cap {
                    break;
                }
            }
        }
        let ok = cand.len() >= m && cand.len() <= cap;
        if ok {
            self.select_exact(cand.iter().copied(), m, key, out);
        }
        self.filtered = cand;
        ok
    }

    /// Three-digit radix select; appends the `m` smallest (unsorted) to `out`.
    fn select_radix<I, K>(&mut self, items: I, m: usize, key: &K, out: &mut Vec<u32>)
    where
        I: ExactSizeIterator<Item = u32> + Clone,
        K: Fn(u32) -> u32,
    {
        if self.hist.len() < 1 << 11 {
            self.hist.resize(1 << 11, 0);
        }

        // Digit 0 over the whole group.
        let (shift, bits) = DIGITS[0];
        let mask = (1u32 << bits) - 1;
        let hist = &mut self.hist[..1 << bits];
        hist.fill(0);
        for i in items.clone() {
            hist[((key(i) >> shift) & mask) as usize] += 1;
        }
        let (pivot, mut need) = find_pivot(hist, m);
        self.cand.clear();
        for i in items {
            let d = (key(i) >> shift) & mask;
            if d < pivot {
                out.push(i);
            } else if d == pivot {
                self.cand.push(i);
            }
        }

        // The remaining digits over the candidates only; `prefix_ok` is implied by membership.
        for &(shift, bits) in &DIGITS[1..] {
            if need == 0 || need == self.cand.len() {
                break;
            }
            let mask = (1u32 << bits) - 1;
            let hist = &mut self.hist[..1 << bits];
            hist.fill(0);
            for &i in &self.cand {
                hist[((key(i) >> shift) & mask) as usize] += 1;
            }
            let (pivot, rest) = find_pivot(hist, need);
            self.next.clear();
            for &i in &self.cand {
                let d = (key(i) >> shift) & mask;
                if d < pivot {
                    out.push(i);
                } else if d == pivot {
                    self.next.push(i);
                }
            }
            need = rest;
            std::mem::swap(&mut self.cand, &mut self.next);
        }
        // All remaining candidates share the full key; they are in ascending index order.
        out.extend_from_slice(&self.cand[..need]);
    }
}

/// Sampling needs a stride of at least 2 to read less than the group, and a target well
/// below the group size to filter much out; otherwise the exact select is cheaper.
fn sampling_pays(len: usize, m: usize) -> bool {
    len >= 2 * SAMPLE && m <= len / 8
}

/// The digit `d` whose bin holds the `m`-th smallest element, and how many of that bin are
/// still needed after taking every smaller digit.
fn find_pivot(hist: &[u32], m: usize) -> (u32, usize) {
    let mut below = 0usize;
    for (d, &c) in hist.iter().enumerate() {
        let c = c as usize;
        if below + c >= m {
            return (d as u32, m - below);
        }
        below += c;
    }
    unreachable!("m <= number of items")
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
                    s.select(0..n as u32, m, |i| keys[i as usize], &mut out);
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
                            lo as u32..hi as u32,
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
        Selector::default().select(list.iter().copied(), 100, |i| keys[i as usize], &mut out);
        let mut v: Vec<(u32, u32)> = list.iter().map(|&i| (keys[i as usize], i)).collect();
        v.sort();
        let mut want: Vec<u32> = v[..100].iter().map(|p| p.1).collect();
        want.sort();
        assert_eq!(out, want);
    }
}
