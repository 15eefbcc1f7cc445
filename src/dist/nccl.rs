//! All-gather of device-resident payloads between GPUs with NCCL (feature `nccl`).
//!
//! With a sparse method every worker sends the same number of values (`sent`, fixed by the
//! layout and the ratios), so the payload is two fixed-size device arrays: `sent` u32
//! indices and `sent` f32 values, in [`crate::cuda::Compressor::device_payload`]. NCCL
//! all-gathers both arrays straight from the compressor's output into `K sent`-long device
//! buffers, and [`crate::cuda::Aggregator::aggregate_gathered_device`] averages them on the
//! GPU, in worker order, with the same kernels as the host path: compress on the GPU,
//! all-gather, aggregate on the GPU, and no payload byte crosses to the host.
//!
//! Loading: cudarc loads NCCL at run time under the names `libnccl.so`, `libnccl.so.<CUDA
//! major>`, `.12`, `.11`, `.10`, `.9`, `.1` and **panics** when none loads. The NCCL wheel on
//! PyPI (`nvidia-nccl-cu12`/`-cu13`) ships `libnccl.so.2`, a name it never tries. [`probe`]
//! dlopens cudarc's candidates first (without cudarc's panic) and turns a missing library
//! into [`Error::BackendUnavailable`]; when only `libnccl.so.2` is found it says how to
//! expose it under a name cudarc tries (a `libnccl.so` symbolic link in a directory on
//! `LD_LIBRARY_PATH`, which `scripts/gpu-stage.sh` makes). `GRADSIFT_NCCL_LIB=/path/to/
//! libnccl.so.2` is probed as well, for that message.

use crate::cuda::{Aggregator, Compressor, Context};
use crate::{Config, Error, Method, Result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceSlice, SyncOnDrop};
use cudarc::nccl::{Comm, Id};
use std::sync::{Arc, OnceLock};

fn unavailable(reason: String) -> Error {
    Error::BackendUnavailable {
        backend: "nccl",
        reason,
    }
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Transport {
        transport: "nccl",
        reason: format!("{what}: {e:?}"),
    }
}

/// The library names cudarc's loader tries for NCCL, in its order.
pub fn cudarc_names() -> Vec<String> {
    cudarc::get_lib_name_candidates("nccl")
}

/// Whether cudarc can load NCCL here; never panics. Cached after the first call.
///
/// # Errors
/// [`Error::BackendUnavailable`] naming the files tried, and when a `libnccl.so.2` is
/// loadable but cudarc's names are not, how to expose it.
pub fn probe() -> Result<()> {
    static PROBE: OnceLock<Result<()>> = OnceLock::new();
    PROBE.get_or_init(probe_uncached).clone()
}

fn loads(name: &str) -> bool {
    // SAFETY: loading NCCL runs its initialisers, which have no preconditions; the handle
    // is dropped at once (cudarc keeps its own).
    unsafe { libloading::Library::new(name) }.is_ok()
}

fn probe_uncached() -> Result<()> {
    let names = cudarc_names();
    if names.iter().any(|n| loads(n)) {
        return Ok(());
    }
    let mut others = vec!["libnccl.so.2".to_string()];
    if let Ok(p) = std::env::var("GRADSIFT_NCCL_LIB") {
        others.insert(0, p);
    }
    if let Some(found) = others.iter().find(|n| loads(n)) {
        return Err(unavailable(format!(
            "{found} loads, but cudarc only tries {names:?}: link it as libnccl.so in a directory on LD_LIBRARY_PATH before starting the process (`ln -s $(dirname <wheel>/nvidia/nccl/lib/libnccl.so.2)/libnccl.so.2 DIR/libnccl.so`; scripts/gpu-stage.sh does this)"
        )));
    }
    Err(unavailable(format!(
        "no NCCL library found (tried {names:?} and {others:?}); install NCCL (e.g. `pip install nvidia-nccl-cu13`) and put its lib directory, with a libnccl.so link, on LD_LIBRARY_PATH"
    )))
}

/// Runs `f`, turning a panic of cudarc's loader into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    probe()?;
    crate::cuda::catch_panic(f).unwrap_or_else(|msg| Err(unavailable(format!("{what}: {msg}"))))
}

/// A new NCCL unique id (rank 0 makes it and sends its 128 bytes to the others, over
/// [`super::Transport::broadcast`] for instance).
///
/// # Errors
/// [`Error::BackendUnavailable`] without NCCL; [`Error::Transport`] when NCCL fails.
pub fn unique_id() -> Result<[u8; 128]> {
    guarded("NCCL unique id", || {
        let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
        Ok(id.internal().map(|c| c as u8))
    })
}

/// A raw device array of the compressor's payload, seen by NCCL as a slice.
struct Raw<'a, T> {
    ptr: u64,
    len: usize,
    stream: &'a Arc<CudaStream>,
    _t: std::marker::PhantomData<T>,
}

impl<T> DeviceSlice<T> for Raw<'_, T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        self.stream
    }
}

impl<T> DevicePtr<T> for Raw<'_, T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        // Written by the compressor on the communicator's own stream: ordered already.
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

/// One rank of an NCCL communicator on a gradsift CUDA [`Context`] (same device, same
/// stream), with the device buffers that receive the all-gathered payloads.
#[derive(Debug)]
pub struct Nccl {
    cx: Context,
    comm: Comm,
    idx: Option<CudaSlice<u32>>,
    val: Option<CudaSlice<f32>>,
    sent: usize,
}

impl Nccl {
    /// Rank `rank` of `world` ranks that share `id` (from [`unique_id`] on rank 0). Blocks
    /// until every rank has joined.
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] without NCCL; [`Error::Transport`] when NCCL fails.
    pub fn new(cx: &Context, rank: usize, world: usize, id: [u8; 128]) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(Error::InvalidConfig(format!(
                "NCCL rank {rank} of a world of {world}"
            )));
        }
        guarded("NCCL communicator", || {
            cx.cuda_context()
                .bind_to_thread()
                .map_err(|e| nccl_err("binding the context", e))?;
            let comm = Comm::from_rank(
                cx.stream().clone(),
                rank,
                world,
                Id::uninit(id.map(|b| b as core::ffi::c_char)),
            )
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
            Ok(Self {
                cx: cx.clone(),
                comm,
                idx: None,
                val: None,
                sent: 0,
            })
        })
    }

    /// Rank `transport.rank()` of a communicator over every rank of `transport` (MPI, for
    /// instance, one GPU per rank): rank 0 makes the unique id and broadcasts it over the
    /// host transport. Collective over `transport`.
    ///
    /// # Errors
    /// As [`Nccl::new`]; [`Error::InvalidConfig`] when a rank runs several workers. An error
    /// on one rank (no NCCL there, say) leaves the others waiting in the broadcast or in
    /// NCCL's set-up: follow it with [`super::Transport::abort`], as `gradsift train` does.
    pub fn from_transport(cx: &Context, transport: &mut dyn super::Transport) -> Result<Self> {
        if transport.local().len() != 1 {
            return Err(Error::InvalidConfig(format!(
                "NCCL needs one worker per rank; the {} transport runs {} here",
                transport.name(),
                transport.local().len()
            )));
        }
        let mut id = if transport.is_root() {
            unique_id()?.to_vec()
        } else {
            Vec::new()
        };
        transport.broadcast(&mut id)?;
        let id: [u8; 128] = id.try_into().map_err(|v: Vec<u8>| Error::Transport {
            transport: "nccl",
            reason: format!("received a unique id of {} bytes, not 128", v.len()),
        })?;
        Self::new(cx, transport.rank(), transport.workers(), id)
    }

    /// A communicator of one rank (world size 1): the one-GPU check of the staged script.
    ///
    /// # Errors
    /// As [`Nccl::new`].
    pub fn single(cx: &Context) -> Result<Self> {
        Self::new(cx, 0, 1, unique_id()?)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Ranks `K`.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// All-gathers `plan`'s last payload (after its step was enqueued on this context's
    /// stream) into this communicator's device buffers: `K sent` indices and values, worker
    /// (rank) order. Returns `sent`. Waits for nothing but the compressor's rejection flag.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for scaled sign (not a sparse payload), the compressor's
    /// error when its step was rejected, [`Error::Transport`] when NCCL fails.
    pub fn all_gather_payload(&mut self, plan: &Compressor) -> Result<usize> {
        if matches!(plan.config().method, Method::Sign) {
            return Err(Error::InvalidConfig(
                "the NCCL all-gather takes sparse payloads; scaled sign is not supported".into(),
            ));
        }
        plan.check()?;
        let (idx, val, sent) = plan.device_payload();
        let k = self.world_size();
        if self.sent != sent || self.idx.is_none() {
            let s = self.cx.stream();
            self.idx = Some(
                s.alloc_zeros::<u32>((k * sent).max(1))
                    .map_err(|e| nccl_err("allocating", e))?,
            );
            self.val = Some(
                s.alloc_zeros::<f32>((k * sent).max(1))
                    .map_err(|e| nccl_err("allocating", e))?,
            );
            self.sent = sent;
        }
        if sent == 0 {
            return Ok(0);
        }
        let stream = self.cx.stream().clone();
        let src_i = Raw::<u32> {
            ptr: idx,
            len: sent,
            stream: &stream,
            _t: std::marker::PhantomData,
        };
        let src_v = Raw::<f32> {
            ptr: val,
            len: sent,
            stream: &stream,
            _t: std::marker::PhantomData,
        };
        let (gi, gv) = (
            self.idx.as_mut().expect("allocated"),
            self.val.as_mut().expect("allocated"),
        );
        cudarc::nccl::group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
        let a = self.comm.all_gather(&src_i, gi);
        let b = self.comm.all_gather(&src_v, gv);
        cudarc::nccl::group_end().map_err(|e| nccl_err("ncclGroupEnd", e))?;
        a.map_err(|e| nccl_err("ncclAllGather (indices)", e))?;
        b.map_err(|e| nccl_err("ncclAllGather (values)", e))?;
        Ok(sent)
    }

    /// Averages the last all-gathered payloads on the GPU into `out` (length `n`), with
    /// `agg` built for `K = world_size()` workers on this context.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] before any all-gather; the aggregator's errors.
    pub fn aggregate(&mut self, agg: &mut Aggregator, out: &mut CudaSlice<f32>) -> Result<()> {
        let (Some(idx), Some(val)) = (self.idx.as_ref(), self.val.as_ref()) else {
            return Err(Error::InvalidConfig(
                "nothing all-gathered yet: call all_gather_payload first".into(),
            ));
        };
        let stream = self.cx.stream().clone();
        let (pi, _gi) = idx.device_ptr(&stream);
        let (pv, _gv) = val.device_ptr(&stream);
        // SAFETY: both buffers hold world_size() * sent elements on this context, written
        // on this stream by the all-gather.
        unsafe { agg.aggregate_gathered_device(pi, pv, self.sent, out) }
    }
}

/// Whether `config` can use the NCCL path (sparse methods).
pub fn supports(config: &Config) -> bool {
    !matches!(config.method, Method::Sign)
}
