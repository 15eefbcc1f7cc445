//! Scaled sign on wgpu (SPEC §6, the `sign_*` passes of `shaders/compress.wgsl`): its passes
//! in the step and its payload's read-back.

use super::compress::Recorder;
use super::context::floats;
use super::passes::CompressPass as P;
use crate::Payload;

impl Recorder {
    /// Scaled sign: per-tile partial sums of |p|, the per-group scale, the signs.
    pub(super) fn sign(&mut self, tiles: (u32, u32), groups: (u32, u32)) {
        self.plain([
            (P::SignPartial, tiles),
            (P::SignScale, groups),
            (P::SignApply, tiles),
        ]);
    }
}

/// A sign payload from its read-back scales and bit words, reusing `out`'s buffers.
pub(super) fn fill(out: &mut Payload, n: u32, scales: &[u8], bits: &[u8]) {
    let p = out.sign_slot();
    p.n = n;
    p.scales.clear();
    p.scales.extend(floats(scales));
    p.negative.clear();
    p.negative.extend(
        bits.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
    );
}
