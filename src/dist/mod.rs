//! Moving payloads between workers: the small transport contract that compressed
//! aggregation needs, and its implementations.
//!
//! Compressed data-parallel training needs four collective operations and nothing else:
//!
//! - **all-gather** of every worker's payload (the encoded wire bytes, whose size varies from
//!   worker to worker and step to step), so that every process can aggregate all `K`
//!   payloads itself, in worker order, with the same arithmetic;
//! - **all-to-all** of a piece per pair of workers, the first half of the reductions whose
//!   traffic does not grow with `K` ([`reduce`], docs/SPEC.md §12);
//! - **broadcast** of the set-up from rank 0 (seed, configuration, layout: a fingerprint), so
//!   that every rank can check it runs the same job;
//! - a **barrier**.
//!
//! [`Transport`] is that contract on host bytes. [`InProcess`] runs all `K` workers in one
//! process (the simulation of `gradsift train --workers K`; its all-gather only concatenates
//! the local payloads), `Mpi` (feature `mpi`) runs one worker per MPI rank, and
//! `nccl` (feature `nccl`) all-gathers fixed-size device arrays between GPUs. Because the
//! simulation and a real run go through the same trait and the same code around it, they
//! differ only in how the bytes move: rank `r` is worker `r`, it computes the same gradient
//! on the same shard, compresses it with the same random keys, and every rank sums the same
//! decoded payloads in the same worker order, so every rank applies the same update to its
//! model replica, bit for bit.

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "mpi")]
pub use self::mpi::Mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod reduce;

use crate::{Error, Result};
use std::ops::Range;

/// The collectives of compressed aggregation. Every call is collective: every process calls
/// it, in the same order, or the run is wrong (MPI hangs or aborts).
pub trait Transport {
    /// The transport's name: "in-process", "mpi", "nccl".
    fn name(&self) -> &'static str;
    /// Total number of workers `K`.
    fn workers(&self) -> usize;
    /// This process's rank (0 for the in-process transport).
    fn rank(&self) -> usize;
    /// The workers this process runs, in worker order: `0..K` in process, `rank..rank + 1`
    /// with one worker per process.
    fn local(&self) -> Range<usize>;
    /// Whether this process reports (rank 0).
    fn is_root(&self) -> bool {
        self.rank() == 0
    }
    /// Every worker's bytes in worker order: `local[i]` is worker `self.local().start + i`'s
    /// (sizes may differ between workers); `out` is resized to `K` entries and its buffers
    /// are reused.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] when `local` does not hold one buffer per local worker;
    /// [`Error::Transport`] when the communication fails.
    fn all_gather(&mut self, local: &[&[u8]], out: &mut Vec<Vec<u8>>) -> Result<()>;
    /// One piece from every worker to every worker: `send[i * K + j]` goes from local worker
    /// `self.local().start + i` to worker `j`, and `out[i * K + w]` (resized to
    /// `local().len() * K` entries, buffers reused) is what local worker
    /// `self.local().start + i` received from worker `w`, its own piece included.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] when `send` does not hold `K` pieces per local worker;
    /// [`Error::Transport`] when the communication fails.
    fn all_to_all(&mut self, send: &[&[u8]], out: &mut Vec<Vec<u8>>) -> Result<()>;
    /// Sums words over every worker: on return, on every rank, `out[x]` is the wrapping sum
    /// (mod 2^32) of word `x` of all `K` workers; `local[i]` holds local worker
    /// `self.local().start + i`'s words, `out.len()` of them. Wrapping addition is exact,
    /// so any algorithm and order give the same bits (SPEC §12): the simulation sums in
    /// place, MPI runs `MPI_Allreduce`, the DDP hook's transport recursive doubling
    /// (`log2 p` rounds of pairwise exchanges, `p` the largest power of two `<= K`, and two
    /// more when `K` is not one) instead of the `O(K)` rounds of an all-to-all and an
    /// all-gather. The reductions
    /// call it for short vectors only ([`DOUBLING_MAX_BYTES`]).
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] when `local` does not hold one slice of `out.len()` words
    /// per local worker; [`Error::Transport`] when the communication fails.
    fn all_reduce_sum(&mut self, local: &[&[u32]], out: &mut [u32]) -> Result<()>;
    /// Replaces `buf` on every rank with rank 0's (any length).
    ///
    /// # Errors
    /// [`Error::Transport`] when the communication fails.
    fn broadcast(&mut self, buf: &mut Vec<u8>) -> Result<()>;
    /// Returns once every process has called it.
    ///
    /// # Errors
    /// [`Error::Transport`] when the communication fails.
    fn barrier(&mut self) -> Result<()>;
    /// Stops every process of the job after an error on this one, so that no other rank
    /// waits forever in a collective (MPI: `MPI_Abort`; in process: exits).
    fn abort(&self, code: i32) -> !;
}

/// All `K` workers in this process: the simulation.
#[derive(Debug, Clone)]
pub struct InProcess {
    workers: usize,
}

impl InProcess {
    /// `workers` simulated workers.
    pub fn new(workers: usize) -> Self {
        Self { workers }
    }
}

fn check_pieces(t: &dyn Transport, send: &[&[u8]]) -> Result<()> {
    let expected = t.local().len() * t.workers();
    if send.len() != expected {
        return Err(Error::LengthMismatch {
            what: "all-to-all pieces (K per local worker)",
            expected,
            got: send.len(),
        });
    }
    Ok(())
}

/// The longest vector (bytes) that the reductions sum with [`Transport::all_reduce_sum`]:
/// beyond it, sending the whole vector in each of `log2 K` rounds costs more than the
/// all-to-all and all-gather of SPEC §12's worker-order all-reduce, which send it about
/// twice in all. The selection's histograms (1 KiB per group) stay below it up to 64 groups.
pub const DOUBLING_MAX_BYTES: usize = 64 * 1024;

/// Checks the shape of an [`Transport::all_reduce_sum`] call.
pub(crate) fn check_words(t: &dyn Transport, local: &[&[u32]], words: usize) -> Result<()> {
    if local.len() != t.local().len() {
        return Err(Error::LengthMismatch {
            what: "all-reduce inputs (one per local worker)",
            expected: t.local().len(),
            got: local.len(),
        });
    }
    match local.iter().find(|l| l.len() != words) {
        Some(l) => Err(Error::LengthMismatch {
            what: "all-reduce input words (the output's length)",
            expected: words,
            got: l.len(),
        }),
        None => Ok(()),
    }
}

fn check_local(t: &dyn Transport, local: &[&[u8]]) -> Result<()> {
    if local.len() != t.local().len() {
        return Err(Error::LengthMismatch {
            what: "all-gather buffers (one per local worker)",
            expected: t.local().len(),
            got: local.len(),
        });
    }
    Ok(())
}

impl Transport for InProcess {
    fn name(&self) -> &'static str {
        "in-process"
    }
    fn workers(&self) -> usize {
        self.workers
    }
    fn rank(&self) -> usize {
        0
    }
    fn local(&self) -> Range<usize> {
        0..self.workers
    }
    fn all_gather(&mut self, local: &[&[u8]], out: &mut Vec<Vec<u8>>) -> Result<()> {
        check_local(self, local)?;
        out.resize_with(self.workers, Vec::new);
        for (o, l) in out.iter_mut().zip(local) {
            o.clear();
            o.extend_from_slice(l);
        }
        Ok(())
    }
    fn all_to_all(&mut self, send: &[&[u8]], out: &mut Vec<Vec<u8>>) -> Result<()> {
        check_pieces(self, send)?;
        let k = self.workers;
        out.resize_with(k * k, Vec::new);
        for dest in 0..k {
            for src in 0..k {
                let o = &mut out[dest * k + src];
                o.clear();
                o.extend_from_slice(send[src * k + dest]);
            }
        }
        Ok(())
    }
    fn all_reduce_sum(&mut self, local: &[&[u32]], out: &mut [u32]) -> Result<()> {
        check_words(self, local, out.len())?;
        out.fill(0);
        for l in local {
            for (o, &x) in out.iter_mut().zip(l.iter()) {
                *o = o.wrapping_add(x);
            }
        }
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// Checks at start-up that every rank runs the same job: rank 0 broadcasts its
/// `fingerprint` (the serialised configuration, layout, data and seed), every rank compares
/// it with its own, and the verdicts are all-gathered, so that a mismatch is the same
/// [`Error::Transport`] on every rank (naming the ranks that differ) instead of a hang or a
/// silently different update.
///
/// # Errors
/// [`Error::Transport`] on a mismatch or a failed collective.
pub fn check_setup(t: &mut dyn Transport, fingerprint: &str) -> Result<()> {
    let mut root = fingerprint.as_bytes().to_vec();
    t.broadcast(&mut root)?;
    let same = root == fingerprint.as_bytes();
    let mine = [u8::from(same)];
    // One verdict per rank; a rank with several local workers repeats its verdict.
    let local: Vec<&[u8]> = t.local().map(|_| &mine[..]).collect();
    let mut verdicts = Vec::new();
    t.all_gather(&local, &mut verdicts)?;
    let bad: Vec<usize> = verdicts
        .iter()
        .enumerate()
        .filter(|(_, v)| v.first() != Some(&1))
        .map(|(w, _)| w)
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    let detail = if same {
        String::new()
    } else {
        format!(
            "; rank {} has `{fingerprint}`, rank 0 has `{}`",
            t.rank(),
            String::from_utf8_lossy(&root)
        )
    };
    Err(Error::Transport {
        transport: t.name(),
        reason: format!(
            "set-up mismatch: rank(s) {bad:?} of {} run a different configuration or layout than rank 0{detail}; every rank must be started with the same options",
            t.workers()
        ),
    })
}

/// Little-endian bytes of `xs` (the wire order of f32 gradients and losses).
pub fn f32_bytes(xs: &[f32], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(xs.len() * 4);
    for x in xs {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// The f32s of little-endian `bytes` into `out`.
///
/// # Errors
/// [`Error::Transport`] when the length is not `4 * expected`.
pub fn f32_from_bytes(bytes: &[u8], expected: usize, out: &mut Vec<f32>) -> Result<()> {
    if bytes.len() != 4 * expected {
        return Err(Error::Transport {
            transport: "all-gather",
            reason: format!(
                "expected {expected} f32 values ({} bytes), received {} bytes",
                4 * expected,
                bytes.len()
            ),
        });
    }
    out.clear();
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
    Ok(())
}

/// Fault injection for the failure tests: `GRADSIFT_FAULT=RANK:STEP` makes rank `RANK` exit
/// at once, without finalising MPI (as a crash would), when it reaches step `STEP`;
/// `GRADSIFT_HANG=RANK:STEP` makes it stop there for ever without dying (a deadlock, a
/// stopped process), which only the collective timeout catches.
pub fn inject_fault(rank: usize, step: u64) {
    let at = |var: &str| {
        let spec = std::env::var(var).ok()?;
        let mut it = spec.split(':').map(|s| s.trim().parse::<u64>().ok());
        match (it.next(), it.next()) {
            (Some(Some(r)), Some(Some(s))) => Some(r == rank as u64 && s == step),
            _ => None,
        }
    };
    if at("GRADSIFT_FAULT") == Some(true) {
        eprintln!("gradsift: GRADSIFT_FAULT: rank {rank} exits abruptly at step {step}");
        std::process::exit(86);
    }
    if at("GRADSIFT_HANG") == Some(true) {
        eprintln!("gradsift: GRADSIFT_HANG: rank {rank} stops at step {step} without exiting");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_process_all_gather_is_concatenation() {
        let mut t = InProcess::new(3);
        let mut out = vec![vec![9u8; 7]];
        t.all_gather(&[b"a", b"", b"ccc"], &mut out).unwrap();
        assert_eq!(out, vec![b"a".to_vec(), vec![], b"ccc".to_vec()]);
        assert!(t.all_gather(&[b"a"], &mut out).is_err());
        check_setup(&mut t, "same").unwrap();
    }

    #[test]
    fn in_process_all_to_all_transposes() {
        let mut t = InProcess::new(2);
        let mut out = Vec::new();
        // Worker 0 sends "a" to itself and "bc" to 1; worker 1 sends "" to 0 and "d" to itself.
        t.all_to_all(&[b"a", b"bc", b"", b"d"], &mut out).unwrap();
        assert_eq!(
            out,
            vec![b"a".to_vec(), vec![], b"bc".to_vec(), b"d".to_vec()]
        );
        assert!(t.all_to_all(&[b"a"], &mut out).is_err());
    }

    #[test]
    fn f32_round_trip() {
        let xs = [1.5f32, -0.0, f32::MIN_POSITIVE, 3.25e-7];
        let mut b = Vec::new();
        f32_bytes(&xs, &mut b);
        let mut back = Vec::new();
        f32_from_bytes(&b, 4, &mut back).unwrap();
        assert_eq!(
            xs.map(f32::to_bits).to_vec(),
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert!(f32_from_bytes(&b, 3, &mut back).is_err());
    }
}
