//! QSGD on CUDA (SPEC §13, `kernels/qsgd.cu`): the plan's buffers, its passes inside the
//! error-feedback step, and its payload's way back to the host.

use super::abi::{QsgdArgs, StepBuffers};
use super::compress::ItemShape;
use super::context::{Context, DevBuf};
use super::kernels::typed as K;
use super::launch::Enqueue;
use crate::{Config, Payload, Result};

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct QsgdPtrs {
    items: u64,
    partial: u64,
    group_items: u64,
    scales: u64,
    codes: u64,
    levels: u8,
    feedback: bool,
}

/// The sign's work items, one maximum of |p| per item, the scales and the `n` signed levels
/// (whole words: `qsgd_apply` stores four codes at a time).
#[derive(Debug)]
pub(super) struct Qsgd {
    pub(super) shape: ItemShape,
    levels: u8,
    feedback: bool,
    n: usize,
    items: DevBuf,
    partial: DevBuf,
    group_items: DevBuf,
    scales: DevBuf,
    codes: DevBuf,
}

impl Qsgd {
    pub(super) fn new(
        cx: &Context,
        shape: ItemShape,
        (levels, feedback): (u8, bool),
        n: usize,
    ) -> Result<Self> {
        Ok(Self {
            items: DevBuf::from_slice(cx, &shape.items)?,
            partial: DevBuf::zeroed(cx, shape.items.len() * 4)?,
            group_items: DevBuf::from_slice(cx, &shape.first)?,
            scales: DevBuf::zeroed(cx, shape.lens.len() * 4)?,
            codes: DevBuf::zeroed(cx, n.div_ceil(4) * 4)?,
            levels,
            feedback,
            n,
            shape,
        })
    }

    pub(super) fn ptrs(&self) -> QsgdPtrs {
        QsgdPtrs {
            items: self.items.ptr(),
            partial: self.partial.ptr(),
            group_items: self.group_items.ptr(),
            scales: self.scales.ptr(),
            codes: self.codes.ptr(),
            levels: self.levels,
            feedback: self.feedback,
        }
    }

    /// The payload's two device arrays, `(bytes, address)`: the scales, then the `n` codes.
    pub(super) fn arrays(&self) -> [(usize, u64); 2] {
        [
            (self.shape.ngroups() as usize * 4, self.scales.ptr()),
            (self.n, self.codes.ptr()),
        ]
    }

    /// `out` from the bytes of [`Qsgd::arrays`], reusing its buffers.
    pub(super) fn fill(&self, out: &mut Payload, scales: &[u8], codes: &[u8]) {
        let p = out.qsgd_slot();
        p.n = self.n as u32;
        p.levels = self.levels;
        p.scales.clear();
        p.scales.extend_from_slice(bytemuck::cast_slice(scales));
        p.codes.clear();
        p.codes.extend_from_slice(bytemuck::cast_slice(codes));
    }

    /// `(codes, scales, groups)` for frameworks that gather the payload on the device.
    pub(super) fn device_payload(&self) -> (u64, u64, usize) {
        let g = self.shape.ngroups() as usize;
        (self.codes.ptr(), self.scales.ptr(), g)
    }
}

/// QSGD's part of the step: `accumulate` (which computes `p`), then the item maxima (which
/// also zero the code words items share), the per-group scale, the codes with the residual.
pub(super) fn enqueue<E: Enqueue>(
    e: &mut E,
    b: StepBuffers,
    config: &Config,
    (shape, ptr): (&ItemShape, QsgdPtrs),
    (t_lo, t_hi): (u32, u32),
    accumulate: impl FnOnce(&mut E) -> Result<()>,
) -> Result<()> {
    accumulate(e)?;
    let a = QsgdArgs {
        b,
        items: ptr.items,
        partial: ptr.partial,
        group_items: ptr.group_items,
        scales: ptr.scales,
        codes: ptr.codes,
        ngroups: shape.ngroups(),
        levels: u32::from(ptr.levels),
        worker: config.worker,
        t_lo,
        t_hi,
        s_lo: config.seed as u32,
        s_hi: (config.seed >> 32) as u32,
        feedback: u32::from(ptr.feedback),
    };
    e.launch(K::QsgdPartial, None, shape.n_items(), 256, &a)?;
    e.launch(K::QsgdMerge, None, shape.ngroups(), 256, &a)?;
    e.launch(K::QsgdApply, None, shape.n_items(), 256, &a)
}
