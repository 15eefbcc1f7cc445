//! [`Transport`] over MPI (feature `mpi`, the `mpi` crate on the system's MPI, OpenMPI in CI):
//! one worker per rank.
//!
//! Failures: the `mpi` crate keeps MPI's default error handler (`MPI_ERRORS_ARE_FATAL`), so a
//! failed collective aborts the whole job rather than returning; [`Transport::abort`] calls
//! `MPI_Abort` on the world communicator after an error on one rank; a rank that dies (a
//! crash, a kill, an exit without `MPI_Finalize`) makes `mpirun` kill the other ranks and
//! exit non-zero; and a rank that hangs without dying is caught by the per-collective
//! timeout ([`Mpi::set_timeout`]): every collective is started non-blocking and polled, and
//! one that has not completed by the deadline makes each waiting rank tell rank 0 which
//! collective it waits in; rank 0 names the ranks that did not arrive, and every rank exits
//! non-zero through `MPI_Abort`.

use super::{Transport, check_local, check_pieces, check_words};
use crate::{Error, Result};
use mpi::Count;
use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::point_to_point::MatchedReceiveVec;
use mpi::request::{Request, Scope, scope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Destination, Root, Source};
use std::ops::Range;
use std::time::{Duration, Instant};

/// The tag of the "I wait in collective #c" messages sent to rank 0 after a timeout.
const HANG_TAG: i32 = 0x6873;
/// How long rank 0 collects those messages before it reports, and the other ranks wait for
/// its report before they abort themselves (rank 0 may be the one that hangs).
const REPORT_GRACE: Duration = Duration::from_secs(3);
/// The default per-collective timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// One worker per MPI rank on `MPI_COMM_WORLD`: worker `r` is rank `r`, `K` is the world
/// size. Finalises MPI when dropped.
pub struct Mpi {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    counts: Vec<Count>,
    displs: Vec<Count>,
    recv: Vec<u8>,
    /// The all-to-all's outgoing side: sizes, offsets and the pieces back to back.
    send_counts: Vec<Count>,
    send_displs: Vec<Count>,
    send: Vec<u8>,
    timeout: Option<Duration>,
    /// Collectives started so far (every rank counts the same).
    seq: u64,
    // Dropped last: MPI_Finalize.
    _universe: Universe,
}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

/// A byte count or offset as MPI's `int`.
fn offset(n: usize) -> Result<Count> {
    Count::try_from(n).map_err(|_| err(format!("{n} bytes exceed MPI's count")))
}

fn err(reason: String) -> Error {
    Error::Transport {
        transport: "mpi",
        reason,
    }
}

impl Mpi {
    /// Initialises MPI (once per process).
    ///
    /// # Errors
    /// [`Error::Transport`] when MPI was already initialised.
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize()
            .ok_or_else(|| err("MPI is already initialised in this process".into()))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Self {
            world,
            rank,
            size,
            counts: Vec::new(),
            displs: Vec::new(),
            recv: Vec::new(),
            send_counts: Vec::new(),
            send_displs: Vec::new(),
            send: Vec::new(),
            timeout: Some(DEFAULT_TIMEOUT),
            seq: 0,
            _universe: universe,
        })
    }

    /// How long one collective may wait for the other ranks before the job is stopped
    /// (`None`: for ever, MPI's own behaviour); 600 s until set. Every rank
    /// should use the same value.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }
}

/// What a collective needs to report a hang: the communicator, this rank, the count.
struct Watch<'w> {
    world: &'w SimpleCommunicator,
    rank: usize,
    size: usize,
    seq: u64,
    timeout: Option<Duration>,
}

impl Watch<'_> {
    /// Polls `req` until it completes or the timeout passes (then [`Watch::hang`]).
    fn wait<'a, D: ?Sized, S: Scope<'a>>(&self, what: &str, mut req: Request<'a, D, S>) {
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            if let Some(t) = self.timeout {
                if start.elapsed() > t {
                    self.hang(what, t);
                }
            }
            // Spin briefly (a collective usually completes in microseconds), then sleep so
            // that a waiting rank leaves the cores to the ranks still computing.
            polls = polls.saturating_add(1);
            if polls < 2000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// The timeout: rank 0 collects which ranks wait in which collective and names the
    /// others; every rank then aborts the job.
    fn hang(&self, what: &str, t: Duration) -> ! {
        eprintln!(
            "gradsift: rank {}: {what} (collective #{}) did not complete within {t:?}",
            self.rank, self.seq
        );
        if self.rank != 0 {
            let msg = [self.seq];
            scope(|sc| {
                let _req =
                    self.world
                        .process_at_rank(0)
                        .immediate_send_with_tag(sc, &msg[..], HANG_TAG);
                std::thread::sleep(2 * REPORT_GRACE);
                eprintln!(
                    "gradsift: rank {}: no report from rank 0 (it may be the rank that hangs); stopping the job",
                    self.rank
                );
                self.world.abort(3)
            })
        }
        let mut waiting = vec![None; self.size];
        waiting[0] = Some(self.seq);
        let start = Instant::now();
        while start.elapsed() < REPORT_GRACE {
            if let Some(probed) = self
                .world
                .any_process()
                .immediate_matched_probe_with_tag(HANG_TAG)
            {
                let (got, status) = probed.matched_receive_vec::<u64>();
                if let (Some(&c), Ok(r)) = (got.first(), usize::try_from(status.source_rank())) {
                    if let Some(slot) = waiting.get_mut(r) {
                        *slot = Some(c);
                    }
                }
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let missing: Vec<usize> = (0..self.size).filter(|&r| waiting[r].is_none()).collect();
        let elsewhere: Vec<String> = waiting
            .iter()
            .enumerate()
            .filter_map(|(r, c)| {
                c.filter(|&c| c != self.seq)
                    .map(|c| format!("rank {r} at #{c}"))
            })
            .collect();
        eprintln!(
            "gradsift: collective #{} ({what}) timed out after {t:?}: rank(s) {missing:?} of {} did not arrive{}; stopping every rank",
            self.seq,
            self.size,
            if elsewhere.is_empty() {
                String::new()
            } else {
                format!(" ({} wait in other collectives)", elsewhere.join(", "))
            }
        );
        self.world.abort(3)
    }
}

/// The next collective's [`Watch`] (counts it); a macro so that it borrows only the
/// communicator, not the buffers the collective writes.
macro_rules! watch {
    ($s:ident) => {{
        $s.seq += 1;
        Watch {
            world: &$s.world,
            rank: $s.rank,
            size: $s.size,
            seq: $s.seq,
            timeout: $s.timeout,
        }
    }};
}

impl Transport for Mpi {
    fn name(&self) -> &'static str {
        "mpi"
    }
    fn workers(&self) -> usize {
        self.size
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn local(&self) -> Range<usize> {
        self.rank..self.rank + 1
    }

    /// Two collectives: an all-gather of the sizes, then `MPI_Allgatherv` of the bytes.
    fn all_gather(&mut self, local: &[&[u8]], out: &mut Vec<Vec<u8>>) -> Result<()> {
        check_local(self, local)?;
        let mine = local[0];
        let len = Count::try_from(mine.len()).map_err(|_| {
            err(format!(
                "payload of {} bytes exceeds MPI's count",
                mine.len()
            ))
        })?;
        self.counts.resize(self.size, 0);
        let watch = watch!(self);
        scope(|sc| {
            let req = watch
                .world
                .immediate_all_gather_into(sc, &len, &mut self.counts[..]);
            watch.wait("all-gather of the sizes", req);
        });
        self.displs.clear();
        let mut total: i64 = 0;
        for &c in &self.counts {
            if c < 0 {
                return Err(err(format!("a rank announced a payload of {c} bytes")));
            }
            self.displs.push(
                Count::try_from(total)
                    .map_err(|_| err("all-gathered payloads exceed MPI's count".into()))?,
            );
            total += i64::from(c);
        }
        self.recv.resize(total as usize, 0);
        let watch = watch!(self);
        {
            let mut part =
                PartitionMut::new(&mut self.recv[..], &self.counts[..], &self.displs[..]);
            scope(|sc| {
                let req = watch
                    .world
                    .immediate_all_gather_varcount_into(sc, mine, &mut part);
                watch.wait("all-gather of the payloads", req);
            });
        }
        out.resize_with(self.size, Vec::new);
        for (w, o) in out.iter_mut().enumerate() {
            let (at, n) = (self.displs[w] as usize, self.counts[w] as usize);
            o.clear();
            o.extend_from_slice(&self.recv[at..at + n]);
        }
        Ok(())
    }

    /// Two collectives: `MPI_Alltoall` of the sizes, then `MPI_Alltoallv` of the bytes.
    fn all_to_all(&mut self, send: &[&[u8]], out: &mut Vec<Vec<u8>>) -> Result<()> {
        check_pieces(self, send)?;
        self.send_counts.clear();
        self.send_displs.clear();
        self.send.clear();
        for piece in send {
            self.send_displs.push(offset(self.send.len())?);
            self.send_counts.push(offset(piece.len())?);
            self.send.extend_from_slice(piece);
        }
        offset(self.send.len())?;
        self.counts.resize(self.size, 0);
        let watch = watch!(self);
        scope(|sc| {
            let req = watch.world.immediate_all_to_all_into(
                sc,
                &self.send_counts[..],
                &mut self.counts[..],
            );
            watch.wait("all-to-all of the sizes", req);
        });
        self.displs.clear();
        let mut total = 0usize;
        for &c in &self.counts {
            let c = usize::try_from(c)
                .map_err(|_| err(format!("a rank announced a piece of {c} bytes")))?;
            self.displs.push(offset(total)?);
            total += c;
        }
        offset(total)?;
        self.recv.resize(total, 0);
        let watch = watch!(self);
        {
            let sent = Partition::new(&self.send[..], &self.send_counts[..], &self.send_displs[..]);
            let mut part =
                PartitionMut::new(&mut self.recv[..], &self.counts[..], &self.displs[..]);
            scope(|sc| {
                let req = watch
                    .world
                    .immediate_all_to_all_varcount_into(sc, &sent, &mut part);
                watch.wait("all-to-all of the pieces", req);
            });
        }
        out.resize_with(self.size, Vec::new);
        for (w, o) in out.iter_mut().enumerate() {
            let (at, n) = (self.displs[w] as usize, self.counts[w] as usize);
            o.clear();
            o.extend_from_slice(&self.recv[at..at + n]);
        }
        Ok(())
    }

    /// One `MPI_Allreduce` (its own algorithm: recursive doubling for short vectors in
    /// OpenMPI); exact whatever it picks, as the sums wrap.
    fn all_reduce_sum(&mut self, local: &[&[u32]], out: &mut [u32]) -> Result<()> {
        check_words(self, local, out.len())?;
        let watch = watch!(self);
        scope(|sc| {
            let req =
                watch
                    .world
                    .immediate_all_reduce_into(sc, local[0], out, SystemOperation::sum());
            watch.wait("all-reduce of the counts", req);
        });
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        let watch = watch!(self);
        let root = watch.world.process_at_rank(0);
        let mut len = buf.len() as u64;
        scope(|sc| {
            let req = root.immediate_broadcast_into(sc, &mut len);
            watch.wait("broadcast of the set-up's size", req);
        });
        buf.resize(len as usize, 0);
        let watch = watch!(self);
        scope(|sc| {
            let req = root.immediate_broadcast_into(sc, &mut buf[..]);
            watch.wait("broadcast of the set-up", req);
        });
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        let watch = watch!(self);
        watch.wait("barrier", watch.world.immediate_barrier());
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
