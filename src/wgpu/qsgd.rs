//! QSGD on wgpu (SPEC §13, the `qsgd_*` passes of `shaders/compress.wgsl`): its passes in
//! the step and its payload's read-back.

use super::compress::Recorder;
use super::context::floats;
use super::passes::CompressPass as P;
use crate::Payload;

impl Recorder {
    /// QSGD: per-tile maxima of |p|, the per-group scale and quotients, the codes.
    pub(super) fn qsgd(&mut self, tiles: (u32, u32), groups: (u32, u32)) {
        self.plain([
            (P::QsgdPartial, tiles),
            (P::QsgdScale, groups),
            (P::QsgdApply, tiles),
        ]);
    }
}

/// A QSGD payload from its read-back scales and `n` code bytes, reusing `out`'s buffers.
pub(super) fn fill(out: &mut Payload, n: u32, levels: u8, scales: &[u8], codes: &[u8]) {
    let p = out.qsgd_slot();
    p.n = n;
    p.levels = levels;
    p.scales.clear();
    p.scales.extend(floats(scales));
    p.codes.clear();
    p.codes.extend(codes.iter().map(|&x| x as i8));
}
