//! The CPU backend: the executable form of docs/SPEC.md, and the default for users without a
//! GPU.
//!
//! [`Compressor`], [`Aggregator`] and [`Stats`] implement the backend contract
//! ([`crate::Compress`], [`crate::Aggregate`], [`crate::Statistics`]) that the CUDA and wgpu
//! backends implement too, with host slices as the "device" buffers; every GPU backend is
//! tested against this module.

mod aggregate;
mod compress;
mod select;
mod stats;

pub(crate) use aggregate::check_payload;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) use aggregate::reciprocals;
pub use aggregate::{Aggregator, Average};
pub use compress::{Compressor, random_k, rtopk, top_r};
pub use select::{Selector, magnitude_key};
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) use stats::check_workers;
pub use stats::{
    LayerStats, Stats, VarianceEstimate, VarianceTracker, estimate_variance, layer_stats,
};
