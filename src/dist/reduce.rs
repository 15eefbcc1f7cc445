//! Reductions whose traffic does not grow with the number of workers (docs/SPEC.md §12).
//!
//! The all-gather of [`Transport::all_gather`] makes every rank receive every other rank's
//! payload: `(K - 1) k` entries per step, which at `K = 100` and `k = 1%` is more than the
//! dense gradient. Two schemes keep a rank's traffic near `2k` entries whatever `K`:
//!
//! - [`Reduce::SharedRandomK`]: every worker draws random-k with the same key (SPEC §3,
//!   `w = 0`), so every worker sends the same indices and only the `k` values need summing:
//!   an ordinary all-reduce of `k` f32s (SPEC §12's worker-order all-reduce).
//! - [`Reduce::Sparse`]: a sparse all-reduce of top-k / rTop-k payloads in the Ok-Topk
//!   family ([`SparseAllReduce`]): the index space is split into `K` regions (balanced by
//!   the last step's selection, which every rank holds), each region's
//!   contributions are aggregated at its owner (an all-to-all), the global top-k of the
//!   aggregate is selected with a distributed radix select (histograms all-reduced), and the
//!   selected entries are all-gathered. What a worker sent that the global selection drops
//!   returns to its residual ([`crate::Compress::refund`]), so error feedback stays exact.
//!
//! Both are written once over [`Transport`], so the simulation ([`super::InProcess`]) and
//! MPI run the same code and give the same bits; the all-reduce sums in worker order (its
//! owner adds the `K` pieces `w = 0..K-1`), never in the order a network delivers them.

use super::Transport;
use crate::contract::{magnitude_key, reciprocals};
use crate::{Average, Config, DType, Error, Group, Layout, Payload, Result, SparsePayload, wire};
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// How a compressed step's payloads travel and are summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reduce {
    /// Every worker's encoded payload goes to every worker, which aggregates all `K` (SPEC
    /// §7). A rank receives `(K - 1)` payloads per step.
    #[default]
    AllGather,
    /// The sparse all-reduce of SPEC §12 (top-k and rTop-k): a rank receives about `2k`
    /// entries per step, plus the selection's histograms on the steps that recompute the
    /// threshold.
    Sparse,
    /// Random-k drawn with one key for all workers (SPEC §3), its `k` values summed by an
    /// all-reduce: a rank receives about `2k` values per step.
    SharedRandomK,
}

impl Reduce {
    /// Every scheme, in the order the CLI lists them.
    pub const ALL: [Reduce; 3] = [Reduce::AllGather, Reduce::Sparse, Reduce::SharedRandomK];

    /// The CLI's name: "allgather", "sparse", "shared-randomk".
    pub fn name(self) -> &'static str {
        match self {
            Reduce::AllGather => "allgather",
            Reduce::Sparse => "sparse",
            Reduce::SharedRandomK => "shared-randomk",
        }
    }
}

impl fmt::Display for Reduce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Reduce {
    type Err = Error;

    /// # Examples
    /// ```
    /// use gradsift::dist::reduce::Reduce;
    /// assert_eq!("sparse".parse::<Reduce>()?, Reduce::Sparse);
    /// assert!("ring".parse::<Reduce>().is_err());
    /// # Ok::<(), gradsift::Error>(())
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        Reduce::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| {
                Error::InvalidConfig(format!(
                    "unknown reduction `{s}`: one of allgather, sparse, shared-randomk"
                ))
            })
    }
}

/// Bytes each local worker received from other workers (its own pieces excluded), summed
/// over the calls that were given it: what a network would have carried to it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Traffic {
    /// Bytes received, per local worker (in `Transport::local` order).
    pub received: Vec<u64>,
}

impl Traffic {
    /// The bytes summed over the local workers.
    pub fn total(&self) -> u64 {
        self.received.iter().sum()
    }

    /// Zeroes the counters (keeps the allocation).
    pub fn clear(&mut self) {
        self.received.iter_mut().for_each(|r| *r = 0);
    }

    fn slot(&mut self, i: usize) -> &mut u64 {
        if self.received.len() <= i {
            self.received.resize(i + 1, 0);
        }
        &mut self.received[i]
    }

    /// Counts what the local workers received in `out` of an all-to-all (`out[i * K + w]`
    /// from worker `w`).
    pub fn all_to_all(&mut self, local: Range<usize>, workers: usize, out: &[Vec<u8>]) {
        for (i, me) in local.enumerate() {
            for (w, piece) in out[i * workers..(i + 1) * workers].iter().enumerate() {
                if w != me {
                    *self.slot(i) += piece.len() as u64;
                }
            }
        }
    }

    /// Counts what the local workers received in `out` of an all-gather (`out[w]` from
    /// worker `w`, received by every local worker).
    pub fn all_gather(&mut self, local: Range<usize>, out: &[Vec<u8>]) {
        for (i, me) in local.enumerate() {
            for (w, piece) in out.iter().enumerate() {
                if w != me {
                    *self.slot(i) += piece.len() as u64;
                }
            }
        }
    }
}

impl Traffic {
    /// Counts what the local workers receive in an [`Transport::all_reduce_sum`] of
    /// `bytes` per worker, as recursive doubling moves it (SPEC §12): with `p` the largest
    /// power of two `<= K`, a worker `w >= p` receives the result once; the others receive
    /// `bytes` in each of the `log2 p` rounds, and `w < K - p` once more (the word of
    /// worker `w + p`, folded in first).
    pub fn recursive_doubling(&mut self, local: Range<usize>, workers: usize, bytes: usize) {
        if workers < 2 {
            return;
        }
        let p = 1usize << (usize::BITS - 1 - workers.leading_zeros());
        for (i, w) in local.enumerate() {
            let rounds = if w >= p {
                1
            } else {
                p.trailing_zeros() as u64 + u64::from(w < workers - p)
            };
            *self.slot(i) += rounds * bytes as u64;
        }
    }
}

/// Start of region `j` of `K` over `n` indices: `floor(j n / K)` (SPEC §12); region `j` is
/// `region_start(n, K, j)..region_start(n, K, j + 1)`.
///
/// # Examples
/// ```
/// use gradsift::dist::reduce::region_start;
/// assert_eq!((0..=3).map(|j| region_start(10, 3, j)).collect::<Vec<_>>(), [0, 3, 6, 10]);
/// ```
pub fn region_start(n: usize, workers: usize, j: usize) -> usize {
    (j as u128 * n as u128 / workers.max(1) as u128) as usize
}

fn transport_err(reason: String) -> Error {
    Error::Transport {
        transport: "reduce",
        reason,
    }
}

/// A fixed-width value that travels little-endian.
trait Word: Copy + Default {
    const BYTES: usize;
    fn put(self, out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
    fn add(self, other: Self) -> Self;
}

impl Word for f32 {
    const BYTES: usize = 4;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    fn add(self, other: Self) -> Self {
        self + other
    }
}

impl Word for u32 {
    const BYTES: usize = 4;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    fn add(self, other: Self) -> Self {
        self.wrapping_add(other)
    }
}

/// Buffers of the collectives, kept between steps so that a step allocates nothing once
/// they have grown.
#[derive(Debug, Default)]
struct Wires {
    send: Vec<Vec<u8>>,
    recv: Vec<Vec<u8>>,
    gathered: Vec<Vec<u8>>,
}

impl Wires {
    fn all_to_all(&mut self, t: &mut dyn Transport, traffic: &mut Traffic) -> Result<()> {
        let views: Vec<&[u8]> = self.send.iter().map(|b| b.as_slice()).collect();
        t.all_to_all(&views, &mut self.recv)?;
        traffic.all_to_all(t.local(), t.workers(), &self.recv);
        Ok(())
    }

    fn all_gather(&mut self, t: &mut dyn Transport, traffic: &mut Traffic) -> Result<()> {
        let views: Vec<&[u8]> = self.send.iter().map(|b| b.as_slice()).collect();
        t.all_gather(&views, &mut self.gathered)?;
        traffic.all_gather(t.local(), &self.gathered);
        Ok(())
    }

    fn reset_send(&mut self, pieces: usize) {
        self.send.resize_with(pieces, Vec::new);
        self.send.iter_mut().for_each(Vec::clear);
    }
}

/// The all-reduce of SPEC §12 on `m` words per worker: region `j` of the `m` positions
/// goes to worker `j` (an all-to-all), which sums the `K` pieces in worker order starting
/// from zero, and the sums are all-gathered. `check` sees each received piece's header
/// (`head` bytes, written by `header` on the sending side) before its words are used.
fn all_reduce<T: Word>(
    t: &mut dyn Transport,
    wires: &mut Wires,
    local: &[&[T]],
    out: &mut [T],
    head: &[u8],
    check: &dyn Fn(usize, &[u8]) -> Result<()>,
    traffic: &mut Traffic,
) -> Result<()> {
    let k = t.workers();
    let range = t.local();
    let m = out.len();
    if local.len() != range.len() || local.iter().any(|l| l.len() != m) {
        return Err(Error::LengthMismatch {
            what: "all-reduce inputs (one of the output's length per local worker)",
            expected: m,
            got: local
                .iter()
                .map(|l| l.len())
                .find(|&l| l != m)
                .unwrap_or(local.len()),
        });
    }
    wires.reset_send(range.len() * k);
    for (i, l) in local.iter().enumerate() {
        for j in 0..k {
            let b = &mut wires.send[i * k + j];
            b.extend_from_slice(head);
            for &x in &l[region_start(m, k, j)..region_start(m, k, j + 1)] {
                x.put(b);
            }
        }
    }
    wires.all_to_all(t, traffic)?;
    wires.reset_send(range.len());
    for (i, owner) in range.clone().enumerate() {
        let (lo, hi) = (region_start(m, k, owner), region_start(m, k, owner + 1));
        let want = head.len() + (hi - lo) * T::BYTES;
        let b = &mut wires.send[i];
        for w in 0..k {
            let piece = &wires.recv[i * k + w];
            if piece.len() != want {
                return Err(transport_err(format!(
                    "all-reduce: worker {w} sent {} bytes for region {owner}, expected {want}",
                    piece.len()
                )));
            }
            check(w, &piece[..head.len()])?;
        }
        for x in 0..hi - lo {
            let mut sum = T::default();
            for w in 0..k {
                let at = head.len() + x * T::BYTES;
                sum = sum.add(T::get(&wires.recv[i * k + w][at..]));
            }
            sum.put(b);
        }
    }
    wires.all_gather(t, traffic)?;
    for owner in 0..k {
        let (lo, hi) = (region_start(m, k, owner), region_start(m, k, owner + 1));
        let piece = &wires.gathered[owner];
        if piece.len() != (hi - lo) * T::BYTES {
            return Err(transport_err(format!(
                "all-reduce: region {owner} came back with {} bytes, expected {}",
                piece.len(),
                (hi - lo) * T::BYTES
            )));
        }
        for (o, c) in out[lo..hi].iter_mut().zip(piece.chunks_exact(T::BYTES)) {
            *o = T::get(c);
        }
    }
    Ok(())
}

/// The selection's integer all-reduce (SPEC §12): short vectors through the transport's
/// own [`Transport::all_reduce_sum`] (`log2 K` rounds), longer ones through the
/// worker-order all-reduce (two collectives of `K - 1` messages, the vector sent about twice).
fn sum_counts(
    t: &mut dyn Transport,
    wires: &mut Wires,
    local: &[&[u32]],
    out: &mut [u32],
    traffic: &mut Traffic,
) -> Result<()> {
    if out.len() * u32::BYTES > super::DOUBLING_MAX_BYTES {
        return all_reduce(t, wires, local, out, &[], &|_, _| Ok(()), traffic);
    }
    t.all_reduce_sum(local, out)?;
    traffic.recursive_doubling(t.local(), t.workers(), out.len() * u32::BYTES);
    Ok(())
}

/// 64-bit FNV-1a of a list of indices: the check that every worker of a shared-key
/// random-k drew the same ones.
fn index_hash(indices: &[u32]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for i in indices {
        for b in i.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// [`Reduce::SharedRandomK`] (SPEC §12): the payloads of this process's workers, which
/// must hold the same indices (random-k with one key for all workers, `Config::worker` the
/// same on every worker), are summed by SPEC §12's all-reduce in worker order,
/// and `update` becomes `sum_i * inv` at those indices and 0 elsewhere, with
/// `inv = f32(1/K)` (every worker sent every index, so both averaging rules agree). The
/// bits are those of [`crate::Aggregate::aggregate`] over the same payloads.
///
/// # Errors
/// [`Error::LengthMismatch`] when `local` does not hold one payload per local worker or
/// `update` is not `n` long; [`Error::Transport`] when a worker drew other indices (the
/// pieces carry a hash of them) or a collective fails.
pub fn shared_randomk(
    t: &mut dyn Transport,
    local: &[&SparsePayload],
    update: &mut [f32],
    traffic: &mut Traffic,
    scratch: &mut SharedScratch,
) -> Result<()> {
    let first = local.first().ok_or(Error::LengthMismatch {
        what: "payloads (one per local worker)",
        expected: t.local().len(),
        got: 0,
    })?;
    if update.len() != first.n as usize {
        return Err(Error::LengthMismatch {
            what: "update",
            expected: first.n as usize,
            got: update.len(),
        });
    }
    let hash = index_hash(&first.indices);
    for (i, p) in local.iter().enumerate() {
        if p.n != first.n || index_hash(&p.indices) != hash {
            return Err(transport_err(format!(
                "shared-randomk: local worker {} drew other indices than worker {}; every worker must run random-k with the same seed and key (Config::worker)",
                t.local().start + i,
                t.local().start
            )));
        }
    }
    let values: Vec<&[f32]> = local.iter().map(|p| p.values.as_slice()).collect();
    scratch.sums.resize(first.values.len(), 0.0);
    let head = hash.to_le_bytes();
    let check = |w: usize, h: &[u8]| {
        if h != head {
            return Err(transport_err(format!(
                "shared-randomk: worker {w} drew other indices; every worker must run random-k with the same seed and key (Config::worker)"
            )));
        }
        Ok(())
    };
    all_reduce(
        t,
        &mut scratch.wires,
        &values,
        &mut scratch.sums,
        &head,
        &check,
        traffic,
    )?;
    let inv = reciprocals(t.workers())[t.workers()];
    update.fill(0.0);
    for (&i, &s) in first.indices.iter().zip(&scratch.sums) {
        update[i as usize] = s * inv;
    }
    Ok(())
}

/// The buffers [`shared_randomk`] keeps between steps.
#[derive(Debug, Default)]
pub struct SharedScratch {
    wires: Wires,
    sums: Vec<f32>,
}

/// The candidates (ascending index) that fall in a group's range.
fn in_group<'a>(c: &'a [(u32, f32, u32)], r: &Range<usize>) -> &'a [(u32, f32, u32)] {
    let a = c.partition_point(|e| (e.0 as usize) < r.start);
    let b = a + c[a..].partition_point(|e| (e.0 as usize) < r.end);
    &c[a..b]
}

/// Radix digits of the distributed selection: 4 rounds of 8 bits over the 32-bit keys.
const DIGIT_BITS: u32 = 8;
const BINS: usize = 1 << DIGIT_BITS;

/// [`Reduce::Sparse`]: the sparse all-reduce of SPEC §12, planned once for a layout, a
/// configuration's groups (their `k`), an averaging rule and `K` workers; it owns every
/// buffer of the exchange and the thresholds it reuses.
///
/// # Examples
/// ```
/// use gradsift::dist::{InProcess, reduce::{SparseAllReduce, Traffic}};
/// use gradsift::{Average, Config, Layout, SparsePayload, DType};
/// let layout = Layout::new(&[6])?;
/// let mut plan = SparseAllReduce::new(&layout, &Config::topk(1.0 / 6.0), Average::OverWorkers, 2, 1)?;
/// let p = |i: Vec<u32>, v: Vec<f32>| SparsePayload { n: 6, values_dtype: DType::F32, indices: i, values: v };
/// let (a, b) = (p(vec![1], vec![4.0]), p(vec![4], vec![-2.0]));
/// let (mut update, mut refunds) = (vec![0.0; 6], Vec::new());
/// plan.reduce(&mut InProcess::new(2), &[&a, &b], 0, &mut update, &mut refunds, &mut Traffic::default())?;
/// assert_eq!(update, [0.0, 2.0, 0.0, 0.0, 0.0, 0.0]); // the global top-1 of the mean
/// assert_eq!(refunds[1].indices, [4]); // worker 1's entry returns to its residual
/// # Ok::<(), gradsift::Error>(())
/// ```
#[derive(Debug)]
pub struct SparseAllReduce {
    n: usize,
    workers: usize,
    groups: Vec<(Range<usize>, usize)>,
    rule: Average,
    inv: Vec<f32>,
    threshold_every: u64,
    /// The last exact step's threshold keys, one per group (`None`: selects nothing), and
    /// the steps since.
    thresholds: Option<Vec<Option<u32>>>,
    since_exact: u64,
    /// `K + 1` region boundaries, balanced by the last selection (SPEC §12).
    bounds: Vec<usize>,
    wires: Wires,
    piece: Payload,
    /// Every owner's decoded selection.
    picked: Vec<Payload>,
    /// (index, worker, value) of one owner's region, sorted by index then worker.
    entries: Vec<(u32, u32, f32)>,
    /// Per local owner: the aggregated candidates (index, value, key), ascending index.
    cands: Vec<Vec<(u32, f32, u32)>>,
    /// Per local owner: the selected (index, value), ascending index.
    chosen: Vec<SparsePayload>,
    hist: Vec<u32>,
    summed: Vec<u32>,
    /// Per group: the radix select's state (SPEC §12 phase 2).
    search: Vec<Search>,
    /// Per local owner and group: the threshold ties the lower regions hold.
    before: Vec<u64>,
    selected: Vec<u32>,
    sent: Vec<u64>,
}

/// What the radix select knows of one group.
#[derive(Debug, Clone, Copy, Default)]
struct Search {
    /// The group's union has at most `k_g` candidates: all of them are selected.
    all: bool,
    /// Key bits fixed so far.
    prefix: u32,
    /// Rank, from 1, of the `k_g`-th key among those that share the prefix (0 when `all`
    /// or `k_g = 0`).
    need: u64,
    /// Candidates sharing the prefix's digit of the last round (after the last round: the
    /// threshold's ties).
    ties: u64,
    /// With `all`: the upper end of the top digit bin of the largest key.
    all_bound: u32,
}

impl Search {
    fn searching(&self) -> bool {
        !self.all && self.need > 0
    }

    /// The key the reuse steps select up to; `None`: nothing.
    fn threshold(&self) -> Option<u32> {
        if self.all {
            Some(self.all_bound)
        } else if self.need > 0 {
            Some(self.prefix)
        } else {
            None
        }
    }
}

impl SparseAllReduce {
    /// Plans the reduction of `config`'s sparse payloads (its groups and their `k`, SPEC §2)
    /// over `layout` for `workers` workers; the threshold is computed exactly every
    /// `threshold_every` steps (1: every step) and reused in between.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `config` is not a sparse method, `workers == 0` or
    /// `threshold_every == 0`, or the configuration does not plan on the layout.
    pub fn new(
        layout: &Layout,
        config: &Config,
        rule: Average,
        workers: usize,
        threshold_every: u64,
    ) -> Result<Self> {
        if !config.is_sparse() {
            return Err(Error::InvalidConfig(
                "the sparse all-reduce needs a sparse method (top-k, rTop-k, random-k)".into(),
            ));
        }
        if workers == 0 || threshold_every == 0 {
            return Err(Error::InvalidConfig(format!(
                "the sparse all-reduce needs K >= 1 workers and a threshold interval >= 1 (got K = {workers}, every {threshold_every})"
            )));
        }
        let groups = config
            .plan_groups(layout)?
            .into_iter()
            .map(|g: Group| (g.range, g.k))
            .collect();
        Ok(Self {
            n: layout.n(),
            workers,
            groups,
            rule,
            inv: reciprocals(workers),
            threshold_every,
            thresholds: None,
            since_exact: 0,
            bounds: (0..=workers)
                .map(|j| region_start(layout.n(), workers, j))
                .collect(),
            wires: Wires::default(),
            piece: Payload::Sparse(SparsePayload::default()),
            picked: Vec::new(),
            entries: Vec::new(),
            cands: Vec::new(),
            chosen: Vec::new(),
            hist: Vec::new(),
            summed: Vec::new(),
            search: Vec::new(),
            before: Vec::new(),
            selected: Vec::new(),
            sent: Vec::new(),
        })
    }

    /// One step's reduction. `local` holds the payloads of this process's workers (as they
    /// came from [`crate::Compress::step`]); afterwards `update` (length `n`) is the
    /// selected aggregate (0 off the selection) on every rank, and `refunds[i]` is what
    /// local worker `i` sent that the selection dropped, for
    /// [`crate::Compress::refund`]. `step` only names the step in error messages.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] for a wrong number of payloads or a wrong `update` length;
    /// [`Error::BadPayload`] for a payload of another length than the plan's `n` or with
    /// unsorted or out-of-range indices; [`Error::Transport`] when a piece from another
    /// rank is corrupt or a collective fails. Nothing is written to `update` or `refunds`
    /// before every piece was checked.
    pub fn reduce(
        &mut self,
        t: &mut dyn Transport,
        local: &[&SparsePayload],
        step: u64,
        update: &mut [f32],
        refunds: &mut Vec<SparsePayload>,
        traffic: &mut Traffic,
    ) -> Result<()> {
        self.check_inputs(t, local, update)?;
        self.scatter(t, local, traffic)?;
        self.aggregate_regions(t, step)?;
        let exact = match &self.thresholds {
            None => true,
            Some(_) => self.since_exact + 1 >= self.threshold_every,
        };
        if exact {
            self.select_exact(t, traffic)?;
            self.since_exact = 0;
        } else {
            self.select_by_threshold();
            self.since_exact += 1;
        }
        self.gather_selection(t, step, update, traffic)?;
        self.fill_refunds(local, refunds);
        self.rebalance();
        Ok(())
    }

    /// The regions of the next call: region `j > 0` starts at the `floor(j s / K)`-th of
    /// this call's `s` selected indices, so that each owner holds about `s / K` of them
    /// (the workers' large entries tend to stay where the last selection was). Every rank
    /// holds the same selection, so every rank computes the same boundaries; the update
    /// does not depend on them, only who receives what (SPEC §12).
    fn rebalance(&mut self) {
        let (k, s) = (self.workers, self.selected.len());
        if s == 0 {
            return;
        }
        for j in 1..k {
            self.bounds[j] = self.selected[((j as u128 * s as u128) / k as u128) as usize] as usize;
        }
    }

    /// Region `j` of the current call: `bounds[j]..bounds[j + 1]`.
    fn region(&self, j: usize) -> (usize, usize) {
        (self.bounds[j], self.bounds[j + 1])
    }

    /// The `K + 1` boundaries of the regions the next call uses: region `j` is
    /// `regions()[j]..regions()[j + 1]` (equal ones, [`region_start`], before the first
    /// call; then balanced by the last selection, SPEC §12).
    pub fn regions(&self) -> &[usize] {
        &self.bounds
    }

    /// The last successful [`SparseAllReduce::reduce`]'s update as entries `(index, value)`
    /// in ascending index order: the global selection `T` with its aggregates, the same on
    /// every rank (`update` is these and 0 elsewhere). Empty before the first reduction; a
    /// failed reduction leaves what is there undefined.
    pub fn selection(&self) -> impl Iterator<Item = (u32, f32)> + '_ {
        self.picked
            .iter()
            .filter_map(Payload::as_sparse)
            .flat_map(|p| p.indices.iter().copied().zip(p.values.iter().copied()))
    }

    /// Bytes each local worker sent in the last step's first collective (its payload split
    /// by region, every piece with its wire header, its own region's included).
    pub fn scattered(&self) -> &[u64] {
        &self.sent
    }

    /// The groups' threshold keys of the last exact step, which the steps until the next
    /// exact one select up to: `magnitude_key` of the smallest magnitude selected, or of a
    /// bound above the union's smallest where a group selected its whole union; `None` for a
    /// group with `k_g = 0`. `None` before the first step.
    pub fn thresholds(&self) -> Option<&[Option<u32>]> {
        self.thresholds.as_deref()
    }

    fn check_inputs(
        &self,
        t: &dyn Transport,
        local: &[&SparsePayload],
        update: &[f32],
    ) -> Result<()> {
        if t.workers() != self.workers || local.len() != t.local().len() {
            return Err(Error::LengthMismatch {
                what: "payloads (one per local worker of a plan's K)",
                expected: t.local().len(),
                got: local.len(),
            });
        }
        if update.len() != self.n {
            return Err(Error::LengthMismatch {
                what: "update",
                expected: self.n,
                got: update.len(),
            });
        }
        for (i, p) in local.iter().enumerate() {
            let reason = if p.n as usize != self.n {
                Some(format!(
                    "it describes {} elements, the plan expects {}",
                    p.n, self.n
                ))
            } else if p.indices.len() != p.values.len() {
                Some(format!(
                    "{} indices but {} values",
                    p.indices.len(),
                    p.values.len()
                ))
            } else if p.indices.windows(2).any(|w| w[0] >= w[1])
                || p.indices.last().is_some_and(|&x| x as usize >= self.n)
            {
                Some("its indices are not strictly ascending below n".to_string())
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(Error::BadPayload { worker: i, reason });
            }
        }
        Ok(())
    }

    /// Phase 1: every local worker's entries of region `j` to worker `j`.
    fn scatter(
        &mut self,
        t: &mut dyn Transport,
        local: &[&SparsePayload],
        traffic: &mut Traffic,
    ) -> Result<()> {
        let k = self.workers;
        self.wires.reset_send(local.len() * k);
        let mut part = SparsePayload {
            n: self.n as u32,
            ..Default::default()
        };
        for (i, p) in local.iter().enumerate() {
            part.values_dtype = p.values_dtype;
            for j in 0..k {
                let (lo, hi) = self.region(j);
                let a = p.indices.partition_point(|&x| (x as usize) < lo);
                let b = a + p.indices[a..].partition_point(|&x| (x as usize) < hi);
                part.indices.clear();
                part.indices.extend_from_slice(&p.indices[a..b]);
                part.values.clear();
                part.values.extend_from_slice(&p.values[a..b]);
                let wrapped = Payload::Sparse(std::mem::take(&mut part));
                let r = wire::encode(&wrapped, &mut self.wires.send[i * k + j]);
                let Payload::Sparse(back) = wrapped else {
                    unreachable!("wrapped above")
                };
                part = back;
                r?;
            }
        }
        self.sent.clear();
        self.sent.extend(
            self.wires
                .send
                .chunks(k)
                .map(|row| row.iter().map(|b| b.len() as u64).sum::<u64>()),
        );
        self.wires.all_to_all(t, traffic)
    }

    /// Each local owner decodes its `K` pieces and aggregates them (SPEC §7 arithmetic).
    fn aggregate_regions(&mut self, t: &dyn Transport, step: u64) -> Result<()> {
        let k = self.workers;
        let range = t.local();
        self.cands.resize_with(range.len(), Vec::new);
        for (i, owner) in range.enumerate() {
            let (lo, hi) = self.region(owner);
            self.entries.clear();
            for w in 0..k {
                wire::decode_into(&self.wires.recv[i * k + w], &mut self.piece).map_err(|e| {
                    transport_err(format!(
                        "sparse all-reduce, step {step}: worker {w}'s piece for region {owner} does not decode: {e}"
                    ))
                })?;
                let Payload::Sparse(p) = &self.piece else {
                    return Err(transport_err(format!(
                        "sparse all-reduce, step {step}: worker {w} sent a sign payload"
                    )));
                };
                if p.n as usize != self.n
                    || p.indices
                        .iter()
                        .any(|&x| (x as usize) < lo || (x as usize) >= hi)
                {
                    return Err(transport_err(format!(
                        "sparse all-reduce, step {step}: worker {w}'s piece for region {owner} ({lo}..{hi} of {}) holds indices outside it",
                        self.n
                    )));
                }
                self.entries.extend(
                    p.indices
                        .iter()
                        .zip(&p.values)
                        .map(|(&x, &v)| (x, w as u32, v)),
                );
            }
            self.entries.sort_unstable_by_key(|&(x, w, _)| (x, w));
            let c = &mut self.cands[i];
            c.clear();
            let mut at = 0;
            while at < self.entries.len() {
                let x = self.entries[at].0;
                let (mut sum, mut senders) = (0.0f32, 0usize);
                while at < self.entries.len() && self.entries[at].0 == x {
                    sum += self.entries[at].2;
                    senders += 1;
                    at += 1;
                }
                let inv = match self.rule {
                    Average::OverWorkers => self.inv[k],
                    Average::OverSenders => self.inv[senders],
                };
                let a = sum * inv;
                c.push((x, a, magnitude_key(a)));
            }
        }
        Ok(())
    }

    /// Phase 2, exact: the `k_g`-th smallest key of each group over every owner's
    /// candidates, four rounds of 8-bit histograms all-reduced; ties at the threshold go to
    /// the lowest indices (SPEC §1).
    fn select_exact(&mut self, t: &mut dyn Transport, traffic: &mut Traffic) -> Result<()> {
        // `search` is taken out of `self` so that the passes can borrow the candidates beside it.
        let mut search = std::mem::take(&mut self.search);
        search.clear();
        search.resize(self.groups.len(), Search::default());
        let res = self
            .radix_rounds(t, &mut search, traffic)
            .and_then(|()| self.ties_before(t, &search, traffic));
        if res.is_ok() {
            self.pick_exact(&search);
            let th = self.thresholds.get_or_insert_with(Vec::new);
            th.clear();
            th.extend(search.iter().map(Search::threshold));
        }
        self.search = search;
        res
    }

    /// The four rounds of [`Self::select_exact`]: each histograms the next 8 key bits of the
    /// candidates that share the prefix fixed so far and all-reduces the counts.
    fn radix_rounds(
        &mut self,
        t: &mut dyn Transport,
        search: &mut [Search],
        traffic: &mut Traffic,
    ) -> Result<()> {
        let gs = self.groups.len();
        let locals = self.cands.len();
        for round in 0..32 / DIGIT_BITS {
            let shift = 32 - DIGIT_BITS * (round + 1);
            self.hist.clear();
            self.hist.resize(locals * gs * BINS, 0);
            for i in 0..locals {
                for (g, s) in search.iter().enumerate() {
                    if round > 0 && !s.searching() {
                        continue;
                    }
                    let base = (i * gs + g) * BINS;
                    for &(_, _, key) in in_group(&self.cands[i], &self.groups[g].0) {
                        if round == 0
                            || key >> (shift + DIGIT_BITS) == s.prefix >> (shift + DIGIT_BITS)
                        {
                            self.hist[base + ((key >> shift) as usize & (BINS - 1))] += 1;
                        }
                    }
                }
            }
            let views: Vec<&[u32]> = self.hist.chunks(gs * BINS).collect();
            self.summed.resize(gs * BINS, 0);
            sum_counts(t, &mut self.wires, &views, &mut self.summed, traffic)?;
            for (g, s) in search.iter_mut().enumerate() {
                let h = &self.summed[g * BINS..(g + 1) * BINS];
                if round == 0 {
                    let k = self.groups[g].1 as u64;
                    let total: u64 = h.iter().map(|&c| u64::from(c)).sum();
                    s.all = total <= k;
                    s.need = if s.all { 0 } else { k };
                    // The reuse steps of a group that took its whole union keep the top
                    // digit's bound of its largest key, which every rank knows from here.
                    s.all_bound = h
                        .iter()
                        .rposition(|&c| c > 0)
                        .map_or(0, |d| ((d as u32) << shift) | ((1u32 << shift) - 1));
                }
                if !s.searching() {
                    continue;
                }
                let mut below = 0u64;
                for (digit, &c) in h.iter().enumerate() {
                    if below + u64::from(c) >= s.need {
                        s.prefix |= (digit as u32) << shift;
                        s.need -= below;
                        s.ties = u64::from(c);
                        break;
                    }
                    below += u64::from(c);
                }
            }
        }
        Ok(())
    }

    /// Selects, per local owner, the candidates below each group's threshold key and its
    /// share of the ties (by region order, lowest index first), given `self.before`.
    fn pick_exact(&mut self, search: &[Search]) {
        let gs = self.groups.len();
        let locals = self.cands.len();
        self.chosen.resize_with(locals, SparsePayload::default);
        for i in 0..locals {
            let mut out = std::mem::take(&mut self.chosen[i]);
            out.indices.clear();
            out.values.clear();
            for (g, s) in search.iter().enumerate() {
                let mut quota = s.need.saturating_sub(self.before[i * gs + g]);
                for &(x, a, key) in in_group(&self.cands[i], &self.groups[g].0) {
                    let tie = !s.all && key == s.prefix && quota > 0;
                    if tie {
                        quota -= 1;
                    }
                    if s.all || (s.need > 0 && key < s.prefix) || tie {
                        out.indices.push(x);
                        out.values.push(a);
                    }
                }
            }
            self.chosen[i] = out;
        }
    }

    /// Sets `before` (per local owner and group) to how many threshold ties the owners
    /// before it (lower regions) hold: all zeros unless some group's threshold splits its
    /// ties, which every rank can tell from the summed histograms, so the all-gather is
    /// collective.
    fn ties_before(
        &mut self,
        t: &mut dyn Transport,
        search: &[Search],
        traffic: &mut Traffic,
    ) -> Result<()> {
        let gs = self.groups.len();
        let locals = self.cands.len();
        self.before.clear();
        self.before.resize(locals * gs, 0);
        if !search.iter().any(|s| s.searching() && s.need < s.ties) {
            return Ok(());
        }
        self.wires.reset_send(locals);
        for i in 0..locals {
            for (g, s) in search.iter().enumerate() {
                let ties = in_group(&self.cands[i], &self.groups[g].0)
                    .iter()
                    .filter(|e| e.2 == s.prefix)
                    .count();
                (ties as u32).put(&mut self.wires.send[i]);
            }
        }
        self.wires.all_gather(t, traffic)?;
        for (w, piece) in self.wires.gathered.iter().enumerate() {
            if piece.len() != gs * 4 {
                return Err(transport_err(format!(
                    "sparse all-reduce: worker {w} sent {} bytes of tie counts, expected {}",
                    piece.len(),
                    gs * 4
                )));
            }
        }
        for (i, owner) in t.local().enumerate() {
            for g in 0..gs {
                self.before[i * gs + g] = self.wires.gathered[..owner]
                    .iter()
                    .map(|piece| u64::from(u32::get(&piece[g * 4..])))
                    .sum();
            }
        }
        Ok(())
    }

    /// Phase 2, reused threshold: every candidate at or below its group's threshold key.
    fn select_by_threshold(&mut self) {
        let locals = self.cands.len();
        self.chosen.resize_with(locals, SparsePayload::default);
        for i in 0..locals {
            let mut out = std::mem::take(&mut self.chosen[i]);
            out.indices.clear();
            out.values.clear();
            let th = self.thresholds.as_deref().unwrap_or_default();
            for (g, theta) in th.iter().enumerate() {
                let Some(theta) = *theta else { continue };
                for &(x, a, key) in in_group(&self.cands[i], &self.groups[g].0) {
                    if key <= theta {
                        out.indices.push(x);
                        out.values.push(a);
                    }
                }
            }
            self.chosen[i] = out;
        }
    }

    /// Phase 3: the owners' selections all-gathered into `update` and `selected`.
    fn gather_selection(
        &mut self,
        t: &mut dyn Transport,
        step: u64,
        update: &mut [f32],
        traffic: &mut Traffic,
    ) -> Result<()> {
        let k = self.workers;
        self.wires.reset_send(self.chosen.len());
        for (i, c) in self.chosen.iter_mut().enumerate() {
            c.n = self.n as u32;
            c.values_dtype = DType::F32;
            let wrapped = Payload::Sparse(std::mem::take(c));
            let r = wire::encode(&wrapped, &mut self.wires.send[i]);
            let Payload::Sparse(back) = wrapped else {
                unreachable!("wrapped above")
            };
            *c = back;
            r?;
        }
        self.wires.all_gather(t, traffic)?;
        // Check every piece before anything is written.
        self.selected.clear();
        self.picked
            .resize_with(k, || Payload::Sparse(SparsePayload::default()));
        for owner in 0..k {
            let (lo, hi) = self.region(owner);
            wire::decode_into(&self.wires.gathered[owner], &mut self.picked[owner]).map_err(|e| {
                transport_err(format!(
                    "sparse all-reduce, step {step}: worker {owner}'s selection does not decode: {e}"
                ))
            })?;
            let Payload::Sparse(p) = &self.picked[owner] else {
                return Err(transport_err(format!(
                    "sparse all-reduce, step {step}: worker {owner} sent a sign payload as its selection"
                )));
            };
            if p.n as usize != self.n
                || p.indices
                    .iter()
                    .any(|&x| (x as usize) < lo || (x as usize) >= hi)
            {
                return Err(transport_err(format!(
                    "sparse all-reduce, step {step}: worker {owner}'s selection holds indices outside its region {lo}..{hi}"
                )));
            }
            self.selected.extend_from_slice(&p.indices);
        }
        update.fill(0.0);
        for p in &self.picked {
            if let Payload::Sparse(p) = p {
                for (&x, &v) in p.indices.iter().zip(&p.values) {
                    update[x as usize] = v;
                }
            }
        }
        Ok(())
    }

    /// What each local worker sent outside the selection.
    fn fill_refunds(&self, local: &[&SparsePayload], refunds: &mut Vec<SparsePayload>) {
        refunds.resize_with(local.len(), SparsePayload::default);
        for (p, r) in local.iter().zip(refunds.iter_mut()) {
            r.n = p.n;
            r.values_dtype = DType::F32;
            r.indices.clear();
            r.values.clear();
            let mut s = 0;
            for (&x, &v) in p.indices.iter().zip(&p.values) {
                while s < self.selected.len() && self.selected[s] < x {
                    s += 1;
                }
                if self.selected.get(s) != Some(&x) {
                    r.indices.push(x);
                    r.values.push(v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::InProcess;
    use crate::{Aggregate, Mode, cpu};

    /// A small generator for the payloads (SplitMix64).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    /// Payloads of `K` workers with `k_g` entries per group, drawn from few magnitudes so
    /// that the aggregate has ties and the threshold splits them.
    fn payloads(layout: &Layout, config: &Config, k: usize, seed: u64) -> Vec<SparsePayload> {
        let mut rng = Rng(seed);
        let groups = config.plan_groups(layout).unwrap();
        (0..k)
            .map(|_| {
                let mut p = SparsePayload {
                    n: layout.n() as u32,
                    values_dtype: DType::F32,
                    ..Default::default()
                };
                for g in &groups {
                    let mut idx: Vec<u32> = g.range.clone().map(|i| i as u32).collect();
                    for j in 0..g.k {
                        let pick = j + (rng.next() as usize) % (idx.len() - j);
                        idx.swap(j, pick);
                    }
                    let mut chosen = idx[..g.k].to_vec();
                    chosen.sort_unstable();
                    for i in chosen {
                        let mag = [0.5f32, 1.0, 1.0, 2.0][(rng.next() % 4) as usize];
                        let v = if rng.next() % 2 == 0 { mag } else { -mag };
                        p.indices.push(i);
                        p.values.push(v);
                    }
                }
                p
            })
            .collect()
    }

    /// SPEC §12 written straight: the §7 aggregate, then each group's first `k_g`
    /// candidates of the union in the §1 order.
    fn reference(
        layout: &Layout,
        config: &Config,
        rule: Average,
        ps: &[SparsePayload],
    ) -> (Vec<f32>, Vec<Vec<u32>>) {
        let n = layout.n();
        let mut agg = cpu::Aggregator::new(layout, config.mode, rule, ps.len()).unwrap();
        let wrapped: Vec<Payload> = ps.iter().cloned().map(Payload::Sparse).collect();
        let mut dense = vec![0.0; n];
        agg.aggregate(&wrapped, &mut dense).unwrap();
        let mut sent = vec![false; n];
        ps.iter()
            .flat_map(|p| &p.indices)
            .for_each(|&i| sent[i as usize] = true);
        let mut update = vec![0.0; n];
        let mut chosen = vec![false; n];
        for g in config.plan_groups(layout).unwrap() {
            let mut union: Vec<usize> = g.range.clone().filter(|&i| sent[i]).collect();
            union.sort_by_key(|&i| (magnitude_key(dense[i]), i));
            for &i in union.iter().take(g.k) {
                update[i] = dense[i];
                chosen[i] = true;
            }
        }
        let refunds = ps
            .iter()
            .map(|p| {
                p.indices
                    .iter()
                    .copied()
                    .filter(|&i| !chosen[i as usize])
                    .collect()
            })
            .collect();
        (update, refunds)
    }

    /// One step of `plan` over `ps` (one worker each) in process: update, refunds, traffic.
    fn in_process_step(
        plan: &mut SparseAllReduce,
        ps: &[SparsePayload],
        step: u64,
    ) -> (Vec<f32>, Vec<SparsePayload>, Traffic) {
        let views: Vec<&SparsePayload> = ps.iter().collect();
        let (mut update, mut refunds) = (vec![9.0; plan.n], Vec::new());
        let mut traffic = Traffic::default();
        plan.reduce(
            &mut InProcess::new(ps.len()),
            &views,
            step,
            &mut update,
            &mut refunds,
            &mut traffic,
        )
        .unwrap();
        (update, refunds, traffic)
    }

    #[test]
    fn exact_selection_equals_the_reference() {
        let layout = Layout::new(&[40, 7, 0, 53]).unwrap();
        for (case, k) in [1usize, 2, 3, 5].into_iter().enumerate() {
            for mode in [Mode::Global, Mode::PerLayer] {
                for rule in [Average::OverWorkers, Average::OverSenders] {
                    let mut config = Config::topk(0.2);
                    config.mode = mode;
                    let mut plan = SparseAllReduce::new(&layout, &config, rule, k, 1).unwrap();
                    // later steps run on regions balanced by the step before
                    for step in 0..3u64 {
                        let ps = payloads(&layout, &config, k, 7 + case as u64 + 100 * step);
                        let (want, want_refunds) = reference(&layout, &config, rule, &ps);
                        let (update, refunds, traffic) = in_process_step(&mut plan, &ps, step);
                        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&update),
                            bits(&want),
                            "K={k} {mode:?} {rule:?} step {step}"
                        );
                        // The same update as entries (what the hook's CUDA buckets scatter).
                        let mut dense = vec![0.0f32; layout.n()];
                        let mut last = None;
                        for (i, v) in plan.selection() {
                            assert!(last < Some(i), "K={k}: selection not ascending");
                            last = Some(i);
                            dense[i as usize] = v;
                        }
                        assert_eq!(bits(&dense), bits(&want), "K={k} {mode:?} {rule:?} entries");
                        let got: Vec<Vec<u32>> =
                            refunds.iter().map(|r| r.indices.clone()).collect();
                        assert_eq!(got, want_refunds, "K={k} {mode:?} {rule:?}");
                        for (r, p) in refunds.iter().zip(&ps) {
                            for (i, v) in r.indices.iter().zip(&r.values) {
                                let at = p.indices.binary_search(i).unwrap();
                                assert_eq!(v.to_bits(), p.values[at].to_bits());
                            }
                        }
                        // The selection has k_g entries per group whose union is larger.
                        let selected = update.iter().filter(|v| **v != 0.0).count();
                        let groups = config.plan_groups(&layout).unwrap();
                        let k_total: usize = groups.iter().map(|g| g.k).sum();
                        if k > 1 {
                            assert!(
                                selected <= k_total && selected + 3 >= k_total.min(selected + 3)
                            );
                        }
                        assert!(k == 1 || traffic.total() > 0);
                    }
                }
            }
        }
    }

    #[test]
    fn regions_follow_the_last_selection() {
        // Every worker's entries lie in the first half of region 0 of the equal split, so
        // owner 0 receives all of the scatter; after one step the regions split the
        // selection, and the busiest owner receives about a quarter as much.
        let (n, k, per) = (100_000usize, 8usize, 1000usize);
        let layout = Layout::new(&[n]).unwrap();
        let config = Config::topk(per as f64 / n as f64);
        let mut plan = SparseAllReduce::new(&layout, &config, Average::OverWorkers, k, 1).unwrap();
        let equal: Vec<usize> = (0..=k).map(|j| region_start(n, k, j)).collect();
        assert_eq!(plan.regions(), equal);
        let draw = |seed: u64| -> Vec<SparsePayload> {
            let mut rng = Rng(seed);
            (0..k)
                .map(|_| {
                    let mut indices: Vec<u32> = (0..n as u32 / 16).collect();
                    for j in 0..per {
                        let pick = j + (rng.next() as usize) % (indices.len() - j);
                        indices.swap(j, pick);
                    }
                    indices.truncate(per);
                    indices.sort_unstable();
                    let values = indices
                        .iter()
                        .map(|_| (rng.next() % 1000) as f32 - 499.5)
                        .collect();
                    SparsePayload {
                        n: n as u32,
                        values_dtype: DType::F32,
                        indices,
                        values,
                    }
                })
                .collect()
        };
        // the histograms' bytes (4 radix rounds of one group's 1 KiB), the same each step
        let mut hist = Traffic::default();
        for _ in 0..4 {
            hist.recursive_doubling(0..k, k, 1024);
        }
        let mut busiest = Vec::new();
        for step in 0..2u64 {
            let ps = draw(3 + step);
            let (update, _, traffic) = in_process_step(&mut plan, &ps, step);
            let (want, _) = reference(&layout, &config, Average::OverWorkers, &ps);
            assert_eq!(
                update.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "step {step}: the regions change who receives what, never the update"
            );
            let sel: Vec<usize> = plan.selection().map(|(i, _)| i as usize).collect();
            let r = plan.regions().to_vec();
            assert_eq!((r[0], r[k]), (0, n));
            for j in 0..k {
                let held = sel.iter().filter(|&&i| r[j] <= i && i < r[j + 1]).count();
                assert!(
                    held == sel.len() / k || held == sel.len().div_ceil(k),
                    "step {step}: region {j} {r:?} holds {held} of {}",
                    sel.len()
                );
            }
            let data = traffic
                .received
                .iter()
                .zip(&hist.received)
                .map(|(a, h)| a - h);
            busiest.push(data.max().unwrap());
        }
        assert!(
            3 * busiest[1] < busiest[0],
            "the busiest owner received {busiest:?} bytes"
        );
    }

    #[test]
    fn histograms_take_the_transports_all_reduce_up_to_the_cut() {
        // 64 groups of 256 bins are exactly DOUBLING_MAX_BYTES; 65 are over it.
        for (groups, sums) in [(1, 4), (64, 4), (65, 0)] {
            let layout = Layout::new(&vec![16; groups]).unwrap();
            let config = Config {
                mode: Mode::PerLayer,
                ..Config::topk(0.25)
            };
            let ps = payloads(&layout, &config, 5, 11);
            let views: Vec<&SparsePayload> = ps.iter().collect();
            let (want, _) = reference(&layout, &config, Average::OverWorkers, &ps);
            let mut plan =
                SparseAllReduce::new(&layout, &config, Average::OverWorkers, 5, 1).unwrap();
            let mut t = Corrupting(InProcess::new(5), false, 0);
            let (mut update, mut refunds) = (vec![0.0; layout.n()], Vec::new());
            let mut traffic = Traffic::default();
            plan.reduce(&mut t, &views, 0, &mut update, &mut refunds, &mut traffic)
                .unwrap();
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&update), bits(&want), "{groups} groups");
            assert_eq!(t.2, sums, "{groups} groups: one all-reduce per radix round");
        }
    }

    #[test]
    fn recursive_doubling_counts_what_each_worker_receives() {
        // K = 5: p = 4; worker 0 folds in worker 4's words, then 2 rounds; worker 4 gets
        // the result back once.
        let mut t = Traffic::default();
        t.recursive_doubling(0..5, 5, 1024);
        assert_eq!(t.received, [3 * 1024, 2048, 2048, 2048, 1024]);
        let mut t = Traffic::default();
        t.recursive_doubling(0..8, 8, 4);
        assert_eq!(t.received, [12; 8]);
        let mut t = Traffic::default();
        t.recursive_doubling(2..3, 3, 4); // one worker per process: rank 2 of 3
        assert_eq!(t.received, [4]);
        let mut t = Traffic::default();
        t.recursive_doubling(0..1, 1, 4);
        assert_eq!(t.total(), 0);
    }

    #[test]
    fn in_process_all_reduce_wraps_and_checks_its_shapes() {
        let mut t = InProcess::new(3);
        let (a, b, c) = ([u32::MAX, 1], [2u32, 2], [0u32, 3]);
        let mut out = [9u32; 2];
        t.all_reduce_sum(&[&a, &b, &c], &mut out).unwrap();
        assert_eq!(out, [1, 6]);
        assert!(matches!(
            t.all_reduce_sum(&[&a, &b], &mut out),
            Err(Error::LengthMismatch { .. })
        ));
        assert!(matches!(
            t.all_reduce_sum(&[&a, &b, &[1u32][..]], &mut out),
            Err(Error::LengthMismatch { .. })
        ));
    }

    #[test]
    fn reused_threshold_selects_up_to_the_last_exact_key() {
        let layout = Layout::new(&[64]).unwrap();
        let config = Config::topk(0.125);
        let mut plan = SparseAllReduce::new(&layout, &config, Average::OverWorkers, 3, 3).unwrap();
        for step in 0..4u64 {
            let ps = payloads(&layout, &config, 3, 100 + step);
            let before = plan.thresholds().map(|t| t.to_vec());
            let (update, _, _) = in_process_step(&mut plan, &ps, step);
            if step % 3 == 0 {
                let (want, _) = reference(&layout, &config, Average::OverWorkers, &ps);
                assert_eq!(update, want, "step {step} is exact");
            } else {
                let theta = before.unwrap()[0].unwrap();
                // Every aggregate of the union at or under the key is in, nothing else.
                let (dense, _) = {
                    let mut agg =
                        cpu::Aggregator::new(&layout, Mode::Global, Average::OverWorkers, 3)
                            .unwrap();
                    let w: Vec<Payload> = ps.iter().cloned().map(Payload::Sparse).collect();
                    let mut d = vec![0.0; 64];
                    agg.aggregate(&w, &mut d).unwrap();
                    (d, ())
                };
                let mut sent = [false; 64];
                ps.iter()
                    .flat_map(|p| &p.indices)
                    .for_each(|&i| sent[i as usize] = true);
                for i in 0..64 {
                    let want = if sent[i] && magnitude_key(dense[i]) <= theta {
                        dense[i]
                    } else {
                        0.0
                    };
                    assert_eq!(update[i].to_bits(), want.to_bits(), "step {step} index {i}");
                }
                assert_eq!(
                    plan.thresholds().unwrap()[0],
                    Some(theta),
                    "reused, not recomputed"
                );
            }
        }
    }

    #[test]
    fn shared_randomk_equals_the_aggregation() {
        let layout = Layout::new(&[100, 31]).unwrap();
        let config = Config::randomk(0.1).with_worker(0);
        for k in [1usize, 2, 3, 7] {
            let mut plans: Vec<cpu::Compressor> = (0..k)
                .map(|_| cpu::Compressor::new(&layout, &config).unwrap())
                .collect();
            let mut rng = Rng(k as u64);
            let ps: Vec<SparsePayload> = plans
                .iter_mut()
                .map(|plan| {
                    let g: Vec<f32> = (0..131)
                        .map(|_| (rng.next() % 1000) as f32 / 7.0 - 70.0)
                        .collect();
                    match crate::Compress::step(plan, &g, 5).unwrap() {
                        Payload::Sparse(p) => p.clone(),
                        Payload::Sign(_) | Payload::Qsgd(_) => unreachable!(),
                    }
                })
                .collect();
            let mut agg =
                cpu::Aggregator::new(&layout, Mode::Global, Average::OverWorkers, k).unwrap();
            let wrapped: Vec<Payload> = ps.iter().cloned().map(Payload::Sparse).collect();
            let mut want = vec![0.0; 131];
            agg.aggregate(&wrapped, &mut want).unwrap();
            let views: Vec<&SparsePayload> = ps.iter().collect();
            let mut got = vec![1.0; 131];
            let mut traffic = Traffic::default();
            shared_randomk(
                &mut InProcess::new(k),
                &views,
                &mut got,
                &mut traffic,
                &mut SharedScratch::default(),
            )
            .unwrap();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            // Per worker about 2 (K-1)/K of the k values and their hash headers.
            let per_worker = traffic.total() / k as u64;
            let values = 4 * ps[0].values.len() as u64;
            assert!(
                per_worker <= 2 * values + 8 * k as u64,
                "{per_worker} bytes for {values}"
            );
        }
        // Workers with their own keys draw other indices: a typed error.
        let mut a = cpu::Compressor::new(&layout, &config).unwrap();
        let mut b = cpu::Compressor::new(&layout, &Config::randomk(0.1).with_worker(1)).unwrap();
        let g = vec![1.0f32; 131];
        let pa = match crate::Compress::step(&mut a, &g, 0).unwrap() {
            Payload::Sparse(p) => p.clone(),
            _ => unreachable!(),
        };
        let pb = match crate::Compress::step(&mut b, &g, 0).unwrap() {
            Payload::Sparse(p) => p.clone(),
            _ => unreachable!(),
        };
        let mut out = vec![0.0; 131];
        let e = shared_randomk(
            &mut InProcess::new(2),
            &[&pa, &pb],
            &mut out,
            &mut Traffic::default(),
            &mut SharedScratch::default(),
        );
        assert!(matches!(e, Err(Error::Transport { .. })), "{e:?}");
    }

    /// The simulation, counting its integer all-reduces (`.2`) and, with `.1`, flipping one
    /// byte of what worker 1 receives from worker 0 in every all-to-all.
    struct Corrupting(InProcess, bool, usize);
    impl Transport for Corrupting {
        fn name(&self) -> &'static str {
            "corrupting"
        }
        fn workers(&self) -> usize {
            self.0.workers()
        }
        fn rank(&self) -> usize {
            0
        }
        fn local(&self) -> Range<usize> {
            self.0.local()
        }
        fn all_gather(&mut self, local: &[&[u8]], out: &mut Vec<Vec<u8>>) -> Result<()> {
            self.0.all_gather(local, out)
        }
        fn all_to_all(&mut self, send: &[&[u8]], out: &mut Vec<Vec<u8>>) -> Result<()> {
            self.0.all_to_all(send, out)?;
            let k = self.workers();
            if !self.1 {
                return Ok(());
            }
            if let Some(b) = out[k].get_mut(0) {
                *b ^= 0x40;
            }
            Ok(())
        }
        fn all_reduce_sum(&mut self, local: &[&[u32]], out: &mut [u32]) -> Result<()> {
            self.2 += 1;
            self.0.all_reduce_sum(local, out)
        }
        fn broadcast(&mut self, _: &mut Vec<u8>) -> Result<()> {
            Ok(())
        }
        fn barrier(&mut self) -> Result<()> {
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            std::process::exit(code)
        }
    }

    #[test]
    fn corrupt_pieces_and_bad_payloads_are_typed_errors_that_write_nothing() {
        let layout = Layout::new(&[32]).unwrap();
        let config = Config::topk(0.25);
        let ps = payloads(&layout, &config, 2, 3);
        let views: Vec<&SparsePayload> = ps.iter().collect();
        let mut plan = SparseAllReduce::new(&layout, &config, Average::OverWorkers, 2, 1).unwrap();
        let (mut update, mut refunds) = (vec![7.0; 32], Vec::new());
        let e = plan.reduce(
            &mut Corrupting(InProcess::new(2), true, 0),
            &views,
            3,
            &mut update,
            &mut refunds,
            &mut Traffic::default(),
        );
        assert!(matches!(e, Err(Error::Transport { .. })), "{e:?}");
        assert!(update.iter().all(|&v| v == 7.0) && refunds.is_empty());
        let mut unsorted = ps[0].clone();
        unsorted.indices.reverse();
        let e = plan.reduce(
            &mut InProcess::new(2),
            &[&unsorted, &ps[1]],
            0,
            &mut update,
            &mut refunds,
            &mut Traffic::default(),
        );
        assert!(
            matches!(e, Err(Error::BadPayload { worker: 0, .. })),
            "{e:?}"
        );
        assert!(
            SparseAllReduce::new(&layout, &Config::sign(), Average::OverWorkers, 2, 1).is_err()
        );
        assert!(SparseAllReduce::new(&layout, &config, Average::OverWorkers, 2, 0).is_err());
    }
}
