//! The CUDA backend (feature `cuda`): the CPU backend's items under the same names and
//! parameter order, with a [`Context`] first. Built on cudarc with dynamic loading, so the
//! crate compiles and links on machines without CUDA; constructing a [`Context`] there
//! returns [`crate::Error::BackendUnavailable`] saying what is missing.
//!
//! Kernels live in `kernels/*.cu`. `build.rs` compiles them to PTX when nvcc is present;
//! otherwise the embedded sources are compiled by NVRTC on first use, once per process and
//! architecture, and loaded once per CUDA context.
//!
//! Streams: every plan enqueues on its context's stream (a cudarc stream, or a framework's
//! raw `CUstream` through [`Context::from_raw_stream`]) and only waits when a method hands
//! back host data. Steps allocate nothing.

mod abi;
mod aggregate;
mod compress;
mod context;
mod select;
mod stats;

pub use aggregate::Aggregator;
pub use compress::Compressor;
pub use context::{
    Context, KERNEL_NAMES, compile_cubin, compile_ptx, kernel_source, probe_driver, probe_nvrtc,
};
pub use select::TopR;
pub use stats::{Stats, estimate_variance, layer_stats};
