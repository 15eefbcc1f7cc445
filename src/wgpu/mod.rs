//! The portable GPU backend: WGSL compute shaders driven through `wgpu` (Vulkan, Metal, DX12;
//! in CI Mesa's lavapipe). Same items, names and parameter order as [`crate::cpu`]:
//! [`Compressor`], [`Aggregator`], [`layer_stats`], [`estimate_variance`], plus a [`Context`]
//! that owns the device and every pipeline, built once and shared by all plans.
//!
//! Device work is recorded into one submission per call and nothing is read back unless a
//! method that returns host data is called (`read_payload`, `residual_to_host`, ...).
//! Buffers larger than the adapter's `max_storage_buffer_binding_size` (requested at its real
//! value) are rejected at plan construction with an error that states the limit.

mod aggregate;
mod compress;
mod context;
mod stats;

pub use aggregate::Aggregator;
pub use compress::Compressor;
pub use context::Context;
pub use stats::{Stats, estimate_variance, layer_stats};
