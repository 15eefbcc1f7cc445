//! The CPU backend: the executable form of docs/SPEC.md, and the default for users without a GPU.
//!
//! Every GPU backend exposes the same items under the same names and parameter order
//! (`Compressor::new(.., layout, config)`, `Compressor::step(grad, step)`,
//! `Aggregator::aggregate(payloads, out)`, `layer_stats`, `estimate_variance`) and is tested
//! against this module.

mod aggregate;
mod compress;
mod select;
mod stats;

pub use aggregate::{Aggregator, Average};
pub(crate) use aggregate::{check_payload, reciprocals};
pub use compress::{Compressor, random_k, rtopk, top_r};
pub use select::{Selector, magnitude_key};
pub use stats::{LayerStats, VarianceEstimate, VarianceTracker, estimate_variance, layer_stats};
