//! The fused error-feedback compression step on the GPU (SPEC §4-6, §10).

use super::abi::{self, AccArgs, CompactArgs, SelArgs, SignArgs, SmallArgs, SmallGroup};
use super::context::{Context, DevBuf, download_at};
use super::kernels::Kernel as K;
use crate::Compress;
use crate::{
    Config, DType, Element, Error, Group, Layout, Payload, Result, SignPayload, SparsePayload,
};
use cudarc::driver::{CudaSlice, DevicePtr};

/// Groups up to this size are selected by one thread block each (`select_small`), larger
/// ones by the grid-wide radix passes, which run one group after another. In per-layer
/// mode the block path goes up to 2^20 elements: many mid-sized layers then share one
/// launch across the SMs instead of paying ~25 launches each. One global group is better
/// served by the whole grid as soon as it outgrows a block's few passes over L2.
const BLOCK_MAX_GLOBAL: usize = 1 << 15;
const BLOCK_MAX_PER_LAYER: usize = 1 << 20;
/// Threads of a `select_small` block.
const BLOCK_THREADS: u32 = 1024;
/// Words of a compaction tile (`TILE_WORDS` in kernels/select.cu).
pub(crate) const TILE_WORDS: usize = 256;

#[derive(Debug, Clone, Copy)]
struct BigGroup {
    lo: u32,
    len: u32,
    r: u32,
    k: u32,
    out_off: u32,
    scale: f32,
}

#[derive(Debug)]
struct Sparse {
    out_idx: DevBuf,
    out_val: DevBuf,
    sent: usize,
    small: DevBuf,
    n_small: u32,
    big: Vec<BigGroup>,
    sel: DevBuf,
    cand: DevBuf,
    cand_cap: u32,
    list: DevBuf,
    defbits: DevBuf,
    tiebits: DevBuf,
    tiles: DevBuf,
    /// Words of each bitmap.
    words: usize,
    /// Whether a block-sized group runs both stages (its top-r set goes through `defbits`).
    small_member: bool,
    /// Global mode with one big top-r group: its first histogram rides on the accumulate pass.
    fused: bool,
}

#[derive(Debug)]
struct Sign {
    items: DevBuf,
    n_items: u32,
    partial: DevBuf,
    group_items: DevBuf,
    group_len: DevBuf,
    scales: DevBuf,
    words: DevBuf,
    n_words64: usize,
    ngroups: u32,
}

#[derive(Debug)]
enum Method {
    Sparse(Sparse),
    Sign(Sign),
}

/// A worker's compression plan on the GPU: the same contract as [`crate::cpu::Compressor`]
/// (SPEC §5), with residual, momentum and all scratch on the device, allocated once here.
///
/// [`Compress::step_device`] only enqueues kernels on the context's stream: no host
/// synchronisation, no allocation. Residual and momentum are ping-pong pairs; a device word
/// says which half is current and only the step's last kernel flips it, and only when every
/// element of `p` and every sent value was finite (a value can overflow through
/// `Scale::Unbiased`, SPEC §5). A rejected step therefore leaves the state exactly as it was,
/// and the error ([`Error::NonFinite`]) surfaces when host data is asked for
/// ([`Compress::payload`], [`Compress::read_payload`], [`Compress::check`]).
#[derive(Debug)]
pub struct Compressor {
    cx: Context,
    layout: Layout,
    config: Config,
    groups: Vec<Group>,
    bufs: abi::StepBuffers,
    _e: [DevBuf; 2],
    _u: Option<[DevBuf; 2]>,
    status: DevBuf,
    method: Method,
    stepped: bool,
    /// Steps fully enqueued (wrapping like the device's `steps_committed`).
    enqueued: u32,
    /// Rejections counted by the plans this one replaced through `reconfigure`.
    rejected_before: u64,
    /// Host copy of the last payload, for [`Compress::payload`].
    host: Payload,
    /// Device copy of a host gradient (`Compress::step`), allocated on the first call.
    upload: Option<CudaSlice<u8>>,
}

impl Compressor {
    /// Builds the plan for `layout` and `config` on `cx`'s device. Errors when the
    /// configuration is out of its domain or the device runs out of memory.
    pub fn new(cx: &Context, layout: &Layout, config: &Config) -> Result<Self> {
        let groups = config.plan_groups(layout)?;
        let n = layout.n();
        let e = [DevBuf::zeroed(cx, n * 4)?, DevBuf::zeroed(cx, n * 4)?];
        let u = if config.momentum > 0.0 {
            Some([DevBuf::zeroed(cx, n * 4)?, DevBuf::zeroed(cx, n * 4)?])
        } else {
            None
        };
        let status = DevBuf::zeroed(cx, size_of::<abi::StepStatus>())?;
        let bufs = abi::StepBuffers {
            e0: e[0].ptr(),
            e1: e[1].ptr(),
            u0: u.as_ref().map_or(0, |u| u[0].ptr()),
            u1: u.as_ref().map_or(0, |u| u[1].ptr()),
            status: status.ptr(),
            n: n as u32,
            momentum: config.momentum,
        };
        let method = if config.is_sparse() {
            Method::Sparse(Self::plan_sparse(cx, layout, config, &groups)?)
        } else {
            Method::Sign(Self::plan_sign(cx, layout, &groups)?)
        };
        Ok(Self {
            cx: cx.clone(),
            layout: layout.clone(),
            config: config.clone(),
            groups,
            bufs,
            _e: e,
            _u: u,
            status,
            method,
            stepped: false,
            enqueued: 0,
            rejected_before: 0,
            host: Payload::default(),
            upload: None,
        })
    }

    fn plan_sparse(
        cx: &Context,
        layout: &Layout,
        config: &Config,
        groups: &[Group],
    ) -> Result<Sparse> {
        let mut small = Vec::new();
        let mut big = Vec::new();
        let mut off = 0usize;
        let block_max = match config.mode {
            crate::Mode::Global => BLOCK_MAX_GLOBAL,
            crate::Mode::PerLayer => BLOCK_MAX_PER_LAYER,
        };
        for g in groups {
            let len = g.range.len();
            if g.k > 0 {
                if len <= block_max {
                    small.push(SmallGroup {
                        lo: g.range.start as u32,
                        len: len as u32,
                        r: g.r as u32,
                        k: g.k as u32,
                        out_off: off as u32,
                        scale: g.scale,
                    });
                } else {
                    big.push(BigGroup {
                        lo: g.range.start as u32,
                        len: len as u32,
                        r: g.r as u32,
                        k: g.k as u32,
                        out_off: off as u32,
                        scale: g.scale,
                    });
                }
            }
            off += g.k;
        }
        let max_big = big.iter().map(|g| g.len as usize).max().unwrap_or(0);
        // The candidate buffer takes over once the elements sharing the pivot prefix fit;
        // n/16 covers the pivot bin of 1% selections on smooth data with a wide margin.
        let cand_cap = if max_big == 0 {
            0
        } else {
            (max_big / 16).max(1 << 16).min(max_big)
        };
        let max_list = big
            .iter()
            .filter(|g| g.k < g.r && g.r < g.len)
            .map(|g| g.r as usize)
            .max()
            .unwrap_or(0);
        let max_tiles = big.iter().map(|g| tiles_of(g.lo, g.len)).max().unwrap_or(0);
        let words = layout.n().div_ceil(32) + 1;
        // Block-sized rTop-k groups keep their top-r set in `defbits` between the stages.
        let small_member = small.iter().any(|g| g.k < g.r && g.r < g.len);
        let need_bits = max_big > 0 || small_member;
        let fused = config.mode == crate::Mode::Global && big.len() == 1 && big[0].r < big[0].len;
        Ok(Sparse {
            out_idx: DevBuf::zeroed(cx, off * 4)?,
            out_val: DevBuf::zeroed(cx, off * 4)?,
            sent: off,
            n_small: small.len() as u32,
            small: DevBuf::from_slice(cx, &small)?,
            big,
            sel: DevBuf::zeroed(cx, abi::SEL_STATE_BYTES)?,
            cand: DevBuf::zeroed(cx, cand_cap * 4)?,
            cand_cap: cand_cap as u32,
            list: DevBuf::zeroed(cx, max_list * 4)?,
            defbits: DevBuf::zeroed(cx, if need_bits { words * 4 } else { 0 })?,
            tiebits: DevBuf::zeroed(cx, if max_big > 0 { words * 4 } else { 0 })?,
            tiles: DevBuf::zeroed(cx, max_tiles * 8)?,
            words,
            small_member,
            fused,
        })
    }

    fn plan_sign(cx: &Context, layout: &Layout, groups: &[Group]) -> Result<Sign> {
        let ranges: Vec<_> = groups.iter().map(|g| g.range.clone()).collect();
        let (items, first) = abi::items(&ranges);
        let lens: Vec<u32> = ranges.iter().map(|r| r.len() as u32).collect();
        let n_words64 = layout.n().div_ceil(64);
        Ok(Sign {
            n_items: items.len() as u32,
            items: DevBuf::from_slice(cx, &items)?,
            partial: DevBuf::zeroed(cx, items.len() * 8)?,
            group_items: DevBuf::from_slice(cx, &first)?,
            group_len: DevBuf::from_slice(cx, &lens)?,
            scales: DevBuf::zeroed(cx, groups.len() * 4)?,
            words: DevBuf::zeroed(cx, n_words64 * 8)?,
            n_words64,
            ngroups: groups.len() as u32,
        })
    }

    /// [`Compress::step_device`] on a raw device pointer, for frameworks that hand out
    /// addresses (`tensor.data_ptr()` in PyTorch). Runs on the context's stream: build the
    /// context with [`Context::from_raw_stream`] on the framework's current stream.
    ///
    /// # Safety
    /// `grad` must address `len` elements of `dtype` on this context's device, readable by
    /// work enqueued on the context's stream until that work completes.
    pub unsafe fn step_raw(
        &mut self,
        grad: u64,
        len: usize,
        dtype: DType,
        step: u64,
    ) -> Result<()> {
        self.layout.check_len("gradient", len)?;
        // Until this step is fully enqueued there is no payload to read: a launch that fails
        // halfway must not let read_payload hand out the previous step's payload again.
        self.stepped = false;
        self.cx.bind()?;
        let cx = &self.cx;
        let b = self.bufs;
        let n = self.layout.n() as u64;
        cx.launch(K::EfBegin, 1, 1, &b)?;
        let (t_lo, t_hi) = (step as u32, (step >> 32) as u32);
        let (s_lo, s_hi) = (self.config.seed as u32, (self.config.seed >> 32) as u32);
        let acc = |sel_state: u64| -> Result<()> {
            cx.launch_for(
                K::EfAccumulate,
                dtype,
                cx.grid_for(n, 256),
                256,
                &AccArgs { b, grad, sel_state },
            )
        };
        match &self.method {
            Method::Sparse(sp) => {
                let base = SelArgs {
                    b,
                    state: sp.sel.ptr(),
                    cand: sp.cand.ptr(),
                    list: 0,
                    defbits: sp.defbits.ptr(),
                    tiebits: sp.tiebits.ptr(),
                    cand_cap: sp.cand_cap,
                    worker: self.config.worker,
                    t_lo,
                    t_hi,
                    s_lo,
                    s_hi,
                    ..Default::default()
                };
                if sp.fused {
                    let g = sp.big[0];
                    let a = SelArgs {
                        lo: g.lo,
                        len: g.len,
                        m: g.r,
                        kind: 0,
                        ..base
                    };
                    cx.launch(
                        K::SelClearBits,
                        cx.grid_for(words_of(g.lo, g.len) as u64, 256),
                        256,
                        &a,
                    )?;
                    cx.launch(K::SelReset, 1, 1024, &a)?;
                    acc(sp.sel.ptr())?;
                } else {
                    acc(0)?;
                }
                if sp.n_small > 0 {
                    if sp.small_member {
                        sp.defbits.fill(cx, 0, sp.words * 4)?;
                    }
                    let a = SmallArgs {
                        b,
                        groups: sp.small.ptr(),
                        out_idx: sp.out_idx.ptr(),
                        out_val: sp.out_val.ptr(),
                        member: sp.defbits.ptr(),
                        worker: self.config.worker,
                        t_lo,
                        t_hi,
                        s_lo,
                        s_hi,
                        dtype: u32::from(self.config.values.code()),
                    };
                    cx.launch(K::SelectSmall, sp.n_small, BLOCK_THREADS, &a)?;
                }
                for (j, g) in sp.big.iter().enumerate() {
                    run_big(cx, sp, g, base, sp.fused && j == 0, self.config.values)?;
                }
            }
            Method::Sign(sg) => {
                sg.words.fill(cx, 0, sg.n_words64 * 8)?;
                acc(0)?;
                let a = SignArgs {
                    b,
                    items: sg.items.ptr(),
                    partial: sg.partial.ptr(),
                    group_items: sg.group_items.ptr(),
                    group_len: sg.group_len.ptr(),
                    scales: sg.scales.ptr(),
                    words: sg.words.ptr(),
                    ngroups: sg.ngroups,
                    pad: 0,
                };
                cx.launch(K::SignPartial, sg.n_items, 256, &a)?;
                cx.launch(K::SignMerge, sg.ngroups, 256, &a)?;
                cx.launch(K::SignApply, sg.n_items, 256, &a)?;
            }
        }
        cx.launch(K::EfCommit, 1, 1, &b)?;
        self.stepped = true;
        self.enqueued = self.enqueued.wrapping_add(1);
        Ok(())
    }

    /// Waits for the enqueued steps and returns how many of them were rejected (non-finite
    /// `p` or scaled value, state left untouched) since the plan was built: [`Compressor::check`] reports
    /// only the last step, so a caller that reads payloads rarely uses this to notice a
    /// rejection followed by accepted steps.
    pub fn rejected_steps(&self) -> Result<u64> {
        let st = self.status()?;
        Ok(self.rejected_before + u64::from(self.enqueued.wrapping_sub(st.steps_committed)))
    }

    fn status(&self) -> Result<abi::StepStatus> {
        self.cx.bind()?;
        let mut st = [abi::StepStatus::default()];
        self.status.download(&self.cx, &mut st)?;
        Ok(st[0])
    }

    /// Waits for the last step and reports whether it was accepted: `Ok` or
    /// [`Error::NonFinite`] (the state was then left untouched).
    pub fn check(&self) -> Result<()> {
        let st = self.status()?;
        if self.stepped && st.bad_count > 0 {
            return Err(Error::NonFinite {
                count: st.bad_count,
                first_index: st.first_bad,
            });
        }
        Ok(())
    }

    /// Waits for the last step and copies its payload to the host (reusing `out`'s
    /// allocations). Errors with [`Error::NonFinite`] when the step was rejected.
    pub fn read_payload(&mut self, out: &mut Payload) -> Result<()> {
        if !self.stepped {
            return Err(Error::InvalidConfig(
                "no payload to read: no step has been enqueued since the plan was built or since the last step failed to launch".into(),
            ));
        }
        self.check()?;
        let n = self.layout.n() as u32;
        match &self.method {
            Method::Sparse(sp) => {
                if !matches!(out, Payload::Sparse(_)) {
                    *out = Payload::Sparse(SparsePayload::default());
                }
                let Payload::Sparse(p) = out else {
                    unreachable!()
                };
                p.n = n;
                p.values_dtype = self.config.values;
                p.indices.resize(sp.sent, 0);
                p.values.resize(sp.sent, 0.0);
                sp.out_idx.download(&self.cx, &mut p.indices)?;
                sp.out_val.download(&self.cx, &mut p.values)?;
            }
            Method::Sign(sg) => {
                if !matches!(out, Payload::Sign(_)) {
                    *out = Payload::Sign(SignPayload::default());
                }
                let Payload::Sign(p) = out else {
                    unreachable!()
                };
                p.n = n;
                p.scales.resize(sg.ngroups as usize, 0.0);
                p.negative.resize(sg.n_words64, 0);
                sg.scales.download(&self.cx, &mut p.scales)?;
                // Two little-endian u32 halves per u64 word: the same bytes.
                sg.words.download(&self.cx, &mut p.negative)?;
            }
        }
        Ok(())
    }

    /// Device addresses of the last payload, for frameworks that gather it on the GPU:
    /// `(indices: u32[sent], values: f32[sent], sent)` for sparse methods, or
    /// `(sign words: u64[ceil(n/64)], scales: f32[groups], groups)` for scaled sign.
    /// Valid until the next step; the contents are ready once the stream reaches them.
    /// Check [`Compressor::check`] before trusting them.
    pub fn device_payload(&self) -> (u64, u64, usize) {
        match &self.method {
            Method::Sparse(sp) => (sp.out_idx.ptr(), sp.out_val.ptr(), sp.sent),
            Method::Sign(sg) => (sg.words.ptr(), sg.scales.ptr(), sg.ngroups as usize),
        }
    }

    fn current(&self, which_u: bool) -> Result<u64> {
        let st = self.status()?;
        Ok(match (which_u, st.cur) {
            (false, 0) => self.bufs.e0,
            (false, _) => self.bufs.e1,
            (true, 0) => self.bufs.u0,
            (true, _) => self.bufs.u1,
        })
    }

    /// Copies the residual `e` (f32, length `n`) into `out`; waits for the stream.
    pub fn residual(&self, out: &mut Vec<f32>) -> Result<()> {
        out.resize(self.layout.n(), 0.0);
        let src = self.current(false)?;
        download_at(&self.cx, src, out)
    }

    /// Copies the momentum `u` into `out` (left empty without momentum); waits.
    pub fn momentum(&self, out: &mut Vec<f32>) -> Result<()> {
        if self.bufs.u0 == 0 {
            out.clear();
            return Ok(());
        }
        out.resize(self.layout.n(), 0.0);
        let src = self.current(true)?;
        download_at(&self.cx, src, out)
    }

    /// Zeroes residual and momentum (enqueued on the stream).
    pub fn reset(&mut self) -> Result<()> {
        self.cx.bind()?;
        let bytes = self.layout.n() * 4;
        for b in &self._e {
            b.fill(&self.cx, 0, bytes)?;
        }
        if let Some(u) = &self._u {
            for b in u {
                b.fill(&self.cx, 0, bytes)?;
            }
        }
        Ok(())
    }

    /// The layout this plan was built for.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The configuration this plan was built for.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The selection groups with their resolved counts.
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// The context (device and stream) this plan runs on.
    pub fn context(&self) -> &Context {
        &self.cx
    }
}

impl Compress for Compressor {
    type Buffer<T: Element> = CudaSlice<T>;

    fn step<T: Element>(&mut self, grad: &[T], step: u64) -> Result<&Payload> {
        self.layout.check_len("gradient", grad.len())?;
        self.cx.bind()?;
        let stream = self.cx.stream.clone();
        let bytes: &[u8] = bytemuck::cast_slice(grad);
        if self.upload.is_none() {
            // Sized for f32 so one buffer serves every dtype.
            let buf = stream
                .alloc_zeros::<u8>((self.layout.n() * 4).max(4))
                .map_err(|e| super::context::device_err("allocating the gradient upload", e))?;
            self.upload = Some(buf);
        }
        let mut up = self.upload.take().expect("allocated above");
        let r = (|| {
            let mut dst = up.slice_mut(..bytes.len());
            stream
                .memcpy_htod(bytes, &mut dst)
                .map_err(|e| super::context::device_err("uploading the gradient", e))?;
            let (ptr, _guard) = up.device_ptr(&stream);
            // SAFETY: `ptr` addresses `grad.len()` elements of `T`, ordered on this stream.
            unsafe { self.step_raw(ptr, grad.len(), T::DTYPE, step) }
        })();
        self.upload = Some(up);
        r?;
        self.payload()
    }

    /// Enqueued on the context's stream; returns before the GPU is done.
    fn step_device<T: Element>(&mut self, grad: &CudaSlice<T>, step: u64) -> Result<()> {
        self.layout.check_len("gradient", grad.len())?;
        self.cx.same_context(grad.context(), "the gradient")?;
        let stream = self.cx.stream.clone();
        let (ptr, _guard) = grad.device_ptr(&stream);
        // SAFETY: `ptr` addresses `grad.len()` elements of `T` and the guard keeps the
        // buffer's read ordered with this stream.
        unsafe { self.step_raw(ptr, grad.len(), T::DTYPE, step) }
    }

    fn payload(&mut self) -> Result<&Payload> {
        let mut host = std::mem::take(&mut self.host);
        let r = Compressor::read_payload(self, &mut host);
        self.host = host;
        r.map(|()| &self.host)
    }

    fn read_payload(&mut self, out: &mut Payload) -> Result<()> {
        Compressor::read_payload(self, out)
    }

    fn check(&mut self) -> Result<()> {
        Compressor::check(self)
    }

    fn rejected_steps(&mut self) -> Result<u64> {
        Compressor::rejected_steps(self)
    }

    fn residual(&mut self, out: &mut Vec<f32>) -> Result<()> {
        Compressor::residual(self, out)
    }

    fn momentum(&mut self, out: &mut Vec<f32>) -> Result<()> {
        Compressor::momentum(self, out)
    }

    fn reset(&mut self) -> Result<()> {
        Compressor::reset(self)
    }

    /// Builds the new plan, then copies the current residual (and momentum) into it device
    /// to device on the stream; the old plan's buffers are freed once that copy is done.
    fn reconfigure(&mut self, config: &Config) -> Result<()> {
        let mut fresh = Compressor::new(&self.cx, &self.layout, config)?;
        let bytes = self.layout.n() * 4;
        let e = self.current(false)?;
        // A fresh plan's current half is the first one (its status word is zero).
        copy_dtod(&self.cx, fresh.bufs.e0, e, bytes)?;
        if self.bufs.u0 != 0 && fresh.bufs.u0 != 0 {
            let u = self.current(true)?;
            copy_dtod(&self.cx, fresh.bufs.u0, u, bytes)?;
        }
        fresh.rejected_before = Compressor::rejected_steps(self)?;
        fresh.upload = self.upload.take();
        *self = fresh;
        Ok(())
    }

    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn config(&self) -> &Config {
        &self.config
    }

    fn groups(&self) -> &[Group] {
        &self.groups
    }
}

/// Stream-ordered device-to-device copy of `bytes` bytes.
fn copy_dtod(cx: &Context, dst: u64, src: u64, bytes: usize) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    cx.bind()?;
    // SAFETY: both addresses hold at least `bytes` bytes (residual/momentum buffers of
    // plans for the same layout), on the plans' shared stream.
    unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, cx.cu_stream()) }
        .map_err(|e| super::context::device_err("device copy", e))
}

pub(crate) fn words_of(lo: u32, len: u32) -> usize {
    if len == 0 {
        return 0;
    }
    let w0 = (lo >> 5) as usize;
    let w1 = ((lo as u64 + len as u64 - 1) >> 5) as usize;
    w1 - w0 + 1
}

pub(crate) fn tiles_of(lo: u32, len: u32) -> usize {
    words_of(lo, len).div_ceil(TILE_WORDS)
}

/// One grid-wide radix selection of `a.m` elements: clear the group's bitmaps, reset the
/// state, histogram digit 0 (unless the accumulate pass already did), then three rounds of
/// pivot search and filtering passes; the last pass marks the selected set and the ties.
pub(crate) fn radix_stage(
    cx: &Context,
    a: SelArgs,
    pass0_done: bool,
    grid: u32,
    clear_grid: u32,
) -> Result<()> {
    if !pass0_done {
        cx.launch(K::SelClearBits, clear_grid, 256, &a)?;
        cx.launch(K::SelReset, 1, 1024, &a)?;
        cx.launch(K::SelPass, grid, 256, &SelArgs { pass: 0, ..a })?;
    }
    for d in 0..3 {
        cx.launch(K::SelFind, 1, 1024, &SelArgs { pass: d, ..a })?;
        cx.launch(K::SelPass, grid, 256, &SelArgs { pass: d + 1, ..a })?;
    }
    Ok(())
}

/// The grid-wide selection of one big group: top-r on magnitudes (and/or random-k on
/// Philox keys), then the ordered compaction into the payload.
fn run_big(
    cx: &Context,
    sp: &Sparse,
    g: &BigGroup,
    base: SelArgs,
    fused: bool,
    values: DType,
) -> Result<()> {
    let range_grid = cx.grid_for(g.len as u64, 256);
    let clear_grid = cx.grid_for(words_of(g.lo, g.len) as u64, 256);
    let ntiles = tiles_of(g.lo, g.len) as u32;
    let stage = |a: SelArgs, pass0_done: bool, grid: u32| -> Result<()> {
        radix_stage(cx, a, pass0_done, grid, clear_grid)
    };
    let compact = |payload: bool| -> Result<()> {
        let c = CompactArgs {
            b: base.b,
            state: sp.sel.ptr(),
            defbits: sp.defbits.ptr(),
            tiebits: sp.tiebits.ptr(),
            tiles: sp.tiles.ptr(),
            out_list: sp.list.ptr(),
            out_idx: sp.out_idx.ptr(),
            out_val: sp.out_val.ptr(),
            lo: g.lo,
            len: g.len,
            ntiles,
            out_off: g.out_off,
            scale: g.scale,
            dtype: u32::from(values.code()),
            payload: u32::from(payload),
            pad: 0,
        };
        cx.launch(K::CompactCount, ntiles, TILE_WORDS as u32, &c)?;
        cx.launch(K::CompactScan, 1, 1024, &c)?;
        cx.launch(K::CompactEmit, ntiles, TILE_WORDS as u32, &c)
    };
    let range = SelArgs {
        lo: g.lo,
        len: g.len,
        ..base
    };
    if g.k == g.len {
        let c = CompactArgs {
            b: base.b,
            out_idx: sp.out_idx.ptr(),
            out_val: sp.out_val.ptr(),
            lo: g.lo,
            len: g.len,
            out_off: g.out_off,
            scale: g.scale,
            dtype: u32::from(values.code()),
            payload: 1,
            ..Default::default()
        };
        return cx.launch(K::EmitRange, range_grid, 256, &c);
    }
    if g.r < g.len {
        stage(
            SelArgs {
                m: g.r,
                kind: 0,
                ..range
            },
            fused,
            range_grid,
        )?;
        if g.k == g.r {
            return compact(true);
        }
        compact(false)?;
        let a = SelArgs {
            m: g.k,
            kind: 1,
            list: sp.list.ptr(),
            list_len: g.r,
            ..range
        };
        stage(a, false, cx.grid_for(g.r as u64, 256))?;
        compact(true)
    } else {
        stage(
            SelArgs {
                m: g.k,
                kind: 1,
                ..range
            },
            false,
            range_grid,
        )?;
        compact(true)
    }
}
