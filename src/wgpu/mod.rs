//! The portable GPU backend: WGSL compute shaders (`shaders/`) driven through `wgpu`
//! (Vulkan, Metal, DX12; in CI Mesa's lavapipe). [`Compressor`], [`Aggregator`] and [`Stats`]
//! implement the backend contract ([`crate::Compress`], [`crate::Aggregate`],
//! [`crate::Statistics`]) with `wgpu::Buffer` as the device buffer type, plus a [`Context`] that owns the device and every pipeline and bind-group layout, built
//! once and shared (cheap clone) by all plans.
//!
//! # Data
//! Gradients are read as packed `u32` words: f32 by bitcast, f16 by an exact integer widening
//! (two per word, element `2j` in the low half), bf16 by a shift. No optional shader feature
//! is needed. Sent values are rounded to f16/bf16 with integer round-to-nearest-even and
//! saturation, bit-identical to [`crate::DType::quantize`]. Philox4x32-10 uses a 16-bit-halves
//! 32x32->64 multiply and matches [`crate::philox`] bit for bit.
//!
//! # The step
//! One submission: accumulate `p = e + g` (or with momentum) into the *next* residual buffer
//! while counting non-finite values and building the round-0 histogram per tile; a radix
//! select by magnitude; for rTop-k a second radix select on the Philox keys of the top-r list;
//! a bitmap-to-index scan that writes the payload in ascending order and subtracts what was
//! sent; and a one-thread commit. Nothing is read back between passes: counts that size later
//! passes (candidates per round) stay on the device and drive indirect dispatches.
//!
//! Selection is a radix select over the 64-bit composite key `key << 32 | index`, one byte per
//! round (8 rounds at most). Per group, a pivot pass (one workgroup per group) finds the byte
//! holding the `need`-th smallest key; a compact pass emits everything below it and appends
//! the pivot byte's elements to a candidate list while histogramming their next byte. A group
//! whose pivot bin is exactly what it still needs takes the bin and finishes, so typical data
//! finishes in 2-3 rounds. A one-thread `prep` pass before each round sizes that round's
//! pivot (only the groups the previous pivot left selecting, kept in a device-side list) and
//! compact (one thread per candidate) as indirect dispatches, so finished rounds cost two
//! empty dispatches. Because the index is part of
//! the key, ties resolve to the lower index (SPEC §1, §3) with no sort. Round 0 runs over
//! 4096-element tiles that never straddle a group, with workgroup-local histograms; later
//! rounds privatise the histogram for the group of each workgroup's first candidate. So one
//! huge layer and thousands of small ones (per-layer mode) go through the same passes and
//! every pass's work is proportional to its input, plus one tiny workgroup per group per round.
//!
//! # Rejected steps
//! Residual and momentum are ping-pong pairs; a device-side word names the current one. Every
//! pass reads it and writes only the other buffer; the last pass flips it only when no
//! non-finite value was counted. [`crate::Compress::step_device`] therefore returns without
//! waiting, and the rejection is reported by the next host read ([`crate::Compress::payload`],
//! [`crate::Compress::read_payload`], [`crate::Compress::check`]) as
//! [`crate::Error::NonFinite`] with the count and first index; residual and momentum are then
//! exactly as before the step. A device-side counter of rejected steps survives until that
//! read, and [`crate::Compress::rejected_steps`] adds them up, so no rejection is lost. The
//! cost is a second residual (and momentum) buffer; nothing is read back mid-step.
//!
//! # Limits and errors
//! The device is requested with the adapter's real limits. A plan buffer above
//! `max_storage_buffer_binding_size` is rejected at construction with an [`crate::Error::Device`]
//! that states the limit (no chunking yet), except for the variance estimator's host entry
//! point, which estimates per run of whole layers when the K stacked workers exceed one
//! binding (a single layer too large for it is that error). No adapter:
//! [`crate::Error::BackendUnavailable`].
//! Validation, out-of-memory and device-lost failures are caught with error scopes and a
//! device-lost callback and returned as [`crate::Error::Device`]; a failed submission executes
//! nothing, so state is untouched.

mod aggregate;
mod compress;
mod context;
#[cfg(test)]
mod layout;
mod passes;
mod qsgd;
mod sign;
mod sparse;
mod stats;

pub use aggregate::Aggregator;
pub use compress::Compressor;
pub use context::Context;
pub use stats::{Stats, estimate_variance, layer_stats};
