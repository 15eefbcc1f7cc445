//! `gradsift-cli`: the research application around the `gradsift` library (`gradsift train`,
//! `gradsift analyze`, `gradsift reproduce`, `gradsift demo`), a crate of its own so that
//! the library's dependents get none of its dependencies (clap, candle, plotters, serde).
//! A library as well as a binary so that tests (and other tools) can call the commands
//! without spawning the process; `src/main.rs` only dispatches.

pub mod analyze;
pub mod backend;
pub mod demo;
pub mod error;
pub mod mnist;
pub mod model;
pub use gradsift::npy;
pub mod plot;
pub mod report;
pub mod reproduce;
// The experiments `reproduce` runs, each a section of its report (cli/src/reproduce/).
pub use reproduce::{adaptive, setups, theory};
pub mod train;

/// SplitMix64 with Box-Muller normals: deterministic on every platform and across crate
/// versions (unlike a library RNG whose algorithm may change), so seeded runs reproduce.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1), never 0 (so `ln` is finite).
    pub(crate) fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal.
    pub(crate) fn normal(&mut self) -> f64 {
        (-2.0 * self.uniform().ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }
}
