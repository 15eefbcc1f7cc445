//! The fused error-feedback compression step on the GPU (SPEC §4-6, §10).

use super::abi::{self, AccArgs};
use super::context::{Context, DevBuf, Pinned, download_at};
use super::kernels::typed as K;
use super::launch::{Enqueue, Live, Recorder, StepLaunches};
use super::qsgd::{self, Qsgd, QsgdPtrs};
use super::sign::{self, Sign, SignPtrs};
use super::sparse::{self, Sparse, SparsePtrs, SparseShape, Tuning};
use crate::Compress;
use crate::{Config, DType, Element, Error, Group, Layout, Payload, Result, SparsePayload};
use cudarc::driver::{CudaSlice, DevicePtr};

/// The host half of a scaled-sign or QSGD plan: the groups cut into work items.
#[derive(Debug, Clone)]
pub(super) struct ItemShape {
    pub(super) items: Vec<abi::Item>,
    pub(super) first: Vec<u32>,
    pub(super) lens: Vec<u32>,
    pub(super) n_words64: usize,
}

impl ItemShape {
    fn new(layout: &Layout, groups: &[Group]) -> Self {
        let ranges: Vec<_> = groups.iter().map(|g| g.range.clone()).collect();
        let (items, first) = abi::items(&ranges);
        Self {
            lens: ranges.iter().map(|r| r.len() as u32).collect(),
            items,
            first,
            n_words64: layout.n().div_ceil(64),
        }
    }

    pub(super) fn n_items(&self) -> u32 {
        self.items.len() as u32
    }

    pub(super) fn ngroups(&self) -> u32 {
        self.lens.len() as u32
    }
}

/// A method's plan as the step code sees it: the shape and where its buffers are.
#[derive(Clone, Copy)]
enum MethodView<'a> {
    Sparse(&'a SparseShape, SparsePtrs),
    Sign(&'a ItemShape, SignPtrs),
    Qsgd(&'a ItemShape, QsgdPtrs),
}

#[derive(Debug)]
enum Method {
    Sparse(Sparse),
    Sign(Sign),
    Qsgd(Qsgd),
}

impl Method {
    fn view(&self) -> MethodView<'_> {
        match self {
            Method::Sparse(sp) => MethodView::Sparse(&sp.shape, sp.ptrs()),
            Method::Sign(sg) => MethodView::Sign(&sg.shape, sg.ptrs()),
            Method::Qsgd(q) => MethodView::Qsgd(&q.shape, q.ptrs()),
        }
    }
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
    tuning: Tuning,
    /// Page-locked staging for `read_payload`: status and payload come back in one wait.
    pinned: Pinned,
    /// Kernel launches and memsets the last `step_raw` enqueued.
    launches: (u32, u32),
    /// [`Compress::refund`]'s indices and values, one payload's worth (sparse plans only).
    refund: Option<[DevBuf; 2]>,
}

impl Compressor {
    /// Builds the plan for `layout` and `config` on `cx`'s device. Errors when the
    /// configuration is out of its domain or the device runs out of memory.
    pub fn new(cx: &Context, layout: &Layout, config: &Config) -> Result<Self> {
        Self::with_tuning(cx, layout, config, &Tuning::default())
    }

    /// As [`Compressor::new`] with explicit cut-offs between the selection paths.
    pub fn with_tuning(
        cx: &Context,
        layout: &Layout,
        config: &Config,
        tuning: &Tuning,
    ) -> Result<Self> {
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
        let sent: usize = groups.iter().map(|g| g.k).sum();
        let refund = if config.is_sparse() {
            let bytes = sent.max(1) * 4;
            Some([DevBuf::zeroed(cx, bytes)?, DevBuf::zeroed(cx, bytes)?])
        } else {
            None
        };
        let method = match config.method {
            crate::Method::Sign => Method::Sign(Sign::new(cx, ItemShape::new(layout, &groups))?),
            crate::Method::Qsgd {
                levels,
                error_feedback,
            } => Method::Qsgd(Qsgd::new(
                cx,
                ItemShape::new(layout, &groups),
                (levels, error_feedback),
                n,
            )?),
            _ => Method::Sparse(Sparse::new(
                cx,
                SparseShape::new(layout, config, &groups, tuning)?,
            )?),
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
            tuning: *tuning,
            pinned: Pinned::new(cx),
            launches: (0, 0),
            refund,
        })
    }

    /// Kernel launches the last step enqueued (0 before the first): the number
    /// [`launches_per_step`] predicts without a device, counted here on the real path.
    pub fn launches_last_step(&self) -> u32 {
        self.launches.0
    }

    /// Stream memsets the last step enqueued.
    pub fn memsets_last_step(&self) -> u32 {
        self.launches.1
    }

    /// The cut-offs this plan was built with.
    pub fn tuning(&self) -> &Tuning {
        &self.tuning
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
        let view = self.method.view();
        let mut live = Live::new(&self.cx);
        let r = enqueue_step(&mut live, self.bufs, &self.config, view, grad, dtype, step);
        self.launches = (live.launches, live.memsets);
        r?;
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
        // Status and payload are copied into pinned memory together; one wait.
        const ST: usize = size_of::<abi::StepStatus>();
        let a16 = |b: usize| b.next_multiple_of(16);
        let cx = &self.cx;
        cx.bind()?;
        let [(len1, src1), (len2, src2)] = match &self.method {
            Method::Sparse(sp) => sp.arrays(),
            Method::Sign(sg) => sg.arrays(),
            Method::Qsgd(q) => q.arrays(),
        };
        let (o1, o2) = (a16(ST), a16(ST) + a16(len1));
        self.pinned.reserve(cx, o2 + len2)?;
        self.pinned.download(cx, 0, ST, self.status.ptr())?;
        self.pinned.download(cx, o1, len1, src1)?;
        self.pinned.download(cx, o2, len2, src2)?;
        cx.synchronize()?;
        let bytes = self.pinned.bytes();
        let st: abi::StepStatus = bytemuck::pod_read_unaligned(&bytes[..ST]);
        if st.bad_count > 0 {
            return Err(Error::NonFinite {
                count: st.bad_count,
                first_index: st.first_bad,
            });
        }
        let (b1, b2) = (&bytes[o1..o1 + len1], &bytes[o2..o2 + len2]);
        let n = self.layout.n() as u32;
        match &self.method {
            Method::Sparse(sp) => sp.fill(out, n, self.config.values, b1, b2),
            Method::Sign(_) => Sign::fill(out, n, b1, b2),
            Method::Qsgd(q) => q.fill(out, b1, b2),
        }
        Ok(())
    }

    /// Device addresses of the last payload, for frameworks that gather it on the GPU:
    /// `(indices: u32[sent], values: f32[sent], sent)` for sparse methods, or
    /// `(sign words: u64[ceil(n/64)], scales: f32[groups], groups)` for scaled sign, or
    /// `(codes: i8[n], scales: f32[groups], groups)` for QSGD.
    /// Valid until the next step; the contents are ready once the stream reaches them.
    /// Check [`Compressor::check`] before trusting them.
    pub fn device_payload(&self) -> (u64, u64, usize) {
        match &self.method {
            Method::Sparse(sp) => sp.device_payload(),
            Method::Sign(sg) => sg.device_payload(),
            Method::Qsgd(q) => q.device_payload(),
        }
    }

    /// Bytes of the fixed message row that [`Compressor::pack_row`] writes for this plan:
    /// `sent` u32 indices, `sent` f32 values, then the 32-byte step status (`bad_count`
    /// first), or `None` for scaled sign and QSGD, whose payloads are not index/value rows.
    pub fn row_len(&self) -> Option<usize> {
        match &self.method {
            Method::Sparse(sp) => Some(8 * sp.shape.sent + size_of::<abi::StepStatus>()),
            Method::Sign(_) | Method::Qsgd(_) => None,
        }
    }

    /// Enqueues device-to-device copies of the last step's payload and status into the
    /// row at device address `dst` (layout in [`Compressor::row_len`]): the send buffer of
    /// one all-gather, which [`crate::cuda::Aggregator::aggregate_rows_device`] reads on
    /// the receiving side. Nothing waits and nothing crosses to the host; the status lets
    /// every receiver see whether this worker's step was rejected.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for scaled sign and QSGD, before any step, or when `cap` is below
    /// [`Compressor::row_len`]; [`Error::Device`] when a copy fails to enqueue.
    ///
    /// # Safety
    /// `dst` must address `cap` writable bytes on this plan's device, alive until the
    /// stream has run the copies.
    pub unsafe fn pack_row(&self, dst: u64, cap: usize) -> Result<usize> {
        let (Method::Sparse(sp), Some(len)) = (&self.method, self.row_len()) else {
            return Err(Error::InvalidConfig(
                "pack_row: only sparse plans have index/value rows (this one is scaled sign or QSGD)".into(),
            ));
        };
        if !self.stepped {
            return Err(Error::InvalidConfig(
                "pack_row: no step has been enqueued".into(),
            ));
        }
        if cap < len {
            return Err(Error::InvalidConfig(format!(
                "pack_row: the row needs {len} bytes, the buffer has {cap}"
            )));
        }
        let [(sent, idx), (_, val)] = sp.arrays();
        copy_dtod(&self.cx, dst, idx, sent)?;
        copy_dtod(&self.cx, dst + sent as u64, val, sent)?;
        copy_dtod(
            &self.cx,
            dst + 2 * sent as u64,
            self.status.ptr(),
            len - 2 * sent,
        )?;
        Ok(len)
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

    /// Undoes the last step when it was accepted (SPEC §5): waits for the stream, then points
    /// the status word back at the previous half of the residual and momentum pairs, which
    /// the step only read. Nothing changes after a rejected step or when no step is pending.
    pub fn revert(&mut self) -> Result<()> {
        if !self.stepped {
            return Ok(());
        }
        let mut st = self.status()?;
        self.stepped = false;
        if st.bad_count > 0 {
            return Ok(());
        }
        st.cur ^= 1;
        self.status.upload(&self.cx, &[st])
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

    fn revert(&mut self) -> Result<()> {
        Compressor::revert(self)
    }

    /// Waits for the step (to know it was accepted), uploads `back` into the plan's refund
    /// buffers and enqueues `ef_refund`, which reads the current half on the device.
    fn refund(&mut self, back: &SparsePayload) -> Result<()> {
        crate::contract::check_refund(back, &self.config, &self.groups, self.layout.n())?;
        if !self.stepped {
            return Err(crate::backend::nothing_to_refund());
        }
        Compressor::check(self)?;
        let Some([idx, val]) = &self.refund else {
            return Err(crate::backend::nothing_to_refund());
        };
        let count = back.indices.len();
        if count == 0 {
            return Ok(());
        }
        self.cx.bind()?;
        idx.upload(&self.cx, &back.indices)?;
        val.upload(&self.cx, &back.values)?;
        let args = abi::RefundArgs {
            b: self.bufs,
            idx: idx.ptr(),
            val: val.ptr(),
            count: count as u32,
            pad: 0,
        };
        let grid = self.cx.grid_for(count as u64, 256);
        self.cx.launch(K::EfRefund, grid, 256, &args)
    }

    fn reset(&mut self) -> Result<()> {
        Compressor::reset(self)
    }

    /// Builds the new plan, then copies the current residual (and momentum) into it device
    /// to device on the stream; the old plan's buffers are freed once that copy is done.
    fn reconfigure(&mut self, config: &Config) -> Result<()> {
        let mut fresh = Compressor::with_tuning(&self.cx, &self.layout, config, &self.tuning)?;
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
        std::mem::swap(&mut fresh.pinned, &mut self.pinned);
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

/// Kernel launches (and memsets) one step of `config` on `layout` enqueues, on a device of
/// `sms` multiprocessors, without a device: the same code as [`Compressor::step_raw`] run
/// against a recorder instead of the stream. For the launch budget of a layout (each launch
/// is a few microseconds of gap on the GPU, whatever the work behind it).
pub fn launches_per_step(
    layout: &Layout,
    config: &Config,
    tuning: &Tuning,
    sms: u32,
) -> Result<StepLaunches> {
    let groups = config.plan_groups(layout)?;
    let mut rec = Recorder {
        sms,
        log: StepLaunches::default(),
    };
    let b = abi::StepBuffers {
        n: layout.n() as u32,
        momentum: config.momentum,
        ..Default::default()
    };
    let items = ItemShape::new(layout, &groups);
    let sparse;
    let view = match config.method {
        crate::Method::Sign => MethodView::Sign(&items, SignPtrs::default()),
        crate::Method::Qsgd { .. } => MethodView::Qsgd(&items, QsgdPtrs::default()),
        _ => {
            sparse = SparseShape::new(layout, config, &groups, tuning)?;
            MethodView::Sparse(&sparse, SparsePtrs::default())
        }
    };
    enqueue_step(&mut rec, b, config, view, 0, DType::F32, 1)?;
    Ok(rec.log)
}

/// The whole step, in stream order: every kernel and memset of one error-feedback step.
fn enqueue_step<E: Enqueue>(
    e: &mut E,
    b: abi::StepBuffers,
    config: &Config,
    method: MethodView<'_>,
    grad: u64,
    dtype: DType,
    step: u64,
) -> Result<()> {
    let n = u64::from(b.n);
    e.launch(K::EfBegin, None, 1, 1, &b)?;
    let (t_lo, t_hi) = (step as u32, (step >> 32) as u32);
    let acc = |e: &mut E, sel_state: u64| -> Result<()> {
        let grid = e.grid_for(n, 256);
        e.launch(
            K::EfAccumulate,
            Some(dtype),
            grid,
            256,
            &AccArgs { b, grad, sel_state },
        )
    };
    match method {
        MethodView::Sparse(sp, ptr) => sparse::enqueue(e, b, config, (sp, ptr), (t_lo, t_hi), acc)?,
        MethodView::Sign(sg, ptr) => sign::enqueue(e, b, sg, ptr, |e| acc(e, 0))?,
        MethodView::Qsgd(q, ptr) => {
            qsgd::enqueue(e, b, config, (q, ptr), (t_lo, t_hi), |e| acc(e, 0))?
        }
    }
    e.launch(K::EfCommit, None, 1, 1, &b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Mode;

    const SMS: u32 = 132; // H100 SXM / H200

    fn count(sizes: &[usize], config: &Config, tuning: &Tuning) -> StepLaunches {
        launches_per_step(&Layout::new(sizes).unwrap(), config, tuning, SMS).unwrap()
    }

    fn per_layer(mut c: Config) -> Config {
        c.mode = Mode::PerLayer;
        c
    }

    /// The launch budget of a step (issue 17), printed for the report: global mode and a
    /// 200-layer per-layer layout, top-k and rTop-k. Run with `--nocapture` to see it.
    #[test]
    fn launches_per_step_report() {
        let topk = Config::topk(0.01);
        let rtopk = Config::rtopk(0.05, 0.01);
        let t = Tuning::default();
        let big_layers = vec![1usize << 22; 200];
        // A transformer-like mix: 200 layers from 4K to 4M elements.
        let mixed: Vec<usize> = (0..200)
            .map(|i| [1 << 12, (1 << 16) + 1, 1 << 18, (1 << 20) + 4096, 1 << 22][i % 5])
            .collect();
        let cases: [(&str, &[usize], Config); 6] = [
            ("global 2^26 top-k", &[1 << 26], topk.clone()),
            ("global 2^26 rtop-k", &[1 << 26], rtopk.clone()),
            (
                "per-layer 200 x 2^22 top-k",
                &big_layers,
                per_layer(topk.clone()),
            ),
            (
                "per-layer 200 x 2^22 rtop-k",
                &big_layers,
                per_layer(rtopk.clone()),
            ),
            ("per-layer 200 mixed top-k", &mixed, per_layer(topk.clone())),
            (
                "per-layer 200 mixed rtop-k",
                &mixed,
                per_layer(rtopk.clone()),
            ),
        ];
        for (name, sizes, config) in cases {
            let l = count(sizes, &config, &t);
            eprintln!(
                "{name:32} {:6} launches ({:5} single-block), {} memsets",
                l.count(),
                l.single_block(),
                l.memsets
            );
        }
    }

    #[test]
    fn launch_sequence_is_the_step() {
        let t = Tuning::default();
        // Global top-k of one big group: begin, clear, reset, accumulate (fused pass 0),
        // 3 x (find, pass), count, scan, emit, commit.
        let l = count(&[1 << 26], &Config::topk(0.01), &t);
        let names: Vec<&str> = l.launches.iter().map(|l| l.kernel).collect();
        assert_eq!(
            names,
            [
                "ef_begin",
                "sel_clear_bits",
                "sel_reset",
                "ef_accumulate_f32",
                "sel_find",
                "sel_pass",
                "sel_find",
                "sel_pass",
                "sel_find",
                "sel_pass",
                "compact_count",
                "compact_scan",
                "compact_emit",
                "ef_commit"
            ]
        );
        // The accumulate grid fills 132 SMs x 8 blocks.
        assert_eq!(l.launches[3].grid, SMS * 8);
        // Global rTop-k: + list compaction, a second 9-launch stage and a second compaction.
        let l = count(&[1 << 26], &Config::rtopk(0.05, 0.01), &t);
        assert_eq!(l.count(), 14 + 3 + 9);
        // Per layer: every pass is one launch over all big layers, so 200 big layers cost
        // what one does: begin, accumulate, clear, reset, pass 0, 3 x (find, pass), count,
        // scan, emit, commit; rTop-k adds the list stage (9) and its compaction (3). Before
        // the batching it was 3 + 200 x 12 and 3 + 200 x 24.
        let big = vec![1usize << 22; 200];
        let l = count(&big, &per_layer(Config::topk(0.01)), &t);
        assert_eq!(l.count(), 15);
        assert_eq!(l.single_block(), 2, "only begin and commit are one block");
        let pass = l.launches.iter().find(|l| l.kernel == "sel_pass").unwrap();
        // 132 SMs x 8 blocks shared by 200 groups: 6 blocks each.
        assert_eq!(pass.grid, 200 * 6);
        let find = l.launches.iter().find(|l| l.kernel == "sel_find").unwrap();
        assert_eq!(find.grid, 200, "one block per group");
        let l = count(&big, &per_layer(Config::rtopk(0.05, 0.01)), &t);
        assert_eq!(l.count(), 27);
        // One big layer costs the same sequence.
        assert_eq!(
            count(&[1 << 22], &per_layer(Config::rtopk(0.05, 0.01)), &t).count(),
            27
        );
        // Block-sized layers all share one launch.
        let small = vec![1usize << 16; 200];
        let l = count(&small, &per_layer(Config::topk(0.01)), &t);
        assert_eq!(l.count(), 4);
        assert_eq!(l.launches[2].kernel, "select_small");
        assert_eq!(l.launches[2].grid, 200);
        // The cut-off moves layers between the paths.
        let lower = Tuning {
            block_max_per_layer: 1 << 15,
            ..t
        };
        assert_eq!(
            count(&small, &per_layer(Config::topk(0.01)), &lower).count(),
            15
        );
        // Layers that send everything take one emit_range launch of their own.
        let l = count(&big, &per_layer(Config::topk(1.0)), &t);
        let names: Vec<&str> = l.launches.iter().map(|l| l.kernel).collect();
        assert_eq!(
            names,
            ["ef_begin", "ef_accumulate_f32", "emit_range", "ef_commit"]
        );
        assert!(
            launches_per_step(
                &Layout::new(&small).unwrap(),
                &Config::topk(0.01),
                &Tuning {
                    block_max_global: 0,
                    ..t
                },
                SMS
            )
            .is_err()
        );
        // Scaled sign: memset, begin, accumulate, partial, merge, apply, commit.
        let l = count(&big, &per_layer(Config::sign()), &t);
        assert_eq!(l.count(), 6);
        assert_eq!(l.memsets, 1);
        // QSGD: begin, accumulate, partial (which zeroes the shared code words), merge,
        // apply, commit; no memset.
        let l = count(&big, &per_layer(Config::qsgd(7)), &t);
        assert_eq!(l.count(), 6);
        assert_eq!(l.memsets, 0);
    }

    /// On a GPU: the counter of the real path equals the dry run, launch for launch.
    #[test]
    fn live_launches_match_the_dry_run() {
        let cx = match Context::new(0) {
            Ok(cx) => cx,
            Err(e) if std::env::var_os("GRADSIFT_REQUIRE_CUDA").is_none() => {
                eprintln!("SKIPPED: {e}");
                return;
            }
            Err(e) => panic!("GRADSIFT_REQUIRE_CUDA is set: {e}"),
        };
        let sizes = [5000usize, 70_000, 1 << 17, 300];
        let layout = Layout::new(&sizes).unwrap();
        let grad = vec![0.5f32; layout.n()];
        let lower = Tuning {
            block_max_per_layer: 1 << 16,
            ..Tuning::default()
        };
        for config in [
            Config::topk(0.01),
            Config::rtopk(0.05, 0.01),
            per_layer(Config::topk(0.01)),
            per_layer(Config::rtopk(0.05, 0.01)),
            Config::sign(),
            per_layer(Config::qsgd(7)),
        ] {
            let mut c = Compressor::with_tuning(&cx, &layout, &config, &lower).unwrap();
            c.step(&grad, 1).unwrap();
            let dry = launches_per_step(&layout, &config, &lower, cx.k.sms).unwrap();
            assert_eq!(c.launches_last_step() as usize, dry.count(), "{config:?}");
            assert_eq!(c.memsets_last_step(), dry.memsets, "{config:?}");
        }
    }
}
