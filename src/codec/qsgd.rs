//! QSGD-style stochastic quantisation (SPEC §13; Alistarh et al., "QSGD:
//! Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS 2017), in
//! its max-norm form: each group's elements are scaled by `s / max |p|` and rounded to an
//! integer level, down or up at random with the probability that makes the decoded value
//! unbiased. The randomness is Philox (SPEC §3's block, its second word), so every backend
//! rounds every element the same way, and the scale is a maximum, which every reduction
//! order computes exactly: every backend's payload is the same bits.

use crate::QsgdPayload;
use crate::config::QSGD_MAX_LEVELS;
use crate::cpu::chunk_len;
use crate::philox::philox4x32_10;
use rayon::prelude::*;

/// The uniform draw in `[0, 1)` that rounds element `index` (SPEC §13): the top 24 bits of
/// word 1 of SPEC §3's Philox block for `(index, worker, step, seed)`, times `2^-24`,
/// exact in f32. Word 0 is random-k's key, so the two draws are independent.
#[inline]
pub fn uniform(index: u32, worker: u32, step: u64, seed: u64) -> f32 {
    let w = philox4x32_10(
        [index, worker, step as u32, (step >> 32) as u32],
        [seed as u32, (seed >> 32) as u32],
    )[1];
    (w >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// `f32(levels) / scale`, the factor that maps `|p|` onto `0..=levels` (SPEC §13), or 0 for
/// a group whose `max |p|` is 0 (every level is then 0).
#[inline]
pub fn inverse(levels: u8, scale: f32) -> f32 {
    if scale > 0.0 {
        f32::from(levels) / scale
    } else {
        0.0
    }
}

/// The signed level of one element (SPEC §13): 0 for a zero `p`; `levels` when
/// `a = |p| * inv` reaches it (`a = +inf` included); otherwise `floor(a)`, plus 1 when
/// `u < a - floor(a)`. Negative for a negative `p`; 0 carries no sign.
///
/// # Examples
/// ```
/// use gradsift::codec::qsgd::{inverse, level};
/// let inv = inverse(4, 2.0); // levels at 0, 0.5, 1, 1.5, 2
/// assert_eq!(level(-1.25, inv, 4, 0.49), -3); // 2.5: up when u < 0.5
/// assert_eq!(level(-1.25, inv, 4, 0.5), -2);
/// assert_eq!(level(2.0, inv, 4, 0.0), 4);
/// ```
#[inline]
pub fn level(p: f32, inv: f32, levels: u8, u: f32) -> i8 {
    if p == 0.0 {
        return 0;
    }
    let a = p.abs() * inv;
    let l = if a >= f32::from(levels) {
        levels
    } else {
        let f = a.floor();
        // a - floor(a) is exact in f32, so every backend compares the same two numbers.
        f as u8 + u8::from(u < a - f)
    } as i8;
    if p < 0.0 { -l } else { l }
}

/// The value of one level step, `scale / f32(levels)` (SPEC §13): one correctly rounded f32
/// division per group, which every backend computes the same (CUDA `__fdiv_rn`, WGSL an
/// integer division, since WGSL's `/` may be 2.5 ulp off).
///
/// # Examples
/// ```
/// use gradsift::codec::qsgd::step;
/// assert_eq!(step(2.0, 4), 0.5);
/// assert_eq!(step(0.0, 7), 0.0);
/// ```
#[inline]
pub fn step(scale: f32, levels: u8) -> f32 {
    scale / f32::from(levels)
}

/// What a level decodes to (SPEC §13): `f32(level) * step`, one f32 multiply by the group's
/// [`step`], so that the server and the worker's residual agree bit for bit.
///
/// # Examples
/// ```
/// use gradsift::codec::qsgd::{decode, step};
/// assert_eq!(decode(-3, step(2.0, 4)), -1.5);
/// assert_eq!(decode(0, step(2.0, 4)), 0.0);
/// ```
#[inline]
pub fn decode(code: i8, step: f32) -> f32 {
    f32::from(code) * step
}

/// Bits one element's code takes on the wire: a sign bit and `ceil(log2(levels + 1))` level
/// bits (2 for `levels = 1`, 4 for 7, 8 for 127).
///
/// # Examples
/// ```
/// use gradsift::codec::qsgd::code_bits;
/// assert_eq!([code_bits(1), code_bits(7), code_bits(8), code_bits(127)], [2, 4, 5, 8]);
/// ```
pub const fn code_bits(levels: u8) -> u32 {
    1 + (8 - levels.leading_zeros())
}

/// The host check of a QSGD payload against a plan of `n` elements in `groups` groups, which
/// the server, the wire encoder and every backend run before reading one: `levels` in
/// `1..=127`, one finite non-negative scale per group, one code per element, each within
/// `-levels..=levels`.
pub(crate) fn check(p: &QsgdPayload, n: usize, groups: usize) -> Result<(), String> {
    check_shape(p, n, groups)?;
    let max = p.levels as i8;
    if let Some(j) = p.codes.iter().position(|c| !(-max..=max).contains(c)) {
        return Err(format!(
            "code {} at element {j} is beyond {} levels",
            p.codes[j], p.levels
        ));
    }
    Ok(())
}

/// The O(groups) part of [`check`]: levels, lengths and scales, not the codes (which a GPU
/// aggregator checks on the device).
pub(crate) fn check_shape(p: &QsgdPayload, n: usize, groups: usize) -> Result<(), String> {
    if !(1..=QSGD_MAX_LEVELS).contains(&p.levels) {
        return Err(format!(
            "{} levels, expected 1..={QSGD_MAX_LEVELS}",
            p.levels
        ));
    }
    if p.scales.len() != groups {
        return Err(format!("{} scales for {groups} groups", p.scales.len()));
    }
    if p.codes.len() != n {
        return Err(format!("{} codes for {n} elements", p.codes.len()));
    }
    if let Some(j) = p.scales.iter().position(|v| !v.is_finite() || *v < 0.0) {
        return Err(format!("scale {j} is not finite and non-negative"));
    }
    Ok(())
}

/// Encodes one group of `p` (the elements `start..start + p.len()` of the buffer) into
/// `codes`, leaves the residual in `p` (SPEC §5, fused into the same pass: `p - decode(code)`
/// with `feedback`, else 0) and returns the scale, `max |p|`: the CPU backend's encoder and
/// the reference the GPU kernels are tested against. `p` must be finite (the step checks it
/// first).
pub(crate) fn encode_group(
    p: &mut [f32],
    start: usize,
    rule: (u8, bool),
    key: (u32, u64, u64),
    codes: &mut [i8],
) -> f32 {
    let scale = max_abs(p);
    let q = (inverse(rule.0, scale), self::step(scale, rule.0));
    // An element's code depends on its index and its group's scale alone, so the chunks of
    // a large group round independently: the same bits at any thread count.
    let c = chunk_len(p.len());
    if c >= p.len() {
        encode_span(p, start, rule, q, key, codes);
    } else {
        p.par_chunks_mut(c)
            .zip(codes.par_chunks_mut(c))
            .enumerate()
            .for_each(|(i, (x, codes))| encode_span(x, start + i * c, rule, q, key, codes));
    }
    scale
}

/// `max |p|` of finite `p`, exact whatever the split (the CPU pool's chunks on a large
/// group).
fn max_abs(p: &[f32]) -> f32 {
    let fold = |x: &[f32]| x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let c = chunk_len(p.len());
    if c >= p.len() {
        fold(p)
    } else {
        p.par_chunks(c).map(fold).reduce(|| 0.0, f32::max)
    }
}

/// One chunk of [`encode_group`]: elements `start..start + p.len()` of the buffer, rounded
/// with their group's `(inv, step)`.
fn encode_span(
    p: &mut [f32],
    start: usize,
    (levels, feedback): (u8, bool),
    (inv, d): (f32, f32),
    (worker, step, seed): (u32, u64, u64),
    codes: &mut [i8],
) {
    for (j, (x, c)) in p.iter_mut().zip(codes.iter_mut()).enumerate() {
        let u = uniform((start + j) as u32, worker, step, seed);
        *c = level(*x, inv, levels, u);
        *x = if feedback { *x - decode(*c, d) } else { 0.0 };
    }
}

/// [`encode_group`] over every group of `p` (the whole buffer, finite) into `out`, whose
/// buffers are reused.
pub(crate) fn encode(
    p: &mut [f32],
    groups: &[crate::Group],
    feedback: bool,
    key: (u32, u64, u64),
    out: &mut QsgdPayload,
) {
    out.scales.clear();
    for g in groups {
        let codes = &mut out.codes[g.range.clone()];
        let x = &mut p[g.range.clone()];
        let scale = encode_group(x, g.range.start, (out.levels, feedback), key, codes);
        out.scales.push(scale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_never_exceed_the_maximum_and_zero_has_no_sign() {
        // |p| * (s / max) can round above s for the maximum itself.
        for &(x, s) in &[(3.0f32, 7u8), (0.1, 3), (1e-30, 127), (f32::MAX, 127)] {
            let inv = inverse(s, x);
            for u in [0.0, 0.5, 0.999_999_94] {
                assert!(level(x, inv, s, u).unsigned_abs() <= s);
                assert!(level(-x, inv, s, u).unsigned_abs() <= s);
            }
        }
        assert_eq!(level(-0.0, 1.0, 3, 0.0), 0);
        // A subnormal scale overflows inv to +inf (SPEC §13): level s, or 0 for a zero.
        let inv = inverse(127, 1e-40);
        assert_eq!(inv, f32::INFINITY);
        assert_eq!(level(-1e-40, inv, 127, 0.5), -127);
        assert_eq!(level(0.0, inv, 127, 0.5), 0);
        assert_eq!(level(-1e-9, 1.0, 3, 0.5), 0);
    }

    #[test]
    fn the_rounding_is_unbiased() {
        // Over many draws the mean decoded value is p (up to the sampling error).
        let (s, scale, x) = (3u8, 1.0f32, 0.45f32);
        let inv = inverse(s, scale);
        let trials = 200_000u32;
        let mean: f64 = (0..trials)
            .map(|i| {
                f64::from(decode(
                    level(x, inv, s, uniform(i, 0, 0, 1)),
                    step(scale, s),
                ))
            })
            .sum::<f64>()
            / f64::from(trials);
        // sd of one draw <= 1/(2s); of the mean <= 0.17 / sqrt(2e5) = 4e-4.
        assert!((mean - f64::from(x)).abs() < 2e-3, "mean {mean}");
    }

    #[test]
    fn a_zero_group_sends_zero_levels() {
        let mut codes = [5i8; 4];
        let scale = encode_group(&mut [0.0; 4], 0, (7, true), (0, 0, 0), &mut codes);
        assert_eq!((scale, codes), (0.0, [0; 4]));
    }
}
