//! Scaled sign (SPEC §6, signSGD with one scale per group): one bit per element, set when
//! `p < 0` (so zeros, `-0.0` included, decode as positive), and one f32 per group, `mean |p|`, summed in f64. The GPU backends reduce in other orders,
//! so their scales agree with this one within SPEC §11's tolerance; every element decodes to
//! `±scale`.

use crate::{Group, SignPayload};

/// The host check of a sign payload against a plan of `n` elements in `groups` groups, which
/// the server, the wire encoder and every backend run before reading one: one finite scale
/// per group and `ceil(n / 64)` words of sign bits.
pub(crate) fn check(p: &SignPayload, n: usize, groups: usize) -> Result<(), String> {
    if p.scales.len() != groups {
        return Err(format!("{} scales for {groups} groups", p.scales.len()));
    }
    if p.negative.len() != n.div_ceil(64) {
        return Err(format!("{} sign words for {n} elements", p.negative.len()));
    }
    if let Some(j) = p.scales.iter().position(|v| !v.is_finite()) {
        return Err(format!("scale {j} is not finite"));
    }
    Ok(())
}

/// Encodes `p` (the whole buffer, finite) group by group into `out`, reusing its buffers,
/// and leaves `p - decode` in `p` (SPEC §5, in the same pass): the CPU backend's encoder and
/// the reference of the GPU kernels.
pub(crate) fn encode(p: &mut [f32], groups: &[Group], out: &mut SignPayload) {
    out.scales.clear();
    out.negative.clear();
    out.negative.resize(p.len().div_ceil(64), 0);
    for g in groups {
        let x = &mut p[g.range.clone()];
        let sum: f64 = x.iter().map(|v| f64::from(v.abs())).sum();
        let scale = if x.is_empty() {
            0.0
        } else {
            (sum / x.len() as f64) as f32
        };
        out.scales.push(scale);
        for (j, v) in x.iter_mut().enumerate() {
            let i = g.range.start + j;
            if *v < 0.0 {
                out.negative[i / 64] |= 1 << (i % 64);
                *v += scale;
            } else {
                *v -= scale;
            }
        }
    }
}
