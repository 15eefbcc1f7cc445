//! The fused error-feedback step on the GPU (SPEC §4-6, §10); shaders in
//! `shaders/compress.wgsl`.
//!
//! NaN rollback: residual and momentum are ping-pong pairs and the index of the current one
//! lives in a device-side state word. Every pass reads it, writes only the other buffer, and
//! the last pass flips it only when the accumulate pass counted no non-finite value and the
//! emission no value that `Scale::Unbiased` made non-finite (SPEC §5). So
//! [`Compress::step_device`] never waits for the device, and a rejected step is reported by the
//! next call that returns host data ([`Compress::payload`] and friends) as
//! [`Error::NonFinite`], with residual and momentum exactly as before the step.

use super::context::{Context, Inner, dev_err, floats, grid, prefix, words};
use super::passes::{CompressPass as P, Pass};
use super::{qsgd, sign, sparse};
use crate::{
    Compress, Config, DType, Element, Error, Group, Layout, Method, Payload, Result, SparsePayload,
};

pub(super) const WG: u64 = 256;
const TILE: usize = 4096;
pub(super) const NONE: u32 = u32::MAX;
/// Count and first index of sent values made non-finite by the scale (`ST_VBAD`, `ST_VFIRST`).
pub(super) const ST_VFIRST: usize = 10;
pub(super) const GSTATE: u32 = 16;
/// Indirect-argument slots (4 words each): two per round after the first, per stage.
const ARGS_SLOTS: u32 = 64;
/// Words per bitmap block of the emission scan (must match `emit_payload`).
const BLOCK_WORDS: u64 = 1024;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Default)]
struct Cfg {
    n: u32,
    num_groups: u32,
    num_tiles: u32,
    dtype: u32,
    worker: u32,
    seed_lo: u32,
    seed_hi: u32,
    step_lo: u32,
    step_hi: u32,
    momentum: f32,
    has_momentum: u32,
    values: u32,
    first_key: u32,
    gstate1_off: u32,
    num_words: u32,
    num_blocks: u32,
    tiles_off: u32,
    active_off: u32,
    /// QSGD's `s` (SPEC §13), 0 for the other methods.
    levels: u32,
    /// QSGD: 1 keeps `p - decode` in the residual, 0 leaves 0.
    feedback: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Default)]
pub(super) struct PassParams {
    pub(super) digit: u32,
    pub(super) next_digit: u32,
    pub(super) key_kind: u32,
    pub(super) emit_list: u32,
    pub(super) gstate_off: u32,
    pub(super) in_slot: u32,
    pub(super) out_slot: u32,
    pub(super) args_off: u32,
    pub(super) act_in: u32,
    pub(super) act_out: u32,
    pub(super) args_off2: u32,
    pub(super) pad: u32,
}

pub(super) enum Dispatch {
    Direct(u32, u32),
    /// Byte offset into the indirect-arguments buffer, written by the preceding pivot pass.
    Indirect(u64),
}

/// A pass of the step as recorded: its entry point, its bind group (parameters included)
/// and its dispatch.
struct BoundPass {
    entry: P,
    bind: ::wgpu::BindGroup,
    dispatch: Dispatch,
}

pub(crate) fn dtype_code(d: DType) -> u32 {
    u32::from(d.code())
}

/// Bytes a gradient of `n` elements of `dtype` occupies in a buffer (16-bit types padded to
/// whole 32-bit words).
pub(crate) fn grad_bytes(n: usize, dtype: DType) -> u64 {
    match dtype {
        DType::F32 => n as u64 * 4,
        _ => (n as u64).div_ceil(2) * 4,
    }
}

/// A worker's compression plan on the GPU: residual, momentum and every scratch buffer live on
/// the device, the passes and their bind groups are built once here, and
/// [`Compress::step_device`] records them into one submission without reading anything back.
pub struct Compressor {
    ctx: Context,
    layout: Layout,
    config: Config,
    groups: Vec<Group>,
    cfg: Cfg,
    cfg_buf: ::wgpu::Buffer,
    st: ::wgpu::Buffer,
    st_init: ::wgpu::Buffer,
    e: [::wgpu::Buffer; 2],
    u: Option<[::wgpu::Buffer; 2]>,
    hist: ::wgpu::Buffer,
    args: ::wgpu::Buffer,
    bits: ::wgpu::Buffer,
    out_idx: ::wgpu::Buffer,
    out_val: ::wgpu::Buffer,
    passes: Vec<BoundPass>,
    /// [`Compress::refund`]'s pass (sparse plans): its count and indices, then its values.
    refund: Option<(BoundPass, ::wgpu::Buffer, ::wgpu::Buffer)>,
    staging: ::wgpu::Buffer,
    /// Host-slice steps copy into this (allocated on the first such step).
    upload: Option<::wgpu::Buffer>,
    /// Bind group of the last gradient buffer, rebuilt only when the caller passes another one.
    grad_bind: Option<(::wgpu::Buffer, u64, ::wgpu::BindGroup)>,
    sent: usize,
    stepped: bool,
    /// Rejections read back from the device so far (the device counts those not yet read).
    rejected: u64,
    /// Host copy of the last payload, for [`Compress::payload`].
    host: Payload,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("wgpu::Compressor")
            .field("n", &self.layout.n())
            .field("config", &self.config)
            .finish()
    }
}

impl Compressor {
    /// Builds the plan on `ctx`'s device: the plan and state words, every buffer, and one
    /// bind group per pass, so that a step only records the passes.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the configuration is out of its domain for `layout`;
    /// [`Error::Device`] when a plan buffer exceeds the device's storage-binding limit (the
    /// message states the limit), when the device is out of memory or lost.
    pub fn new(ctx: &Context, layout: &Layout, config: &Config) -> Result<Self> {
        let groups = config.plan_groups(layout)?;
        let inner: &Inner = &ctx.inner;
        inner.check_alive()?;
        let shape = Shape::of(layout, config, &groups);
        let (plan, num_tiles, tiles_off) = plan_words(&groups);
        let st = sparse::state_words(&shape, &groups);
        let bufs = Buffers::new(inner, &shape, config, &plan, &st, num_tiles)?;
        let cfg = Cfg {
            n: shape.n as u32,
            num_groups: shape.ng as u32,
            num_tiles: num_tiles as u32,
            dtype: 0,
            worker: config.worker,
            seed_lo: config.seed as u32,
            seed_hi: (config.seed >> 32) as u32,
            step_lo: 0,
            step_hi: 0,
            momentum: config.momentum,
            has_momentum: u32::from(config.momentum > 0.0),
            values: dtype_code(config.values),
            first_key: shape.stage1_key,
            gstate1_off: GSTATE,
            num_words: shape.num_words as u32,
            num_blocks: shape.num_blocks as u32,
            tiles_off,
            active_off: shape.active_off,
            levels: shape.levels.map_or(0, u32::from),
            feedback: u32::from(matches!(
                config.method,
                Method::Qsgd {
                    error_feedback: true,
                    ..
                }
            )),
        };
        let cfg_buf = inner.buffer(
            "config",
            std::mem::size_of::<Cfg>() as u64,
            ::wgpu::BufferUsages::UNIFORM | ::wgpu::BufferUsages::COPY_DST,
        )?;
        inner
            .queue
            .write_buffer(&cfg_buf, 0, bytemuck::bytes_of(&cfg));
        let mut rec = Recorder::default();
        rec.accumulate(grid(num_tiles as u64));
        if shape.sparse {
            rec.select(&shape, num_tiles);
            rec.emit(shape.num_blocks);
        } else if shape.levels.is_some() {
            rec.qsgd(grid(num_tiles as u64), grid(shape.ng as u64));
        } else {
            rec.sign(grid(num_tiles as u64), grid(shape.ng as u64));
        }
        rec.flip();
        if shape.sparse {
            rec.refund(shape.sent as u64);
        }
        let mut passes = rec.bind(inner, &cfg_buf, &bufs)?;
        // Recorded last so that it shares the step's parameter buffer; it runs on its own.
        let refund = if shape.sparse {
            let pass = passes.pop().expect("recorded above");
            Some((pass, bufs.refund_idx.clone(), bufs.refund_val.clone()))
        } else {
            None
        };
        // Stage-1 indirect args must be readable as INDIRECT even before the first pivot runs.
        inner
            .queue
            .write_buffer(&bufs.args, 0, &[0u8; ARGS_SLOTS as usize * 16]);
        Ok(Self {
            ctx: ctx.clone(),
            layout: layout.clone(),
            config: config.clone(),
            groups,
            cfg,
            cfg_buf,
            st: bufs.st,
            st_init: bufs.st_init,
            e: bufs.e,
            u: bufs.u,
            hist: bufs.hist,
            args: bufs.args,
            bits: bufs.bits,
            out_idx: bufs.out_idx,
            out_val: bufs.out_val,
            passes,
            refund,
            staging: bufs.staging,
            upload: None,
            grad_bind: None,
            sent: shape.sent,
            stepped: false,
            rejected: 0,
            host: Payload::default(),
        })
    }

    /// [`Compress::step_device`] with the element type given at run time: `grad` holds `n`
    /// gradient elements of `dtype` (f16 and bf16 packed two per 32-bit word, element `2j` in
    /// the low half). `step` is the training
    /// step `t` that keys random-k (SPEC §3). `grad` needs `STORAGE` usage and at least
    /// `n * 4` bytes (f32) or `ceil(n / 2) * 4` bytes (16-bit types).
    ///
    /// Records every pass into one submission and returns without waiting. A non-finite
    /// accumulated value is detected on the device: the step then changes nothing, and the
    /// next [`Compress::read_payload`] returns [`Error::NonFinite`]. Only the latest step is
    /// an error there; [`Compress::rejected_steps`] counts every rejection since the plan
    /// was built, for callers that step several times between reads.
    ///
    /// # Errors
    /// [`Error::LengthMismatch`] for a buffer too small for `n` elements;
    /// [`Error::InvalidConfig`] without `STORAGE` usage; [`Error::Device`] above the device's
    /// binding limit, for a lost device or a failed submission.
    pub fn step_buffer(&mut self, grad: &::wgpu::Buffer, dtype: DType, step: u64) -> Result<()> {
        let need = grad_bytes(self.layout.n(), dtype);
        if grad.size() < need {
            return Err(Error::LengthMismatch {
                what: "gradient buffer (bytes)",
                expected: need as usize,
                got: grad.size() as usize,
            });
        }
        if !grad.usage().contains(::wgpu::BufferUsages::STORAGE) {
            return Err(Error::InvalidConfig(
                "the gradient buffer needs STORAGE usage".into(),
            ));
        }
        let inner = &self.ctx.inner;
        inner.check_alive()?;
        let bind_size = need.max(4);
        if bind_size > inner.limits.max_storage_buffer_binding_size {
            return Err(dev_err(format!(
                "the gradient needs {bind_size} bytes, above this device's limit of {} bytes per storage binding; split it into smaller buckets",
                inner.limits.max_storage_buffer_binding_size
            )));
        }
        let cached = matches!(&self.grad_bind, Some((b, s, _)) if b == grad && *s == bind_size);
        if !cached {
            let scope = inner
                .device
                .push_error_scope(::wgpu::ErrorFilter::Validation);
            let bg = inner.bind_group(
                "gradient",
                &inner.compress.layouts[1],
                [prefix(grad, 0, bind_size)],
            );
            if let Some(e) = pollster::block_on(scope.pop()) {
                return Err(dev_err(format!("binding the gradient buffer: {e}")));
            }
            self.grad_bind = Some((grad.clone(), bind_size, bg));
        }
        self.cfg.dtype = dtype_code(dtype);
        self.cfg.step_lo = step as u32;
        self.cfg.step_hi = (step >> 32) as u32;
        inner
            .queue
            .write_buffer(&self.cfg_buf, 0, bytemuck::bytes_of(&self.cfg));
        let mut enc = inner
            .device
            .create_command_encoder(&::wgpu::CommandEncoderDescriptor {
                label: Some("gradsift step"),
            });
        // Fresh per-step state except words 2 (current buffer) and 3 (rejections not yet read).
        enc.copy_buffer_to_buffer(&self.st_init, 0, &self.st, 0, 8);
        enc.copy_buffer_to_buffer(&self.st_init, 16, &self.st, 16, self.st.size() - 16);
        enc.clear_buffer(&self.hist, 0, None);
        enc.clear_buffer(&self.bits, 0, None);
        {
            let grad_bg = &self.grad_bind.as_ref().expect("bound above").2;
            let mut cp = enc.begin_compute_pass(&::wgpu::ComputePassDescriptor {
                label: Some("gradsift step"),
                timestamp_writes: None,
            });
            for p in &self.passes {
                cp.set_pipeline(inner.compress.pipeline(p.entry));
                cp.set_bind_group(0, &p.bind, &[]);
                cp.set_bind_group(1, grad_bg, &[]);
                match p.dispatch {
                    Dispatch::Direct(x, y) => {
                        if x > 0 {
                            cp.dispatch_workgroups(x, y, 1)
                        }
                    }
                    Dispatch::Indirect(off) => cp.dispatch_workgroups_indirect(&self.args, off),
                }
            }
        }
        inner.submit(enc)?;
        self.stepped = true;
        Ok(())
    }

    fn read_payload_into(&mut self, out: &mut Payload) -> Result<()> {
        if !self.stepped {
            return Err(Error::InvalidConfig(
                "read_payload before the first step".into(),
            ));
        }
        let mut rejected = None;
        let r = self.read_payload_inner(out, &mut rejected);
        if let Some(c) = rejected {
            self.rejected += u64::from(c);
            // Ordered before the next step's submission by the queue.
            self.ctx.inner.queue.write_buffer(&self.st, 12, &[0u8; 4]);
        }
        r
    }

    fn read_payload_inner(&mut self, out: &mut Payload, rejected: &mut Option<u32>) -> Result<()> {
        let n = self.layout.n() as u32;
        let ng = self.groups.len();
        let inner = &self.ctx.inner;
        if self.config.is_sparse() {
            let k = self.sent as u64;
            let values_dtype = self.config.values;
            inner.read_back(
                &self.staging,
                &[
                    (&self.st, 0, 16),
                    (&self.out_idx, 0, k * 4),
                    (&self.out_val, 0, k * 4),
                ],
                |b| {
                    *rejected = words(b).nth(3);
                    status(b)?;
                    let (idx, val) = b[16..16 + 8 * k as usize].split_at(4 * k as usize);
                    sparse::fill(out, n, values_dtype, idx, val);
                    Ok(())
                },
            )?
        } else {
            // Sign and QSGD: the scales in `out_val`, the sign bits or the codes in `bits`.
            let levels = match self.config.method {
                Method::Qsgd { levels, .. } => Some(levels),
                _ => None,
            };
            let nw = match levels {
                Some(_) => (n as usize).div_ceil(4),
                None => (n as usize).div_ceil(64) * 2,
            };
            inner.read_back(
                &self.staging,
                &[
                    (&self.st, 0, 16),
                    (&self.out_val, 0, ng as u64 * 4),
                    (&self.bits, 0, nw as u64 * 4),
                ],
                |b| {
                    *rejected = words(b).nth(3);
                    status(b)?;
                    let (scales, w) = b[16..16 + 4 * (ng + nw)].split_at(4 * ng);
                    match levels {
                        Some(levels) => qsgd::fill(out, n, levels, scales, &w[..n as usize]),
                        None => sign::fill(out, n, scales, w),
                    }
                    Ok(())
                },
            )?
        }
    }

    fn current(&self) -> Result<usize> {
        let inner = &self.ctx.inner;
        inner.read_back(&self.staging, &[(&self.st, 0, 16)], |b| {
            (words(&b[..16]).nth(2).unwrap_or(0) & 1) as usize
        })
    }

    /// The device buffer holding the current residual (valid until the next step).
    pub fn residual_buffer(&mut self) -> Result<&::wgpu::Buffer> {
        let cur = self.current()?;
        Ok(&self.e[cur])
    }

    /// The context this plan runs on.
    pub fn context(&self) -> &Context {
        &self.ctx
    }
}

impl Compress for Compressor {
    type Buffer<T: Element> = ::wgpu::Buffer;

    /// Copies `grad` into a device buffer owned by the plan (allocated on the first call),
    /// steps on it and reads the payload back.
    fn step<T: Element>(&mut self, grad: &[T], step: u64) -> Result<&Payload> {
        self.layout.check_len("gradient", grad.len())?;
        if self.upload.is_none() {
            self.upload = Some(self.ctx.inner.storage_buffer(
                "gradient upload",
                self.layout.n() as u64 * 4,
                ::wgpu::BufferUsages::empty(),
            )?);
        }
        let up = self.upload.clone().expect("allocated above");
        self.ctx
            .inner
            .write_padded(&up, 0, bytemuck::cast_slice(grad));
        self.step_buffer(&up, T::DTYPE, step)?;
        self.payload()
    }

    /// `grad` holds `n` elements of `T` (f16 and bf16 packed two per 32-bit word, element
    /// `2j` in the low half), with `STORAGE` usage. Records every pass into one submission
    /// and returns without waiting.
    fn step_device<T: Element>(&mut self, grad: &::wgpu::Buffer, step: u64) -> Result<()> {
        self.step_buffer(grad, T::DTYPE, step)
    }

    fn payload(&mut self) -> Result<&Payload> {
        let mut host = std::mem::take(&mut self.host);
        let r = self.read_payload_into(&mut host);
        self.host = host;
        r.map(|()| &self.host)
    }

    fn read_payload(&mut self, out: &mut Payload) -> Result<()> {
        self.read_payload_into(out)
    }

    fn check(&mut self) -> Result<()> {
        if !self.stepped {
            return Ok(());
        }
        let inner = self.ctx.inner.clone();
        inner.read_back(&self.staging, &[(&self.st, 0, 16)], status)?
    }

    fn rejected_steps(&mut self) -> Result<u64> {
        let inner = self.ctx.inner.clone();
        let c = inner.read_back(&self.staging, &[(&self.st, 0, 16)], |b| {
            words(b).nth(3).unwrap_or(0)
        })?;
        if c > 0 {
            self.rejected += u64::from(c);
            // Ordered before the next step's submission by the queue.
            inner.queue.write_buffer(&self.st, 12, &[0u8; 4]);
        }
        Ok(self.rejected)
    }

    /// After a rejected step this is the residual from before it.
    fn residual(&mut self, out: &mut Vec<f32>) -> Result<()> {
        let cur = self.current()?;
        read_f32(&self.ctx, &self.staging, &self.e[cur], self.layout.n(), out)
    }

    fn momentum(&mut self, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        let Some(u) = &self.u else { return Ok(()) };
        let cur = self.current()?;
        read_f32(&self.ctx, &self.staging, &u[cur], self.layout.n(), out)
    }

    /// Waits for the queue, then rewrites state word 2 to point back at the half the
    /// step only read (SPEC §5); the `flip` pass moved it only when the step was accepted.
    fn revert(&mut self) -> Result<()> {
        if !self.stepped {
            return Ok(());
        }
        let inner = self.ctx.inner.clone();
        let (bad, cur) = inner.read_back(&self.staging, &[(&self.st, 0, 16)], |b| {
            (words(b).next().unwrap_or(0), words(b).nth(2).unwrap_or(0))
        })?;
        self.stepped = false;
        if bad == 0 {
            inner
                .queue
                .write_buffer(&self.st, 8, &(cur ^ 1).to_le_bytes());
        }
        Ok(())
    }

    /// Waits for the step (to know it was accepted), writes `back` into the plan's refund
    /// buffers and submits the `refund` pass, which reads the current half on the device.
    fn refund(&mut self, back: &SparsePayload) -> Result<()> {
        crate::contract::check_refund(back, &self.config, &self.groups, self.layout.n())?;
        if !self.stepped {
            return Err(crate::backend::nothing_to_refund());
        }
        self.check()?;
        let (Some((pass, idx, val)), Some((_, _, grad_bg))) = (&self.refund, &self.grad_bind)
        else {
            return Err(crate::backend::nothing_to_refund());
        };
        if back.indices.is_empty() {
            return Ok(());
        }
        let inner = &self.ctx.inner;
        let count = back.indices.len() as u32;
        inner.queue.write_buffer(idx, 0, &count.to_le_bytes());
        inner
            .queue
            .write_buffer(idx, 4, bytemuck::cast_slice(&back.indices));
        inner
            .queue
            .write_buffer(val, 0, bytemuck::cast_slice(&back.values));
        let mut enc = inner
            .device
            .create_command_encoder(&::wgpu::CommandEncoderDescriptor {
                label: Some("gradsift refund"),
            });
        {
            let mut cp = enc.begin_compute_pass(&::wgpu::ComputePassDescriptor {
                label: Some("gradsift refund"),
                timestamp_writes: None,
            });
            cp.set_pipeline(inner.compress.pipeline(pass.entry));
            cp.set_bind_group(0, &pass.bind, &[]);
            cp.set_bind_group(1, grad_bg, &[]);
            if let Dispatch::Direct(x, y) = pass.dispatch {
                cp.dispatch_workgroups(x, y, 1);
            }
        }
        inner.submit(enc)
    }

    fn reset(&mut self) -> Result<()> {
        let inner = &self.ctx.inner;
        let mut enc = inner
            .device
            .create_command_encoder(&::wgpu::CommandEncoderDescriptor { label: None });
        for b in self.e.iter().chain(self.u.iter().flatten()) {
            enc.clear_buffer(b, 0, None);
        }
        inner.submit(enc)
    }

    /// Builds the new plan, then copies the current residual (and momentum) into it on the
    /// device.
    fn reconfigure(&mut self, config: &Config) -> Result<()> {
        let mut fresh = Compressor::new(&self.ctx, &self.layout, config)?;
        let rejected = self.rejected_steps()?;
        let cur = self.current()?;
        let bytes = self.layout.n() as u64 * 4;
        let inner = self.ctx.inner.clone();
        let mut enc = inner
            .device
            .create_command_encoder(&::wgpu::CommandEncoderDescriptor {
                label: Some("reconfigure"),
            });
        // A fresh plan's current half is the first one (its state word 2 starts at 0).
        enc.copy_buffer_to_buffer(&self.e[cur], 0, &fresh.e[0], 0, bytes);
        if let (Some(u), Some(fu)) = (&self.u, &fresh.u) {
            enc.copy_buffer_to_buffer(&u[cur], 0, &fu[0], 0, bytes);
        }
        inner.submit(enc)?;
        fresh.rejected = rejected;
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

/// The sizes a plan is built from.
pub(super) struct Shape {
    pub(super) n: usize,
    pub(super) ng: usize,
    pub(super) sparse: bool,
    /// QSGD's `s`; `None` for the other methods.
    pub(super) levels: Option<u8>,
    /// Stage 1 selects by magnitude (key 0) or by random key (1, random-k); `NONE` for sign.
    pub(super) stage1_key: u32,
    /// rTop-k adds stage 2: random keys over the top-r list.
    pub(super) stage2: bool,
    pub(super) gstate2: u32,
    pub(super) active_off: u32,
    pub(super) sum_r: usize,
    pub(super) sent: usize,
    pub(super) num_words: usize,
    pub(super) num_blocks: u64,
}

impl Shape {
    fn of(layout: &Layout, config: &Config, groups: &[Group]) -> Self {
        let n = layout.n();
        let ng = groups.len();
        let sparse = config.is_sparse();
        let (stage1_key, stage2) = match config.method {
            Method::RTopK { .. } => (0, true),
            Method::TopK { .. } => (0, false),
            Method::RandomK { .. } => (1, false),
            Method::Sign | Method::Qsgd { .. } => (NONE, false),
        };
        let gstate2 = GSTATE + 4 * ng as u32;
        let levels = match config.method {
            Method::Qsgd { levels, .. } => Some(levels),
            _ => None,
        };
        // The bitmap holds the selection (a bit per element), the signs, or four QSGD codes
        // to a word.
        let num_words = match (sparse, levels) {
            (true, _) => n.div_ceil(32),
            (false, Some(_)) => n.div_ceil(4),
            (false, None) => n.div_ceil(64) * 2,
        };
        Self {
            n,
            ng,
            sparse,
            levels,
            stage1_key,
            stage2,
            gstate2,
            // Two active-group lists of ng words each follow the second stage's group state.
            active_off: gstate2 + 4 * ng as u32,
            sum_r: if stage2 {
                groups.iter().map(|g| g.r).sum()
            } else {
                0
            },
            sent: if sparse {
                groups.iter().map(|g| g.k).sum()
            } else {
                0
            },
            num_words,
            num_blocks: (num_words as u64).div_ceil(BLOCK_WORDS),
        }
    }
}

/// Plan words: 8 per group, then 4 per tile of at most `TILE` elements (tiles never straddle
/// groups). Returns the words, the tile count and where the tiles start.
fn plan_words(groups: &[Group]) -> (Vec<u32>, usize, u32) {
    let mut plan = Vec::with_capacity(groups.len() * 8);
    let mut tiles = Vec::new();
    for (gi, g) in groups.iter().enumerate() {
        let t0 = tiles.len() / 4;
        let mut s = g.range.start;
        while s < g.range.end {
            let e = (s + TILE).min(g.range.end);
            tiles.extend_from_slice(&[gi as u32, s as u32, e as u32, 0]);
            s = e;
        }
        let t1 = tiles.len() / 4;
        plan.extend_from_slice(&[
            g.range.start as u32,
            g.range.end as u32,
            g.r as u32,
            g.k as u32,
            g.scale.to_bits(),
            t0 as u32,
            t1 as u32,
            0,
        ]);
    }
    let num_tiles = tiles.len() / 4;
    let tiles_off = plan.len() as u32;
    plan.extend_from_slice(&tiles);
    (plan, num_tiles, tiles_off)
}

/// Every device buffer of a plan.
struct Buffers {
    plan: ::wgpu::Buffer,
    st: ::wgpu::Buffer,
    st_init: ::wgpu::Buffer,
    e: [::wgpu::Buffer; 2],
    u: Option<[::wgpu::Buffer; 2]>,
    hist: ::wgpu::Buffer,
    list_a: ::wgpu::Buffer,
    list_b: ::wgpu::Buffer,
    sel: ::wgpu::Buffer,
    args: ::wgpu::Buffer,
    bits: ::wgpu::Buffer,
    out_idx: ::wgpu::Buffer,
    out_val: ::wgpu::Buffer,
    partial: ::wgpu::Buffer,
    /// Stand-ins for bindings a pass does not use: sel, args, and the two momentum buffers.
    dummies: [::wgpu::Buffer; 4],
    /// The refund pass's inputs: count then indices (u32), values (f32 bits).
    refund_idx: ::wgpu::Buffer,
    refund_val: ::wgpu::Buffer,
    staging: ::wgpu::Buffer,
}

impl Buffers {
    fn new(
        inner: &Inner,
        shape: &Shape,
        config: &Config,
        plan: &[u32],
        st: &[u32],
        num_tiles: usize,
    ) -> Result<Self> {
        let (n, ng, sparse) = (shape.n as u64, shape.ng as u64, shape.sparse);
        let none = ::wgpu::BufferUsages::empty();
        let f = |what: &str, bytes: u64| inner.storage_buffer(what, bytes, none);
        let pair =
            |what: &str| -> Result<[::wgpu::Buffer; 2]> { Ok([f(what, n * 4)?, f(what, n * 4)?]) };
        let list_cap = if sparse { n * 4 } else { 4 };
        let readback = if sparse {
            shape.sent as u64 * 8
        } else {
            ng * 4 + shape.num_words as u64 * 4
        };
        Ok(Self {
            plan: inner.storage_init("plan", plan)?,
            st: inner.storage_init("state", st)?,
            st_init: inner.storage_init("state template", st)?,
            e: pair("residual")?,
            u: if config.momentum > 0.0 {
                Some(pair("momentum")?)
            } else {
                None
            },
            hist: f("histograms", if sparse { ng * 1024 } else { 4 })?,
            list_a: f("candidates", list_cap)?,
            list_b: f("candidates", list_cap)?,
            sel: f("top-r list", shape.sum_r as u64 * 4)?,
            args: inner.storage_buffer(
                "indirect args",
                u64::from(ARGS_SLOTS) * 16,
                ::wgpu::BufferUsages::INDIRECT,
            )?,
            bits: f("selection bitmap", shape.num_words as u64 * 4)?,
            out_idx: f("payload indices", shape.sent as u64 * 4)?,
            out_val: f("payload values", shape.sent.max(shape.ng) as u64 * 4)?,
            // QSGD keeps each group's inv and step after the tiles' maxima.
            partial: f(
                "partials",
                (num_tiles.max(shape.num_blocks as usize)
                    + if shape.levels.is_some() {
                        2 * shape.ng
                    } else {
                        0
                    }) as u64
                    * 4,
            )?,
            dummies: [
                f("unused binding", 4)?,
                f("unused binding", 4)?,
                f("unused binding", 4)?,
                f("unused binding", 4)?,
            ],
            refund_idx: f("refund indices", (shape.sent as u64 + 1) * 4)?,
            refund_val: f("refund values", shape.sent as u64 * 4)?,
            staging: inner.staging(16 + readback.max(n * 4))?,
        })
    }
}

/// Which of a plan's buffers a pass binds at 9..12 (list_in, list_out, sel, args). A buffer
/// is never bound both read-only and writable in one dispatch, and the args buffer is not
/// bound where it drives an indirect dispatch.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Buf {
    ListA,
    ListB,
    Sel,
    Args,
    /// The stand-in for an unused sel binding.
    NoSel,
    /// The stand-in for an unused args binding.
    NoArgs,
    RefundIdx,
    RefundVal,
}

impl Buf {
    fn of(self, b: &Buffers) -> &::wgpu::Buffer {
        match self {
            Buf::ListA => &b.list_a,
            Buf::ListB => &b.list_b,
            Buf::Sel => &b.sel,
            Buf::Args => &b.args,
            Buf::NoSel => &b.dummies[0],
            Buf::NoArgs => &b.dummies[1],
            Buf::RefundIdx => &b.refund_idx,
            Buf::RefundVal => &b.refund_val,
        }
    }
}

/// The passes of a step in order, each with its own parameter slot.
#[derive(Default)]
pub(super) struct Recorder {
    params: Vec<PassParams>,
    specs: Vec<(P, [Buf; 4], Dispatch)>,
    /// Indirect-args slots of 4 words, handed out in pass order.
    args_slots: u32,
}

/// The parameters of a pass that selects nothing (no next digit, no indirect args).
pub(super) const PLAIN: PassParams = PassParams {
    digit: 0,
    next_digit: NONE,
    key_kind: 0,
    emit_list: 0,
    gstate_off: 0,
    in_slot: 0,
    out_slot: 0,
    args_off: NONE,
    act_in: 0,
    act_out: 0,
    args_off2: 0,
    pad: 0,
};
pub(super) const PLAIN_BUFS: [Buf; 4] = [Buf::ListB, Buf::ListA, Buf::Sel, Buf::NoArgs];

impl Recorder {
    pub(super) fn push(&mut self, entry: P, p: PassParams, bufs: [Buf; 4], d: Dispatch) {
        self.params.push(p);
        self.specs.push((entry, bufs, d));
    }

    /// Passes that select nothing, each dispatched over its grid: a dense codec's tile
    /// partials, per-group merge and apply.
    pub(super) fn plain<const N: usize>(&mut self, passes: [(P, (u32, u32)); N]) {
        for (entry, g) in passes {
            self.push(entry, PLAIN, PLAIN_BUFS, Dispatch::Direct(g.0, g.1));
        }
    }

    pub(super) fn next_slot(&mut self) -> u32 {
        self.args_slots += 1;
        debug_assert!(self.args_slots <= ARGS_SLOTS);
        (self.args_slots - 1) * 4
    }

    /// `p = e + g` (or with momentum) over tiles, counting non-finite values and building
    /// the round-0 histograms.
    fn accumulate(&mut self, tiles: (u32, u32)) {
        self.push(
            P::Accumulate,
            PLAIN,
            PLAIN_BUFS,
            Dispatch::Direct(tiles.0, tiles.1),
        );
    }

    /// The one-thread commit: flips to the new residual only when the step was accepted.
    fn flip(&mut self) {
        self.push(P::Flip, PLAIN, PLAIN_BUFS, Dispatch::Direct(1, 1));
    }

    /// Writes every pass's parameters into one uniform buffer and builds its bind group.
    fn bind(self, inner: &Inner, cfg: &::wgpu::Buffer, b: &Buffers) -> Result<Vec<BoundPass>> {
        // Parameter slots start at the uniform offset alignment and hold a whole PassParams.
        let size = std::mem::size_of::<PassParams>() as u64;
        let align = size.div_ceil(inner.uniform_align()) * inner.uniform_align();
        let params_buf = inner.buffer(
            "pass parameters",
            align * self.params.len() as u64,
            ::wgpu::BufferUsages::UNIFORM | ::wgpu::BufferUsages::COPY_DST,
        )?;
        for (i, p) in self.params.iter().enumerate() {
            inner
                .queue
                .write_buffer(&params_buf, align * i as u64, bytemuck::bytes_of(p));
        }
        let (ua, ub) = match &b.u {
            Some([x, y]) => (x, y),
            None => (&b.dummies[2], &b.dummies[3]),
        };
        let scope = inner
            .device
            .push_error_scope(::wgpu::ErrorFilter::Validation);
        let passes = self
            .specs
            .into_iter()
            .enumerate()
            .map(|(i, (entry, [lin, lout, selb, argsb], dispatch))| {
                let res = [
                    prefix(&params_buf, align * i as u64, size),
                    whole(cfg),
                    whole(&b.plan),
                    whole(&b.st),
                    whole(&b.e[0]),
                    whole(&b.e[1]),
                    whole(ua),
                    whole(ub),
                    whole(&b.hist),
                    whole(lin.of(b)),
                    whole(lout.of(b)),
                    whole(selb.of(b)),
                    whole(argsb.of(b)),
                    whole(&b.bits),
                    whole(&b.out_idx),
                    whole(&b.out_val),
                    whole(&b.partial),
                ];
                BoundPass {
                    entry,
                    bind: inner.bind_group(entry.entry(), &inner.compress.layouts[0], res),
                    dispatch,
                }
            })
            .collect();
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(dev_err(format!("building the step's bind groups: {err}")));
        }
        Ok(passes)
    }
}

fn whole(b: &::wgpu::Buffer) -> ::wgpu::BindingResource<'_> {
    b.as_entire_binding()
}

/// The rejected-step report in the first 16 bytes of a readback (state words 0 and 1).
fn status(b: &[u8]) -> Result<()> {
    let w: [u32; 2] = [words(b).next().unwrap_or(0), words(b).nth(1).unwrap_or(0)];
    if w[0] > 0 {
        return Err(Error::NonFinite {
            count: u64::from(w[0]),
            first_index: w[1],
        });
    }
    Ok(())
}

fn read_f32(
    ctx: &Context,
    staging: &::wgpu::Buffer,
    buf: &::wgpu::Buffer,
    n: usize,
    out: &mut Vec<f32>,
) -> Result<()> {
    ctx.inner
        .read_back(staging, &[(buf, 0, n as u64 * 4)], |b| {
            out.clear();
            out.extend(floats(&b[..n * 4]));
        })
}

#[cfg(test)]
mod tests {
    use super::super::layout::{check, mirror};
    use super::{Cfg, PassParams};

    #[test]
    fn uniforms_have_the_wgsl_layout() {
        check(
            "compress.wgsl",
            "Cfg",
            mirror!(Cfg {
                n,
                num_groups,
                num_tiles,
                dtype,
                worker,
                seed_lo,
                seed_hi,
                step_lo,
                step_hi,
                momentum,
                has_momentum,
                values,
                first_key,
                gstate1_off,
                num_words,
                num_blocks,
                tiles_off,
                active_off,
                levels,
                feedback,
            }),
        );
        check(
            "compress.wgsl",
            "PassParams",
            mirror!(PassParams {
                digit,
                next_digit,
                key_kind,
                emit_list,
                gstate_off,
                in_slot,
                out_slot,
                args_off,
                act_in,
                act_out,
                args_off2,
                pad,
            }),
        );
    }
}
