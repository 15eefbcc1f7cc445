//! The command-line face of the crate (feature `cli`, on by default): `gradsift demo` and
//! `gradsift analyze`. Library-level so that tests (and other tools) can call the commands
//! without spawning the binary; `src/main.rs` only dispatches.

pub mod analyze;
pub mod demo;
pub mod npy;
pub mod plot;
