//! The codecs' backend-independent parts, one module per codec: the element rule of the
//! SPEC in plain Rust (what every backend's kernel computes, and what the CPU backend runs),
//! the payload checks every backend makes on the host, and the sizes the wire format and the
//! plans need. A backend's error-feedback step calls its codec's encoder on `p` and commits
//! `e = p - decode(c)` (SPEC §5) the same way for every codec.
//!
//! One module per codec: [`qsgd`] (SPEC §13), `sign` (§6) and `sparse` (§1-§5, whose
//! selection engines are the backends' own). The CPU backend's step (`cpu/compress.rs`) is
//! the error-feedback frame around them; the GPU backends' kernels (`kernels/qsgd.cu`,
//! `sign.cu`, `select.cu`, `shaders/compress.wgsl`) implement the same rules.

pub mod qsgd;
pub(crate) mod sign;
pub(crate) mod sparse;
