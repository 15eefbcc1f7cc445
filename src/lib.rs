#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod backend;
pub mod codec;
mod config;
pub mod contract;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dist;
mod dtype;
mod error;
mod layout;
#[cfg(feature = "npy")]
pub mod npy;
#[doc = include_str!("../docs/SPEC.md")]
pub mod spec {}
mod payload;
pub mod philox;
pub mod rd;
#[cfg(feature = "wgpu")]
pub mod wgpu;
pub mod wire;

pub use backend::{
    Aggregate, Aggregator, Backend, Compress, Compressor, Device, Skipped, Statistics, Stats,
};
pub use config::{Config, Count, Group, Method, MethodKind, QSGD_MAX_LEVELS, Scale};
pub use contract::{Average, LayerStats, VarianceEstimate};
pub use cpu::VarianceTracker;
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use layout::{Layout, MAX_ELEMENTS, Mode};
pub use payload::{Payload, QsgdPayload, SignPayload, SparsePayload};
