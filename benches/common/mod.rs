//! Shared bench inputs.

/// `n` standard normals (Box-Muller on a 64-bit LCG): the same data for every backend's
/// bench, reproducible without pulling rand's distributions in.
pub fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| ((-2.0 * next().ln()).sqrt() * (std::f64::consts::TAU * next()).cos()) as f32)
        .collect()
}
