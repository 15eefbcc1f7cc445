//! Top-r selection alone (no error feedback): the GPU form of [`crate::cpu::top_r`].

use super::abi::{CompactArgs, SelArgs, StepBuffers, StepStatus};
use super::compress::{compact, radix_stage, tiles_of, words_of};
use super::context::{Context, DevBuf};
use super::kernels::Kernel as K;
use super::launch::Live;
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
    sel: DevBuf,
    cand: DevBuf,
    cand_cap: u32,
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
        let cand_cap = (n / 16).max(1 << 16).min(n);
        Ok(Self {
            cx: cx.clone(),
            n,
            r,
            status: DevBuf::zeroed(cx, size_of::<StepStatus>())?,
            sel: DevBuf::zeroed(cx, super::abi::SEL_STATE_BYTES)?,
            cand: DevBuf::zeroed(cx, cand_cap * 4)?,
            cand_cap: cand_cap as u32,
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
        let len = self.n as u32;
        let c = CompactArgs {
            b,
            state: self.sel.ptr(),
            defbits: self.defbits.ptr(),
            tiebits: self.tiebits.ptr(),
            tiles: self.tiles.ptr(),
            out_list: self.out.ptr(),
            lo: 0,
            len,
            ntiles: tiles_of(0, len) as u32,
            scale: 1.0,
            payload: 0,
            ..Default::default()
        };
        let grid = cx.grid_for(self.n as u64, 256);
        if self.r == self.n {
            return cx.launch(K::EmitRange, grid, 256, &c);
        }
        let a = SelArgs {
            b,
            state: self.sel.ptr(),
            cand: self.cand.ptr(),
            defbits: self.defbits.ptr(),
            tiebits: self.tiebits.ptr(),
            lo: 0,
            len,
            cand_cap: self.cand_cap,
            m: self.r as u32,
            kind: 0,
            ..Default::default()
        };
        let clear_grid = cx.grid_for(words_of(0, len) as u64, 256);
        let mut live = Live::new(cx);
        radix_stage(&mut live, a, false, grid, clear_grid)?;
        compact(&mut live, &c)
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
