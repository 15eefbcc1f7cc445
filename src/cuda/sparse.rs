//! Sparse selection on CUDA (SPEC §2-4, `kernels/select.cu`): top-r, random-k and rTop-k.
//! The plan's shape (which groups a block selects and which the grid-wide radix passes
//! do), its buffers, its passes inside the error-feedback step and its payload's way back
//! to the host. [`super::select::TopR`] reuses the grid-wide passes without error feedback.

use super::abi::{
    self, BigGroup, CompactArgs, STAGE_ALL, STAGE_FIRST, STAGE_LIST, SelArgs, SmallArgs, SmallGroup,
};
use super::context::{Context, DevBuf};
use super::kernels::typed as K;
use super::launch::Enqueue;
use crate::{Config, DType, Error, Group, Layout, Payload, Result};

/// Cut-offs between the two selection paths: groups up to the cut-off are selected by one
/// thread block each (`select_small`, all of them in one launch), larger ones by the
/// grid-wide radix passes, each pass one launch over all of them (about 12 launches per
/// step for top-k, 24 for rTop-k, however many big groups; see
/// [`launches_per_step`](super::launches_per_step)). The right cut-off is a trade between the block path's tail (one block working through a
/// group of up to the cut-off alone, about 8 passes over it from L2) and the grid path's
/// passes over global memory; it is a parameter so that a GPU can measure it
/// (`benches/cuda.rs`, `ef_topk_per_layer_block_max_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Global mode (one group): a block serves it up to this many elements (default 2^15).
    pub block_max_global: usize,
    /// Per-layer mode: a block serves a layer up to this many elements (default 2^16).
    pub block_max_per_layer: usize,
    /// Global mode with one grid-wide top-r group: fuse its first radix histogram into
    /// `ef_accumulate` (default), or run it as a separate `sel_pass` (for measuring the
    /// fused histogram's cost, `benches/cuda.rs`).
    pub fuse_histogram: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            block_max_global: 1 << 15,
            block_max_per_layer: 1 << 16,
            fuse_histogram: true,
        }
    }
}

impl Tuning {
    fn block_max(&self, mode: crate::Mode) -> Result<usize> {
        let m = match mode {
            crate::Mode::Global => self.block_max_global,
            crate::Mode::PerLayer => self.block_max_per_layer,
        };
        if m == 0 {
            return Err(Error::InvalidConfig(
                "Tuning: a block cut-off of 0 elements".into(),
            ));
        }
        Ok(m)
    }
}

/// Threads of a `select_small` block.
const BLOCK_THREADS: u32 = 1024;
/// Words of a compaction tile (`TILE_WORDS` in kernels/select.cu).
pub(crate) const TILE_WORDS: usize = 256;

/// The host half of a sparse plan: which groups take which path and the scratch sizes.
/// Pure data, so the launch sequence can be derived without a device.
#[derive(Debug, Clone)]
pub(super) struct SparseShape {
    small: Vec<SmallGroup>,
    /// The grid-wide groups, each with its slices of the scratch buffers.
    big: Vec<BigGroup>,
    /// Payload entries (sum of k).
    pub(super) sent: usize,
    /// Elements of all candidate buffers, of all top-r lists, tiles of all groups.
    cand_total: usize,
    list_total: usize,
    tiles_total: usize,
    /// Words of each bitmap.
    words: usize,
    /// Whether a block-sized group runs both stages (its top-r set goes through `defbits`).
    small_member: bool,
    need_defbits: bool,
    need_tiebits: bool,
    /// Global mode with one big top-r group: its first histogram rides on the accumulate pass.
    fused: bool,
}

impl SparseShape {
    pub(super) fn new(
        layout: &Layout,
        config: &Config,
        groups: &[Group],
        tuning: &Tuning,
    ) -> Result<Self> {
        let block_max = tuning.block_max(config.mode)?;
        let mut small = Vec::new();
        let mut big: Vec<BigGroup> = Vec::new();
        let (mut off, mut cand, mut list, mut tiles) = (0usize, 0usize, 0usize, 0usize);
        for g in groups {
            let len = g.range.len();
            let entry = BigGroup {
                lo: g.range.start as u32,
                len: len as u32,
                r: g.r as u32,
                k: g.k as u32,
                out_off: off as u32,
                scale: g.scale,
                ..Default::default()
            };
            if g.k > 0 && len <= block_max {
                small.push(entry.block_sized());
            } else if g.k > 0 {
                let mut b = BigGroup {
                    cand_off: cand as u32,
                    list_off: list as u32,
                    tile_off: tiles as u32,
                    ntiles: tiles_of(entry.lo, entry.len) as u32,
                    ..entry
                };
                if b.k < b.len {
                    b.cand_cap = cand_cap(len) as u32;
                }
                cand += b.cand_cap as usize;
                if b.two_stage() {
                    list += b.r as usize;
                }
                tiles += b.ntiles as usize;
                big.push(b);
            }
            off += g.k;
        }
        // Block-sized rTop-k groups keep their top-r set in `defbits` between the stages.
        let small_member = small.iter().any(|g| g.k < g.r && g.r < g.len);
        let fused = tuning.fuse_histogram
            && config.mode == crate::Mode::Global
            && big.len() == 1
            && big[0].r < big[0].len;
        let any_big_sel = big.iter().any(|g| g.in_stage(STAGE_FIRST));
        Ok(Self {
            small,
            sent: off,
            cand_total: cand,
            list_total: list,
            tiles_total: tiles,
            words: layout.n().div_ceil(32) + 1,
            small_member,
            need_defbits: any_big_sel || small_member,
            need_tiebits: any_big_sel,
            fused,
            big,
        })
    }
}

/// A big group's candidate buffer: it takes over once the elements sharing the pivot
/// prefix fit; n/16 covers the pivot bin of 1% selections on smooth data with a wide margin.
pub(crate) fn cand_cap(len: usize) -> usize {
    (len / 16).max(1 << 16).min(len)
}

/// Device addresses of a sparse plan's buffers (all 0 in a dry run).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct SparsePtrs {
    out_idx: u64,
    out_val: u64,
    small: u64,
    big: u64,
    sel: u64,
    cand: u64,
    list: u64,
    defbits: u64,
    tiebits: u64,
    tiles: u64,
}

#[derive(Debug)]
pub(super) struct Sparse {
    pub(super) shape: SparseShape,
    out_idx: DevBuf,
    out_val: DevBuf,
    small: DevBuf,
    big: DevBuf,
    sel: DevBuf,
    cand: DevBuf,
    list: DevBuf,
    defbits: DevBuf,
    tiebits: DevBuf,
    tiles: DevBuf,
}

impl Sparse {
    pub(super) fn new(cx: &Context, shape: SparseShape) -> Result<Self> {
        Ok(Self {
            out_idx: DevBuf::zeroed(cx, shape.sent * 4)?,
            out_val: DevBuf::zeroed(cx, shape.sent * 4)?,
            small: DevBuf::from_slice(cx, &shape.small)?,
            big: DevBuf::from_slice(cx, &shape.big)?,
            sel: DevBuf::zeroed(cx, shape.big.len() * abi::SEL_STATE_BYTES)?,
            cand: DevBuf::zeroed(cx, shape.cand_total * 4)?,
            list: DevBuf::zeroed(cx, shape.list_total * 4)?,
            defbits: DevBuf::zeroed(
                cx,
                if shape.need_defbits {
                    shape.words * 4
                } else {
                    0
                },
            )?,
            tiebits: DevBuf::zeroed(
                cx,
                if shape.need_tiebits {
                    shape.words * 4
                } else {
                    0
                },
            )?,
            tiles: DevBuf::zeroed(cx, shape.tiles_total * 8)?,
            shape,
        })
    }

    pub(super) fn ptrs(&self) -> SparsePtrs {
        SparsePtrs {
            out_idx: self.out_idx.ptr(),
            out_val: self.out_val.ptr(),
            small: self.small.ptr(),
            big: self.big.ptr(),
            sel: self.sel.ptr(),
            cand: self.cand.ptr(),
            list: self.list.ptr(),
            defbits: self.defbits.ptr(),
            tiebits: self.tiebits.ptr(),
            tiles: self.tiles.ptr(),
        }
    }

    /// The payload's two device arrays, `(bytes, address)`: the indices, then the values.
    pub(super) fn arrays(&self) -> [(usize, u64); 2] {
        let bytes = self.shape.sent * 4;
        [(bytes, self.out_idx.ptr()), (bytes, self.out_val.ptr())]
    }

    /// `out` from the bytes of [`Sparse::arrays`], reusing its buffers.
    pub(super) fn fill(&self, out: &mut Payload, n: u32, values: DType, idx: &[u8], val: &[u8]) {
        let p = out.sparse_slot();
        p.n = n;
        p.values_dtype = values;
        p.indices.clear();
        p.indices.extend_from_slice(bytemuck::cast_slice(idx));
        p.values.clear();
        p.values.extend_from_slice(bytemuck::cast_slice(val));
        debug_assert_eq!(p.indices.len(), self.shape.sent);
    }

    /// `(indices, values, sent)` for frameworks that gather the payload on the device.
    pub(super) fn device_payload(&self) -> (u64, u64, usize) {
        (self.out_idx.ptr(), self.out_val.ptr(), self.shape.sent)
    }
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

/// The sparse methods' part of the step: `accumulate(e, sel_state)` computes `p` (and, with
/// one fused big group, histograms its first digit into `sel_state`), then the block-sized
/// groups in one launch and the grid-wide groups' radix passes and compactions.
pub(super) fn enqueue<E: Enqueue>(
    e: &mut E,
    b: abi::StepBuffers,
    config: &Config,
    (sp, ptr): (&SparseShape, SparsePtrs),
    (t_lo, t_hi): (u32, u32),
    accumulate: impl FnOnce(&mut E, u64) -> Result<()>,
) -> Result<()> {
    let (s_lo, s_hi) = (config.seed as u32, (config.seed >> 32) as u32);
    let base = SelArgs {
        b,
        groups: ptr.big,
        state: ptr.sel,
        cand: ptr.cand,
        list: ptr.list,
        defbits: ptr.defbits,
        tiebits: ptr.tiebits,
        ngroups: sp.big.len() as u32,
        worker: config.worker,
        t_lo,
        t_hi,
        s_lo,
        s_hi,
        ..Default::default()
    };
    if sp.fused {
        // The one big group's bitmaps and state are ready before the accumulate
        // pass histograms its digit 0 into that state.
        let g = sp.big[0];
        let a = SelArgs {
            stage: STAGE_FIRST,
            bpg: e.per_group(1, words_of(g.lo, g.len) as u64, 256),
            ..base
        };
        e.launch(K::SelClearBits, None, a.bpg, 256, &a)?;
        e.launch(K::SelReset, None, 1, 1024, &SelArgs { bpg: 1, ..a })?;
        accumulate(e, ptr.sel)?;
    } else {
        accumulate(e, 0)?;
    }
    if !sp.small.is_empty() {
        if sp.small_member {
            e.memset(ptr.defbits, 0, sp.words * 4)?;
        }
        let a = SmallArgs {
            b,
            groups: ptr.small,
            out_idx: ptr.out_idx,
            out_val: ptr.out_val,
            member: ptr.defbits,
            worker: config.worker,
            t_lo,
            t_hi,
            s_lo,
            s_hi,
            dtype: u32::from(config.values.code()),
        };
        e.launch(
            K::SelectSmall,
            None,
            sp.small.len() as u32,
            BLOCK_THREADS,
            &a,
        )?;
    }
    let c = CompactArgs {
        b,
        groups: ptr.big,
        state: ptr.sel,
        defbits: ptr.defbits,
        tiebits: ptr.tiebits,
        tiles: ptr.tiles,
        list: ptr.list,
        out_idx: ptr.out_idx,
        out_val: ptr.out_val,
        ngroups: sp.big.len() as u32,
        dtype: u32::from(config.values.code()),
        ..Default::default()
    };
    run_big(e, &sp.big, base, c, sp.fused)
}

/// One grid-wide radix selection in every group of `a.groups` that takes part in
/// `a.stage`, each pass one launch over all of them: clear the bitmaps, reset the states,
/// histogram digit 0 (unless the accumulate pass already did), then three rounds of pivot
/// search and filtering passes; the last pass marks the selected sets and the ties.
/// `bpg` and `clear_bpg` are the blocks each group gets in the passes and in the clear.
pub(crate) fn radix_stage<E: Enqueue>(
    e: &mut E,
    a: SelArgs,
    pass0_done: bool,
    bpg: u32,
    clear_bpg: u32,
) -> Result<()> {
    let ng = a.ngroups;
    let one = SelArgs { bpg: 1, ..a };
    let wide = SelArgs { bpg, ..a };
    if !pass0_done {
        let clear = SelArgs {
            bpg: clear_bpg,
            ..a
        };
        e.launch(K::SelClearBits, None, ng * clear_bpg, 256, &clear)?;
        e.launch(K::SelReset, None, ng, 1024, &one)?;
        e.launch(
            K::SelPass,
            None,
            ng * bpg,
            256,
            &SelArgs { pass: 0, ..wide },
        )?;
    }
    for d in 0..3 {
        e.launch(K::SelFind, None, ng, 1024, &SelArgs { pass: d, ..one })?;
        let pass = SelArgs {
            pass: d + 1,
            ..wide
        };
        e.launch(K::SelPass, None, ng * bpg, 256, &pass)?;
    }
    Ok(())
}

/// The ordered compaction of the bitmaps of every group in `c.stage`: tile counts, their
/// scan (one block per group), the emit; `bpg` blocks per group share its tiles.
pub(crate) fn compact<E: Enqueue>(e: &mut E, c: CompactArgs, bpg: u32) -> Result<()> {
    let ng = c.ngroups;
    let wide = CompactArgs { bpg, ..c };
    e.launch(K::CompactCount, None, ng * bpg, TILE_WORDS as u32, &wide)?;
    e.launch(K::CompactScan, None, ng, 1024, &CompactArgs { bpg: 1, ..c })?;
    e.launch(K::CompactEmit, None, ng * bpg, TILE_WORDS as u32, &wide)
}

/// The grid-wide groups of a step: the groups that send everything, then each selection
/// stage with its compaction, every pass one launch over all the groups it concerns.
pub(crate) fn run_big<E: Enqueue>(
    e: &mut E,
    big: &[BigGroup],
    base: SelArgs,
    c: CompactArgs,
    fused: bool,
) -> Result<()> {
    let ng = big.len();
    // The largest per-group need of a stage, or None when no group takes part.
    let most =
        |stage: u32, f: fn(&BigGroup) -> u64| big.iter().filter(|g| g.in_stage(stage)).map(f).max();
    if let Some(len) = most(STAGE_ALL, |g| u64::from(g.len)) {
        let bpg = e.per_group(ng, len, 256);
        let all = CompactArgs {
            stage: STAGE_ALL,
            bpg,
            ..c
        };
        e.launch(K::EmitRange, None, ng as u32 * bpg, 256, &all)?;
    }
    for stage in [STAGE_FIRST, STAGE_LIST] {
        let source: fn(&BigGroup) -> u64 = if stage == STAGE_LIST {
            |g| u64::from(g.r)
        } else {
            |g| u64::from(g.len)
        };
        let Some(items) = most(stage, source) else {
            continue;
        };
        let words = most(stage, |g| words_of(g.lo, g.len) as u64).unwrap_or(0);
        let tiles = most(stage, |g| u64::from(g.ntiles)).unwrap_or(0);
        let a = SelArgs { stage, ..base };
        let (bpg, clear_bpg) = (e.per_group(ng, items, 256), e.per_group(ng, words, 256));
        radix_stage(e, a, fused && stage == STAGE_FIRST, bpg, clear_bpg)?;
        compact(e, CompactArgs { stage, ..c }, e.per_group(ng, tiles, 1))?;
    }
    Ok(())
}
