//! Sparse selection (SPEC §1-§4: top-r, random-k, rTop-k): the payload is the ascending
//! indices the selection chose and their values `quantize(p_i * scale_g)` (SPEC §5). The
//! selection itself is each backend's own engine (`cpu/select.rs`, the radix passes of
//! `kernels/select.cu` and `shaders/compress.wgsl`); what is common is here.

use crate::{DType, Group, SparsePayload};

/// The host check of a sparse payload against a plan of `n` elements: as many values as
/// indices, every index below `n` and above its predecessor, every value finite.
pub(crate) fn check(p: &SparsePayload, n: usize) -> Result<(), String> {
    if p.indices.len() != p.values.len() {
        return Err(format!(
            "{} indices but {} values",
            p.indices.len(),
            p.values.len()
        ));
    }
    let mut prev: Option<u32> = None;
    for (j, &i) in p.indices.iter().enumerate() {
        if i as usize >= n {
            return Err(format!(
                "index {i} at position {j} is out of range (n = {n})"
            ));
        }
        if prev.is_some_and(|q| q >= i) {
            return Err(format!(
                "index {i} at position {j} is not above its predecessor (unsorted or duplicate)"
            ));
        }
        prev = Some(i);
    }
    if let Some(j) = p.values.iter().position(|v| !v.is_finite()) {
        return Err(format!("value at position {j} is not finite"));
    }
    Ok(())
}

/// The values of the selected `indices` (each group's `k` of them in turn, ascending):
/// `quantize(p_i * scale_g)` in `values` (cleared first). Returns the count of values that
/// came out non-finite (only `Scale::Unbiased` can overflow a finite `p`) and the lowest
/// index among them, `(0, 0)` when there is none: the step must then fail (SPEC §5).
pub(crate) fn values(
    p: &[f32],
    groups: &[Group],
    indices: &[u32],
    dtype: DType,
    values: &mut Vec<f32>,
) -> (u64, u32) {
    values.clear();
    // Groups are contiguous and ascending, so each group's span of `indices` is its own, and
    // the first bad value met has the lowest index.
    let (mut bad, mut first) = (0u64, 0u32);
    let mut at = 0;
    for g in groups {
        for &i in &indices[at..at + g.k] {
            let v = dtype.quantize(p[i as usize] * g.scale);
            if !v.is_finite() {
                if bad == 0 {
                    first = i;
                }
                bad += 1;
            }
            values.push(v);
        }
        at += g.k;
    }
    (bad, first)
}
