//! Scaled sign on CUDA (SPEC §6, `kernels/sign.cu`): the plan's buffers, its passes inside
//! the error-feedback step, and its payload's way back to the host.

use super::abi::{SignArgs, StepBuffers};
use super::compress::ItemShape;
use super::context::{Context, DevBuf};
use super::kernels::typed as K;
use super::launch::Enqueue;
use crate::{Payload, Result};

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct SignPtrs {
    items: u64,
    partial: u64,
    group_items: u64,
    group_len: u64,
    scales: u64,
    words: u64,
}

/// Work items, one f64 partial sum of |p| per item, the scales and the sign words.
#[derive(Debug)]
pub(super) struct Sign {
    pub(super) shape: ItemShape,
    items: DevBuf,
    partial: DevBuf,
    group_items: DevBuf,
    group_len: DevBuf,
    scales: DevBuf,
    words: DevBuf,
}

impl Sign {
    pub(super) fn new(cx: &Context, shape: ItemShape) -> Result<Self> {
        Ok(Self {
            items: DevBuf::from_slice(cx, &shape.items)?,
            partial: DevBuf::zeroed(cx, shape.items.len() * 8)?,
            group_items: DevBuf::from_slice(cx, &shape.first)?,
            group_len: DevBuf::from_slice(cx, &shape.lens)?,
            scales: DevBuf::zeroed(cx, shape.lens.len() * 4)?,
            words: DevBuf::zeroed(cx, shape.n_words64 * 8)?,
            shape,
        })
    }

    pub(super) fn ptrs(&self) -> SignPtrs {
        SignPtrs {
            items: self.items.ptr(),
            partial: self.partial.ptr(),
            group_items: self.group_items.ptr(),
            group_len: self.group_len.ptr(),
            scales: self.scales.ptr(),
            words: self.words.ptr(),
        }
    }

    /// The payload's two device arrays, `(bytes, address)`: the scales, then the sign words.
    pub(super) fn arrays(&self) -> [(usize, u64); 2] {
        [
            (self.shape.ngroups() as usize * 4, self.scales.ptr()),
            (self.shape.n_words64 * 8, self.words.ptr()),
        ]
    }

    /// `out` from the bytes of [`Sign::arrays`], reusing its buffers.
    pub(super) fn fill(out: &mut Payload, n: u32, scales: &[u8], words: &[u8]) {
        let p = out.sign_slot();
        p.n = n;
        p.scales.clear();
        p.scales.extend_from_slice(bytemuck::cast_slice(scales));
        // Two little-endian u32 halves per u64 word: the same bytes.
        p.negative.clear();
        p.negative.extend_from_slice(bytemuck::cast_slice(words));
    }

    /// `(sign words, scales, groups)` for frameworks that gather the payload on the device.
    pub(super) fn device_payload(&self) -> (u64, u64, usize) {
        let g = self.shape.ngroups() as usize;
        (self.words.ptr(), self.scales.ptr(), g)
    }
}

/// The sign's part of the step: the bits are cleared before `accumulate` (which computes
/// `p`), then the partial sums, the per-group scale and the bits with the residual update.
pub(super) fn enqueue<E: Enqueue>(
    e: &mut E,
    b: StepBuffers,
    shape: &ItemShape,
    ptr: SignPtrs,
    accumulate: impl FnOnce(&mut E) -> Result<()>,
) -> Result<()> {
    e.memset(ptr.words, 0, shape.n_words64 * 8)?;
    accumulate(e)?;
    let a = SignArgs {
        b,
        items: ptr.items,
        partial: ptr.partial,
        group_items: ptr.group_items,
        group_len: ptr.group_len,
        scales: ptr.scales,
        words: ptr.words,
        ngroups: shape.ngroups(),
        pad: 0,
    };
    e.launch(K::SignPartial, None, shape.n_items(), 256, &a)?;
    e.launch(K::SignMerge, None, shape.ngroups(), 256, &a)?;
    e.launch(K::SignApply, None, shape.n_items(), 256, &a)
}
