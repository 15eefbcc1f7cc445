//! The codecs' backend-independent parts, one module per codec: the element rule of the
//! SPEC in plain Rust (what every backend's kernel computes, and what the CPU backend runs),
//! the payload checks every backend makes on the host, and the sizes the wire format and the
//! plans need. A backend's error-feedback step calls its codec's encoder on `p` and commits
//! `e = p - decode(c)` (SPEC §5) the same way for every codec.
//!
//! Today [`qsgd`] is the one codec written this way; sparse selection and scaled sign still
//! live in each backend's step (issue #25 moves them here).

pub mod qsgd;
