//! The CUDA backend (feature `cuda`): [`Compressor`], [`Aggregator`] and [`Stats`]
//! implement the backend contract ([`crate::Compress`], [`crate::Aggregate`],
//! [`crate::Statistics`]) with `cudarc::driver::CudaSlice<T>` as the device buffer type, and
//! raw-pointer entry points (`step_raw`, ...) for frameworks that hand out addresses. Built on cudarc with dynamic loading, so the
//! crate compiles and links on machines without CUDA; constructing a [`Context`] there
//! returns [`crate::Error::BackendUnavailable`] saying what is missing.
//!
//! Kernels live in `kernels/*.cu`, listed once in `kernels/registry.rs`: every unit and
//! every entry point with its per-dtype instantiations. build.rs, the embedded NVRTC
//! program and the launch handles all derive from that table (`src/cuda/kernels.rs`).
//! `build.rs` compiles them to PTX when nvcc is present; otherwise the embedded sources are
//! compiled by NVRTC on first use, once per process and architecture, and loaded once per
//! CUDA context for as long as a [`Context`] on it is alive.
//!
//! Streams: every plan enqueues on its context's stream (a cudarc stream, or a framework's
//! raw `CUstream` through [`Context::from_raw_stream`]) and only waits when a method hands
//! back host data. Steps allocate nothing.
//!
//! # How a step runs
//! - `ef_accumulate` reads `g`, `e` (and `u`) once and writes `p` (and `u'`) into the
//!   *other* half of ping-pong buffers, counting non-finite elements. A device word names
//!   the current half; `ef_commit`, the step's last kernel, flips it only when the count is
//!   0, so a rejected step leaves `e` and `u` as they were without any host round trip, and
//!   [`crate::Compress::payload`] / [`crate::Compress::check`] report
//!   [`crate::Error::NonFinite`].
//! - Selection is a radix select on 32-bit keys (inverted magnitude bits for top-r, Philox
//!   words for random-k), digits of 11/11/10 bits. Groups up to a block's worth (2^15 in
//!   global mode, 2^20 per layer) run one block each in a single launch. Larger groups use
//!   grid-wide passes in the spirit of AIR top-k: per-block shared histograms flushed to a
//!   global one (the first fused into `ef_accumulate` in global mode), a one-block pivot
//!   search, elements below the pivot marked in a bitmap on the next pass, and the elements
//!   sharing the pivot prefix copied to a candidate buffer once they fit, so later passes
//!   read only that buffer. The last pass marks the ties at the exact pivot key; an ordered
//!   compaction (tile counts, scan, emit) keeps the lowest-indexed ties (SPEC §1) and yields
//!   ascending indices. rTop-k compacts the top-r set to a list and runs the same select on
//!   the Philox keys of that list. Values, residual update and momentum masking are fused
//!   into the final emit.
//! - Statistics, the scaled-sign scale and the variance estimator are segmented reductions
//!   over items of at most 4096 elements merged per layer with Chan's formula in f64.
//! - Aggregation validates payloads on the device; the kernels that write the output read
//!   a device flag first and do nothing if any payload was bad.
//!
//! # Launches, tuning and loading
//! A step is written once against an enqueue interface with two sides: the live one launches
//! on the stream and counts ([`Compressor::launches_last_step`]); a recorder only records, so
//! [`launches_per_step`] reports the exact launch sequence of a layout and configuration
//! without a GPU (12 launches per grid-wide group for top-k, 24 for rTop-k, plus 3 per step;
//! every group up to the block cut-off shares one launch). [`Tuning`] sets that cut-off and
//! whether the first histogram is fused into `ef_accumulate`. Kernel images are chosen by
//! [`driver_version`] and the device's compute capability: cubins (`GRADSIFT_CUBIN_DIR`, or
//! NVRTC for the exact sm), then PTX only where the driver is at least as new as the PTX; a
//! driver too old for every image is [`crate::Error::CudaDriverTooOld`], naming both versions.
//!
//! `scripts/cuda-emu/` runs the kernels on the CPU (fibers for threads) against models of
//! docs/SPEC.md, for machines without a GPU, and checks them for races, barrier and warp-mask
//! misuse, out-of-bounds and uninitialised reads under fixed and random schedules.

mod abi;
mod aggregate;
mod compress;
mod context;
mod image;
mod kernels;
mod launch;
mod qsgd;
mod select;
mod sign;
mod sparse;
mod stats;

pub use aggregate::Aggregator;
pub use compress::{Compressor, launches_per_step};
#[cfg(feature = "nccl")]
pub(crate) use context::catch_panic;
pub use context::{
    Context, compile_cubin, compile_ptx, driver_version, nvrtc_version, probe_driver, probe_nvrtc,
};
pub use image::CudaVersion;
pub use kernels::{KERNEL_NAMES, kernel_source};
pub use launch::{Launch, StepLaunches};
pub use select::TopR;
pub use sparse::Tuning;
pub use stats::{Stats, estimate_variance, layer_stats};
