//! The one error type every backend returns.

use crate::wire::DecodeError;

/// Everything that can go wrong in gradsift. No public function panics on bad input;
/// it returns one of these instead, and a failed step leaves all state untouched.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The buffer has `n >= 2^32` elements; indices are `u32` (SPEC §0).
    #[error(
        "buffer of {n} elements is too large: gradsift indexes with u32, split it into buckets of fewer than 2^32 elements"
    )]
    TooLarge {
        /// Number of elements asked for.
        n: u64,
    },
    /// A buffer's length differs from what the plan or layout expects.
    #[error("{what}: expected {expected} elements, got {got}")]
    LengthMismatch {
        /// Which buffer.
        what: &'static str,
        /// Length the plan was built for.
        expected: usize,
        /// Length passed in.
        got: usize,
    },
    /// A configuration value is out of its domain (ratio outside [0, 1], `k > r`, `K = 0`, ...).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The accumulated vector `p` (residual + gradient) holds NaN or infinity, or (with a
    /// finite `p`) a sent value became infinite through `Scale::Unbiased`; nothing was
    /// written (SPEC §5, §10). Also the statistics' report of a non-finite input.
    #[error(
        "step rejected: {count} non-finite value(s) in the accumulated gradient or in its scaled sent values, the first at index {first_index}; residual and momentum are unchanged"
    )]
    NonFinite {
        /// How many elements of `p` are NaN or +-inf; when `p` is finite, how many sent
        /// values overflowed through the unbiased scale.
        count: u64,
        /// The lowest such index (of `p`, or of the sent values).
        first_index: u32,
    },
    /// A payload could not be decoded; see [`DecodeError`].
    #[error("payload rejected: {0}")]
    Decode(#[from] DecodeError),
    /// A payload cannot be encoded (unsorted indices, a value not representable in its
    /// declared format, ...); nothing was written.
    #[error("payload cannot be encoded: {0}")]
    Encode(String),
    /// A (decoded) payload does not fit the aggregation it was handed to.
    #[error("payload {worker} rejected: {reason}; the output was not touched")]
    BadPayload {
        /// Position of the payload in the slice passed to `aggregate`.
        worker: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A backend cannot run here: no driver, no device, no compiler, or an API failure.
    #[error("{backend} backend unavailable: {reason}")]
    BackendUnavailable {
        /// "cuda" or "wgpu".
        backend: &'static str,
        /// Why, in words a user can act on.
        reason: String,
    },
    /// The CUDA driver is older than the toolkit that produced the only kernels available
    /// for this device: PTX from NVRTC/nvcc X.Y needs a driver for CUDA X.Y or newer, and no
    /// cubin for the device's architecture was found (or loaded). Names both versions.
    #[error(
        "cuda backend unavailable: the CUDA driver supports CUDA {}, but the kernels for sm_{sm} are PTX from CUDA {}, which needs a CUDA {} driver; update the driver, or ship a cubin for sm_{sm} (GRADSIFT_CUBIN_DIR) ({detail})",
        cuda_version(*driver), cuda_version(*needs), cuda_version(*needs)
    )]
    CudaDriverTooOld {
        /// CUDA version of the driver as `cuDriverGetVersion` encodes it (12080 is 12.8).
        driver: i32,
        /// CUDA version the PTX needs, encoded the same way (13000 is 13.0).
        needs: i32,
        /// The device's architecture number (90 for sm_90).
        sm: u32,
        /// What was tried.
        detail: String,
    },
    /// A GPU call failed after the backend was set up (out of memory, device lost, launch failure).
    #[error("{backend} backend error: {reason}")]
    Device {
        /// "cuda" or "wgpu".
        backend: &'static str,
        /// What the driver said.
        reason: String,
    },
    /// A collective of a distributed run failed, or the ranks disagree on the set-up
    /// ([`crate::dist`]).
    #[error("{transport} transport: {reason}")]
    Transport {
        /// "in-process", "mpi" or "nccl".
        transport: &'static str,
        /// What went wrong, and which ranks.
        reason: String,
    },
}

/// "12.8" for the driver API's encoding 12080.
fn cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
