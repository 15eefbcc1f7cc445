//! Test inputs: deterministic gradients, layouts and adversarial data.

use super::*;

// ---- data ---------------------------------------------------------------------------------

/// Reproducible values: a 64-bit LCG, Gaussian-ish by summing uniforms.
pub(crate) fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            let mut acc = 0.0f32;
            for _ in 0..3 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                acc += ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            }
            acc
        })
        .collect()
}
/// Dyadic values (multiples of 2^-6 in [-4, 4]) so that momentum arithmetic is exact and a
/// fused multiply-add cannot change a bit: the selections must then agree exactly.
pub(crate) fn dyadic(n: usize, seed: u64) -> Vec<f32> {
    data(n, seed)
        .into_iter()
        .map(|x| (x * 256.0).round() / 64.0)
        .collect()
}
pub(crate) fn to<T: Element>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v)).collect()
}
/// The old CUDA suite's generator: an LCG with Box-Muller Gaussians.
pub(crate) struct Lcg(pub(crate) u64);
impl Lcg {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }
    pub(crate) fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub(crate) fn gaussian(&mut self) -> f32 {
        ((-2.0 * self.uniform().ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos())
            as f32
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        (self.next_u64() >> 33) % n.max(1)
    }
}
pub(crate) fn gaussian<T: Element>(n: usize, seed: u64, scale: f32) -> Vec<T> {
    let mut r = Lcg(seed);
    (0..n).map(|_| T::from_f32(r.gaussian() * scale)).collect()
}
/// Few distinct magnitudes, both zeros, subnormals: every tie rule gets exercised.
pub(crate) fn adversarial<T: Element>(n: usize, seed: u64) -> Vec<T> {
    let mut r = Lcg(seed);
    let pool = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        2.0,
        -2.0,
        f32::from_bits(1),
        -f32::from_bits(3),
        1e-3,
    ];
    (0..n)
        .map(|_| T::from_f32(pool[r.below(pool.len() as u64) as usize]))
        .collect()
}
pub(crate) fn mixed_layout(layers: usize, seed: u64) -> Layout {
    let mut s = seed;
    let sizes: Vec<usize> = (0..layers)
        .map(|l| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            match l % 10 {
                0 => 0,
                1 => 1,
                2 => 4096 + (s >> 60) as usize,
                3 if l % 100 == 3 => 20_000 + (s >> 50) as usize % 5000,
                _ => 1 + (s >> 33) as usize % 700,
            }
        })
        .collect();
    Layout::new(&sizes).unwrap()
}
pub(crate) fn sizes_layouts(n: usize) -> Vec<Layout> {
    let mut v = vec![Layout::single(n).unwrap()];
    if n >= 3 {
        v.push(Layout::new(&[n / 3, 0, n - n / 3]).unwrap());
    }
    v
}
