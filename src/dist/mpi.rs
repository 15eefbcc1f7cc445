//! [`Transport`] over MPI (feature `mpi`, the `mpi` crate on the system's MPI, OpenMPI in CI):
//! one worker per rank.
//!
//! Failures: the `mpi` crate keeps MPI's default error handler (`MPI_ERRORS_ARE_FATAL`), so a
//! failed collective aborts the whole job rather than returning; [`Transport::abort`] calls
//! `MPI_Abort` on the world communicator after an error on one rank; and a rank that dies
//! (a crash, a kill, an exit without `MPI_Finalize`) makes `mpirun` kill the other ranks and
//! exit non-zero, so no rank waits forever in a collective.

use super::{Transport, check_local, check_pieces};
use crate::{Error, Result};
use mpi::Count;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};
use std::ops::Range;

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
            _universe: universe,
        })
    }
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
        self.world.all_gather_into(&len, &mut self.counts[..]);
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
        {
            let mut part =
                PartitionMut::new(&mut self.recv[..], &self.counts[..], &self.displs[..]);
            self.world.all_gather_varcount_into(mine, &mut part);
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
        self.world
            .all_to_all_into(&self.send_counts[..], &mut self.counts[..]);
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
        {
            let sent = Partition::new(&self.send[..], &self.send_counts[..], &self.send_displs[..]);
            let mut part =
                PartitionMut::new(&mut self.recv[..], &self.counts[..], &self.displs[..]);
            self.world.all_to_all_varcount_into(&sent, &mut part);
        }
        out.resize_with(self.size, Vec::new);
        for (w, o) in out.iter_mut().enumerate() {
            let (at, n) = (self.displs[w] as usize, self.counts[w] as usize);
            o.clear();
            o.extend_from_slice(&self.recv[at..at + n]);
        }
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        let root = self.world.process_at_rank(0);
        let mut len = buf.len() as u64;
        root.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        root.broadcast_into(&mut buf[..]);
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
