//! The CPU backend: the executable form of docs/SPEC.md, and the default for users without a
//! GPU.
//!
//! [`Compressor`], [`Aggregator`] and [`Stats`] implement the backend contract
//! ([`crate::Compress`], [`crate::Aggregate`], [`crate::Statistics`]) that the CUDA and wgpu
//! backends implement too, with host slices as the "device" buffers; every GPU backend is
//! tested against this module.
//!
//! # Threads
//!
//! The accumulate pass of a step, the selection, and the aggregation run on rayon's
//! *current* thread pool: the global pool (one thread per core; `RAYON_NUM_THREADS` sets
//! it), or the pool a caller enters with [`rayon::ThreadPool::install`]. Inputs below
//! [`PAR_MIN`] elements (and every input in a 1-thread pool) stay on the calling thread.
//! Statistics split over layers. Every result (indices, values, residual, momentum, the
//! aggregate, the statistics) is the same bits for any thread count: chunks are index ranges,
//! merged by integer addition or in index order, and no float sum is reordered.
//!
//! ```
//! use gradsift::{Compress, Config, Layout, cpu};
//! let g: Vec<f32> = (0..1u32 << 19).map(|i| ((i * 7919) % 1000) as f32).collect();
//! let layout = Layout::single(g.len())?;
//! let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
//! let mut a = cpu::Compressor::new(&layout, &Config::topk(0.01))?;
//! let mut b = cpu::Compressor::new(&layout, &Config::topk(0.01))?;
//! let serial = one.install(|| a.step(&g, 0).cloned())?;
//! assert_eq!(&serial, b.step(&g, 0)?); // all cores, same payload
//! # Ok::<(), gradsift::Error>(())
//! ```

mod aggregate;
mod compress;
mod par;
mod select;
mod stats;

pub use aggregate::Aggregator;
pub use compress::{Compressor, random_k, rtopk, top_r};
pub use par::PAR_MIN;
pub(crate) use par::chunk_len;
pub use select::{Items, Selector};
pub use stats::{Stats, VarianceTracker, estimate_variance, layer_stats};
// The contract's own types, where they lived before `crate::contract` (paths users wrote).
pub use crate::contract::{Average, LayerStats, VarianceEstimate, magnitude_key};
