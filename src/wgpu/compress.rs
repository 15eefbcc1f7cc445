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

use super::context::{Context, Inner, dev_err, floats, grid, words};
use crate::{
    Compress, Config, DType, Element, Error, Group, Layout, Method, Payload, Result, SignPayload,
    SparsePayload,
};
use std::num::NonZeroU64;

const WG: u64 = 256;
const TILE: usize = 4096;
const NONE: u32 = u32::MAX;
const CTR_A: u32 = 4;
const CTR_B: u32 = 5;
const CTR_SEL: u32 = 6;
/// Count and first index of sent values made non-finite by the scale (`ST_VBAD`, `ST_VFIRST`).
const ST_VFIRST: usize = 10;
const GSTATE: u32 = 16;
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
    pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Default)]
struct PassParams {
    digit: u32,
    next_digit: u32,
    key_kind: u32,
    emit_list: u32,
    gstate_off: u32,
    in_slot: u32,
    out_slot: u32,
    args_off: u32,
    act_in: u32,
    act_out: u32,
    args_off2: u32,
    pad: u32,
}

enum Dispatch {
    Direct(u32, u32),
    /// Byte offset into the indirect-arguments buffer, written by the preceding pivot pass.
    Indirect(u64),
}

struct Pass {
    entry: &'static str,
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
    passes: Vec<Pass>,
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
    /// Builds the plan on `ctx`'s device. Errors when the configuration is out of its domain,
    /// when a plan buffer exceeds the device's storage-binding limit (the message states the
    /// limit), or when the device is out of memory.
    pub fn new(ctx: &Context, layout: &Layout, config: &Config) -> Result<Self> {
        let groups = config.plan_groups(layout)?;
        let inner: &Inner = &ctx.inner;
        inner.check_alive()?;
        let n = layout.n();
        let ng = groups.len();
        let momentum = config.momentum > 0.0;
        let sparse = config.is_sparse();

        // Plan words: 8 per group, then 4 per tile; tiles never straddle groups.
        let mut plan = Vec::with_capacity(ng * 8);
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

        // Stage 1 selects by magnitude (random keys for random-k); rTop-k adds stage 2 on the
        // random keys of the top-r list. mode: 0 nothing, 1 selecting, 3 take everything.
        type Need = fn(&Group) -> (usize, usize);
        let (stage1_key, stage1_need, stage2): (u32, Need, bool) = match config.method {
            Method::RTopK { .. } => (0, |g| (g.r, g.range.len()), true),
            Method::TopK { .. } => (0, |g| (g.k, g.range.len()), false),
            Method::RandomK { .. } => (1, |g| (g.k, g.range.len()), false),
            Method::Sign => (NONE, |_| (0, 0), false),
        };
        let gstate1 = GSTATE;
        let gstate2 = GSTATE + 4 * ng as u32;
        // Two active-group lists of ng words each follow the second stage's group state.
        let active_off = gstate2 + 4 * ng as u32;
        let mut st = vec![0u32; active_off as usize + 2 * ng];
        st[1] = NONE;
        st[ST_VFIRST] = NONE;
        let mode = |need: usize, total: usize| {
            if need == 0 {
                0
            } else if need >= total {
                3
            } else {
                1
            }
        };
        for (gi, g) in groups.iter().enumerate() {
            let (need, total) = stage1_need(g);
            let b = gstate1 as usize + 4 * gi;
            st[b..b + 4].copy_from_slice(&[mode(need, total), need as u32, 255, 0]);
            if stage2 {
                let b = gstate2 as usize + 4 * gi;
                st[b..b + 4].copy_from_slice(&[mode(g.k, g.r), g.k as u32, 255, 0]);
            }
        }
        let sum_r: usize = if stage2 {
            groups.iter().map(|g| g.r).sum()
        } else {
            0
        };
        let sent: usize = if sparse {
            groups.iter().map(|g| g.k).sum()
        } else {
            0
        };
        let num_words = if sparse {
            n.div_ceil(32)
        } else {
            n.div_ceil(64) * 2
        };
        let num_blocks = (num_words as u64).div_ceil(BLOCK_WORDS);

        let none = ::wgpu::BufferUsages::empty();
        let f = |what: &str, bytes: u64| inner.storage_buffer(what, bytes, none);
        let plan_buf = inner.storage_init("plan", &plan)?;
        let st_buf = inner.storage_init("state", &st)?;
        let st_init = inner.storage_init("state template", &st)?;
        let e = [f("residual", n as u64 * 4)?, f("residual", n as u64 * 4)?];
        let u = if momentum {
            Some([f("momentum", n as u64 * 4)?, f("momentum", n as u64 * 4)?])
        } else {
            None
        };
        let hist = f("histograms", if sparse { ng as u64 * 1024 } else { 4 })?;
        let list_cap = if sparse { n as u64 * 4 } else { 4 };
        let list_a = f("candidates", list_cap)?;
        let list_b = f("candidates", list_cap)?;
        let sel = f("top-r list", sum_r as u64 * 4)?;
        let args = inner.storage_buffer(
            "indirect args",
            u64::from(ARGS_SLOTS) * 16,
            ::wgpu::BufferUsages::INDIRECT,
        )?;
        let bits = f("selection bitmap", num_words as u64 * 4)?;
        let out_idx = f("payload indices", sent as u64 * 4)?;
        let out_val = f("payload values", sent.max(ng) as u64 * 4)?;
        let partial = f("partials", num_tiles.max(num_blocks as usize) as u64 * 4)?;
        let dummies: Vec<_> = (0..4)
            .map(|_| f("unused binding", 4))
            .collect::<Result<_>>()?;
        let staging = inner.staging(
            16 + if sparse {
                sent as u64 * 8
            } else {
                ng as u64 * 4 + num_words as u64 * 4
            }
            .max(n as u64 * 4),
        )?;

        let cfg = Cfg {
            n: n as u32,
            num_groups: ng as u32,
            num_tiles: num_tiles as u32,
            dtype: 0,
            worker: config.worker,
            seed_lo: config.seed as u32,
            seed_hi: (config.seed >> 32) as u32,
            step_lo: 0,
            step_hi: 0,
            momentum: config.momentum,
            has_momentum: u32::from(momentum),
            values: dtype_code(config.values),
            first_key: stage1_key,
            gstate1_off: gstate1,
            num_words: num_words as u32,
            num_blocks: num_blocks as u32,
            tiles_off,
            active_off,
            pad: [0; 2],
        };
        let cfg_buf = inner.buffer(
            "config",
            std::mem::size_of::<Cfg>() as u64,
            ::wgpu::BufferUsages::UNIFORM | ::wgpu::BufferUsages::COPY_DST,
        )?;
        inner
            .queue
            .write_buffer(&cfg_buf, 0, bytemuck::bytes_of(&cfg));

        // Every pass gets its own parameter slot and bind group, built here once.
        let mut params: Vec<PassParams> = Vec::new();
        let mut specs: Vec<(&'static str, usize, [&::wgpu::Buffer; 4], Dispatch)> = Vec::new();
        let tiles_grid = grid(num_tiles as u64);
        let groups_grid = grid(ng as u64);
        // Bindings 9..12: list_in, list_out, sel, args. A buffer is never bound both read-only
        // and writable in one dispatch, and the args buffer is not bound where it drives an
        // indirect dispatch.
        let [d_sel, d_args, d_ua, d_ub] = [&dummies[0], &dummies[1], &dummies[2], &dummies[3]];
        macro_rules! push {
            ($entry:expr, $p:expr, $bufs:expr, $d:expr, $params:expr,) => {{
                params.push($p);
                specs.push(($entry, params.len() - 1, $bufs, $d));
            }};
        }
        let plain = PassParams {
            next_digit: NONE,
            args_off: NONE,
            ..Default::default()
        };
        push!(
            "accumulate",
            plain,
            [&list_b, &list_a, &sel, d_args],
            Dispatch::Direct(tiles_grid.0, tiles_grid.1),
            params,
        );
        // Indirect-args slots of 4 words, handed out in pass order.
        let mut args_slot = 0u32;
        let mut next_slot = || {
            args_slot += 1;
            (args_slot - 1) * 4
        };
        if sparse {
            let stages: Vec<(u32, u32, bool)> = if stage2 {
                vec![(0, gstate1, true), (1, gstate2, false)]
            } else {
                vec![(stage1_key, gstate1, false)]
            };
            for (si, &(key_kind, gstate_off, emit_list)) in stages.iter().enumerate() {
                let from_list = si == 1;
                // List ping-pong: round d reads the output of round d - 1 and writes the other.
                let lists = [(&list_a, CTR_A), (&list_b, CTR_B)];
                let base = PassParams {
                    key_kind,
                    emit_list: u32::from(emit_list),
                    gstate_off,
                    args_off: NONE,
                    args_off2: NONE,
                    act_in: NONE,
                    next_digit: NONE,
                    ..Default::default()
                };
                let emit_buf = if emit_list { &sel } else { d_sel };
                if from_list {
                    let hist_grid = grid((sum_r as u64).div_ceil(WG));
                    push!(
                        "hist_list",
                        PassParams {
                            in_slot: CTR_SEL,
                            ..base
                        },
                        [&sel, &list_a, d_sel, d_args],
                        Dispatch::Direct(hist_grid.0, hist_grid.1),
                        params,
                    );
                }
                for d in 0..8u32 {
                    let next = if d < 7 { d + 1 } else { NONE };
                    // Input of round d: tiles (stage 1, d = 0), the top-r list (stage 2, d = 0),
                    // else the output of round d - 1.
                    let (out_buf, out_slot) = lists[(d % 2) as usize];
                    let (in_buf, in_slot) = if d == 0 {
                        if from_list { (&sel, CTR_SEL) } else { lists[1] }
                    } else {
                        lists[((d + 1) % 2) as usize]
                    };
                    let tile_round = d == 0 && !from_list;
                    // Round 0's pivot covers every group; later rounds only the groups the
                    // previous pivot left selecting (active lists ping-pong like the lists).
                    let act_in = if d == 0 { NONE } else { (d + 1) % 2 };
                    let act_out = d % 2;
                    let pivot_args = if d == 0 { NONE } else { next_slot() };
                    let compact_args = if tile_round { NONE } else { next_slot() };
                    let p = PassParams {
                        digit: d,
                        next_digit: next,
                        in_slot,
                        out_slot,
                        act_in,
                        act_out,
                        args_off: pivot_args,
                        args_off2: compact_args,
                        ..base
                    };
                    let in_is_sel = std::ptr::eq(in_buf, &sel);
                    let emit_safe = if in_is_sel { d_sel } else { emit_buf };
                    push!(
                        "prep",
                        p,
                        [in_buf, out_buf, emit_safe, &args],
                        Dispatch::Direct(1, 1),
                        params,
                    );
                    push!(
                        "pivot",
                        p,
                        [in_buf, out_buf, emit_safe, d_args],
                        if d == 0 {
                            Dispatch::Direct(groups_grid.0, groups_grid.1)
                        } else {
                            Dispatch::Indirect(u64::from(pivot_args) * 4)
                        },
                        params,
                    );
                    if tile_round {
                        push!(
                            "compact_tiles",
                            p,
                            [in_buf, out_buf, emit_buf, d_args],
                            Dispatch::Direct(tiles_grid.0, tiles_grid.1),
                            params,
                        );
                    } else {
                        push!(
                            "compact_list",
                            p,
                            [in_buf, out_buf, emit_safe, d_args],
                            Dispatch::Indirect(u64::from(compact_args) * 4),
                            params,
                        );
                    }
                }
            }
            let b = grid(num_blocks);
            push!(
                "scan_blocks",
                plain,
                [&list_b, &list_a, &sel, d_args],
                Dispatch::Direct(b.0, b.1),
                params,
            );
            push!(
                "scan_top",
                plain,
                [&list_b, &list_a, &sel, d_args],
                Dispatch::Direct(1, 1),
                params,
            );
            push!(
                "emit_payload",
                plain,
                [&list_b, &list_a, &sel, d_args],
                Dispatch::Direct(b.0, b.1),
                params,
            );
        } else {
            for (entry, gr) in [
                ("sign_partial", tiles_grid),
                ("sign_scale", groups_grid),
                ("sign_apply", tiles_grid),
            ] {
                push!(
                    entry,
                    plain,
                    [&list_b, &list_a, &sel, d_args],
                    Dispatch::Direct(gr.0, gr.1),
                    params,
                );
            }
        }
        push!(
            "flip",
            plain,
            [&list_b, &list_a, &sel, d_args],
            Dispatch::Direct(1, 1),
            params,
        );
        debug_assert!(args_slot <= ARGS_SLOTS);

        // Parameter slots must start at the uniform offset alignment and hold a whole PassParams.
        let align = (std::mem::size_of::<PassParams>() as u64).div_ceil(inner.uniform_align())
            * inner.uniform_align();
        let params_buf = inner.buffer(
            "pass parameters",
            align * params.len() as u64,
            ::wgpu::BufferUsages::UNIFORM | ::wgpu::BufferUsages::COPY_DST,
        )?;
        for (i, p) in params.iter().enumerate() {
            inner
                .queue
                .write_buffer(&params_buf, align * i as u64, bytemuck::bytes_of(p));
        }
        let (ua, ub) = match &u {
            Some([a, b]) => (a, b),
            None => (d_ua, d_ub),
        };
        let scope = inner
            .device
            .push_error_scope(::wgpu::ErrorFilter::Validation);
        let passes = specs
            .into_iter()
            .map(|(entry, pi, [lin, lout, selb, argsb], dispatch)| {
                let res = [
                    ::wgpu::BindingResource::Buffer(::wgpu::BufferBinding {
                        buffer: &params_buf,
                        offset: align * pi as u64,
                        size: NonZeroU64::new(std::mem::size_of::<PassParams>() as u64),
                    }),
                    whole(&cfg_buf),
                    whole(&plan_buf),
                    whole(&st_buf),
                    whole(&e[0]),
                    whole(&e[1]),
                    whole(ua),
                    whole(ub),
                    whole(&hist),
                    whole(lin),
                    whole(lout),
                    whole(selb),
                    whole(argsb),
                    whole(&bits),
                    whole(&out_idx),
                    whole(&out_val),
                    whole(&partial),
                ];
                let entries: Vec<_> = res
                    .into_iter()
                    .enumerate()
                    .map(|(i, resource)| ::wgpu::BindGroupEntry {
                        binding: i as u32,
                        resource,
                    })
                    .collect();
                let bind = inner
                    .device
                    .create_bind_group(&::wgpu::BindGroupDescriptor {
                        label: Some(entry),
                        layout: &inner.compress.layouts[0],
                        entries: &entries,
                    });
                Pass {
                    entry,
                    bind,
                    dispatch,
                }
            })
            .collect();
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(dev_err(format!("building the step's bind groups: {err}")));
        }
        // Stage-1 indirect args must be readable as INDIRECT even before the first pivot runs.
        inner
            .queue
            .write_buffer(&args, 0, &[0u8; ARGS_SLOTS as usize * 16]);
        Ok(Self {
            ctx: ctx.clone(),
            layout: layout.clone(),
            config: config.clone(),
            groups,
            cfg,
            cfg_buf,
            st: st_buf,
            st_init,
            e,
            u,
            hist,
            args,
            bits,
            out_idx,
            out_val,
            passes,
            staging,
            upload: None,
            grad_bind: None,
            sent,
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
            let bg = inner
                .device
                .create_bind_group(&::wgpu::BindGroupDescriptor {
                    label: Some("gradient"),
                    layout: &inner.compress.layouts[1],
                    entries: &[::wgpu::BindGroupEntry {
                        binding: 0,
                        resource: ::wgpu::BindingResource::Buffer(::wgpu::BufferBinding {
                            buffer: grad,
                            offset: 0,
                            size: NonZeroU64::new(bind_size),
                        }),
                    }],
                });
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
                    if !matches!(out, Payload::Sparse(_)) {
                        *out = Payload::Sparse(SparsePayload::default());
                    }
                    let Payload::Sparse(p) = out else {
                        unreachable!()
                    };
                    let k = k as usize;
                    p.n = n;
                    p.values_dtype = values_dtype;
                    p.indices.clear();
                    p.indices.extend(words(&b[16..16 + 4 * k]));
                    p.values.clear();
                    p.values.extend(floats(&b[16 + 4 * k..16 + 8 * k]));
                    Ok(())
                },
            )?
        } else {
            let nw = (n as usize).div_ceil(64) * 2;
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
                    if !matches!(out, Payload::Sign(_)) {
                        *out = Payload::Sign(SignPayload::default());
                    }
                    let Payload::Sign(p) = out else {
                        unreachable!()
                    };
                    p.n = n;
                    p.scales.clear();
                    p.scales.extend(floats(&b[16..16 + 4 * ng]));
                    let w = &b[16 + 4 * ng..16 + 4 * ng + 4 * nw];
                    p.negative.clear();
                    p.negative.extend(
                        w.chunks_exact(8)
                            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
                    );
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
