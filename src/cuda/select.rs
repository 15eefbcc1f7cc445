//! Top-r selection alone (no error feedback): the GPU form of [`crate::cpu::top_r`].

use super::abi::{BigGroup, CompactArgs, SelArgs, StepBuffers, StepStatus};
use super::context::{Context, DevBuf};
use super::launch::Live;
use super::sparse::{cand_cap, run_big, tiles_of};
use crate::{Error, Layout, Result};
use cudarc::driver::{CudaSlice, DevicePtr};

/// A reusable plan selecting the `min(r, n)` largest-magnitude elements of an f32 buffer
/// of `n` elements (SPEC §1-2: ties to the lower index), reported as ascending indices.
///
/// The input is only read: the selection kernels see it as the "next residual" of a step
/// whose status word is never committed. Scratch is allocated here, once.
#[derive(Debug)]
pub struct TopR {
    cx: Context,
    n: usize,
    r: usize,
    status: DevBuf,
    /// The input as one big group (device copy of `group`).
    group: BigGroup,
    group_buf: DevBuf,
    sel: DevBuf,
    cand: DevBuf,
    defbits: DevBuf,
    tiebits: DevBuf,
    tiles: DevBuf,
    out: DevBuf,
}

impl TopR {
    /// A plan for buffers of `n` elements keeping `r` of them. Errors on `n >= 2^32`.
    pub fn new(cx: &Context, n: usize, r: usize) -> Result<Self> {
        Layout::single(n)?;
        let r = r.min(n);
        // Top-r alone is rTop-k with k = r: one selection stage, its list the output.
        let group = BigGroup {
            len: n as u32,
            r: r as u32,
            k: r as u32,
            scale: 1.0,
            cand_cap: if r < n { cand_cap(n) as u32 } else { 0 },
            ntiles: tiles_of(0, n as u32) as u32,
            ..Default::default()
        };
        Ok(Self {
            cx: cx.clone(),
            n,
            r,
            status: DevBuf::zeroed(cx, size_of::<StepStatus>())?,
            group,
            group_buf: DevBuf::from_slice(cx, std::slice::from_ref(&group))?,
            sel: DevBuf::zeroed(cx, super::abi::SEL_STATE_BYTES)?,
            cand: DevBuf::zeroed(cx, group.cand_cap as usize * 4)?,
            defbits: DevBuf::zeroed(cx, (n.div_ceil(32) + 1) * 4)?,
            tiebits: DevBuf::zeroed(cx, (n.div_ceil(32) + 1) * 4)?,
            tiles: DevBuf::zeroed(cx, tiles_of(0, n as u32) * 8)?,
            out: DevBuf::zeroed(cx, r * 4)?,
        })
    }

    /// Enqueues the selection on `x` (no synchronisation).
    pub fn select(&mut self, x: &CudaSlice<f32>) -> Result<()> {
        self.cx.same_context(x.context(), "the input")?;
        let stream = self.cx.stream.clone();
        let (ptr, _guard) = x.device_ptr(&stream);
        // SAFETY: `ptr` addresses `x.len()` f32 values.
        unsafe { self.select_raw(ptr, x.len()) }
    }

    /// [`TopR::select`] on a raw device pointer.
    ///
    /// # Safety
    /// `x` must address `len` f32 values on this context's device.
    pub unsafe fn select_raw(&mut self, x: u64, len: usize) -> Result<()> {
        if len != self.n {
            return Err(Error::LengthMismatch {
                what: "top-r input",
                expected: self.n,
                got: len,
            });
        }
        if self.r == 0 {
            return Ok(());
        }
        self.cx.bind()?;
        let cx = &self.cx;
        let b = StepBuffers {
            e0: x,
            e1: x,
            u0: 0,
            u1: 0,
            status: self.status.ptr(),
            n: self.n as u32,
            momentum: 0.0,
        };
        let c = CompactArgs {
            b,
            groups: self.group_buf.ptr(),
            state: self.sel.ptr(),
            defbits: self.defbits.ptr(),
            tiebits: self.tiebits.ptr(),
            tiles: self.tiles.ptr(),
            list: self.out.ptr(),
            ngroups: 1,
            to_list: 1,
            ..Default::default()
        };
        let a = SelArgs {
            b,
            groups: self.group_buf.ptr(),
            state: self.sel.ptr(),
            cand: self.cand.ptr(),
            defbits: self.defbits.ptr(),
            tiebits: self.tiebits.ptr(),
            ngroups: 1,
            ..Default::default()
        };
        let mut live = Live::new(cx);
        run_big(&mut live, std::slice::from_ref(&self.group), a, c, false)
    }

    /// Waits and copies the selected indices (ascending) into `out`.
    pub fn read(&mut self, out: &mut Vec<u32>) -> Result<()> {
        out.resize(self.r, 0);
        self.out.download(&self.cx, out)
    }

    /// Device address of the `r` selected indices (`u32`, ascending), ready once the
    /// stream reaches them.
    pub fn device_indices(&self) -> u64 {
        self.out.ptr()
    }

    /// How many indices a selection yields, `min(r, n)`.
    pub fn count(&self) -> usize {
        self.r
    }
}
