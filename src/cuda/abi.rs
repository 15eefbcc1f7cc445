//! `#[repr(C)]` mirrors of the structs the kernels take by value or read from device memory.
//! Their sizes are asserted here and, independently, by `static_assert`s in the kernels, so
//! a layout drift fails both compilers.

#![allow(missing_docs)]

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StepStatus {
    pub bad_count: u64,
    pub first_bad: u32,
    pub cur: u32,
    pub steps_committed: u32,
    /// Sent values made non-finite only by the unbiased scale (SPEC §5), and the lowest
    /// index among them; `ef_commit` reports them in `bad_count`/`first_bad` when p was finite.
    pub val_bad: u32,
    pub val_first: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StepBuffers {
    pub e0: u64,
    pub e1: u64,
    pub u0: u64,
    pub u1: u64,
    pub status: u64,
    pub n: u32,
    pub momentum: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AccArgs {
    pub b: StepBuffers,
    pub grad: u64,
    pub sel_state: u64,
}

/// `ef_refund`: `count` entries (`idx`: u32, `val`: f32) added to the current residual.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RefundArgs {
    pub b: StepBuffers,
    pub idx: u64,
    pub val: u64,
    pub count: u32,
    pub pad: u32,
}

/// A big group as the batched selection passes read it: its range and counts, its payload
/// slot and its slices of the shared scratch buffers (candidates, top-r list, tiles).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BigGroup {
    pub lo: u32,
    pub len: u32,
    pub r: u32,
    pub k: u32,
    pub out_off: u32,
    pub scale: f32,
    pub cand_off: u32,
    pub cand_cap: u32,
    pub list_off: u32,
    pub tile_off: u32,
    pub ntiles: u32,
    pub pad: u32,
}

impl BigGroup {
    /// rTop-k proper: top-r, then random-k over the top-r list.
    pub fn two_stage(&self) -> bool {
        self.k < self.r && self.r < self.len
    }

    /// The same group for the one-block path (`select_small`).
    pub fn block_sized(&self) -> SmallGroup {
        SmallGroup {
            lo: self.lo,
            len: self.len,
            r: self.r,
            k: self.k,
            out_off: self.out_off,
            scale: self.scale,
        }
    }

    /// Whether the group takes part in `stage` (`STAGE_*`, kernels/select.cu).
    pub fn in_stage(&self, stage: u32) -> bool {
        match stage {
            STAGE_FIRST => self.k < self.len,
            STAGE_LIST => self.two_stage(),
            _ => self.k == self.len,
        }
    }
}

/// The first selection of each big group: top-r over its range, or random-k over it.
pub const STAGE_FIRST: u32 = 0;
/// rTop-k's second selection: random-k over the top-r list.
pub const STAGE_LIST: u32 = 1;
/// Groups that send every element (`emit_range`).
pub const STAGE_ALL: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SelArgs {
    pub b: StepBuffers,
    pub groups: u64,
    pub state: u64,
    pub cand: u64,
    pub list: u64,
    pub defbits: u64,
    pub tiebits: u64,
    pub ngroups: u32,
    pub bpg: u32,
    pub stage: u32,
    pub worker: u32,
    pub t_lo: u32,
    pub t_hi: u32,
    pub s_lo: u32,
    pub s_hi: u32,
    pub pass: i32,
    pub pad: u32,
}

/// Size of the device `SelState` (2048 histogram bins and eight words).
pub const SEL_STATE_BYTES: usize = 2048 * 4 + 8 * 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CompactArgs {
    pub b: StepBuffers,
    pub groups: u64,
    pub state: u64,
    pub defbits: u64,
    pub tiebits: u64,
    pub tiles: u64,
    pub list: u64,
    pub out_idx: u64,
    pub out_val: u64,
    pub ngroups: u32,
    pub bpg: u32,
    pub stage: u32,
    pub dtype: u32,
    pub to_list: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SmallGroup {
    pub lo: u32,
    pub len: u32,
    pub r: u32,
    pub k: u32,
    pub out_off: u32,
    pub scale: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SmallArgs {
    pub b: StepBuffers,
    pub groups: u64,
    pub out_idx: u64,
    pub out_val: u64,
    pub member: u64,
    pub worker: u32,
    pub t_lo: u32,
    pub t_hi: u32,
    pub s_lo: u32,
    pub s_hi: u32,
    pub dtype: u32,
}

/// A work item of the segmented kernels: `len <= ITEM` elements of group `group`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Item {
    pub group: u32,
    pub lo: u32,
    pub len: u32,
    pub pad: u32,
}

/// Elements per work item (256 threads x 16 registers in the statistics kernels).
pub const ITEM: usize = 4096;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SignArgs {
    pub b: StepBuffers,
    pub items: u64,
    pub partial: u64,
    pub group_items: u64,
    pub group_len: u64,
    pub scales: u64,
    pub words: u64,
    pub ngroups: u32,
    pub pad: u32,
}

/// `kernels/qsgd.cu`'s arguments: the work items of [`SignArgs`], the per-item maxima, the
/// per-group scales and the `n` signed levels, with SPEC §3's Philox key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct QsgdArgs {
    pub b: StepBuffers,
    pub items: u64,
    pub partial: u64,
    pub group_items: u64,
    pub scales: u64,
    pub codes: u64,
    pub ngroups: u32,
    pub levels: u32,
    pub worker: u32,
    pub t_lo: u32,
    pub t_hi: u32,
    pub s_lo: u32,
    pub s_hi: u32,
    /// 1: the residual keeps `p - decode`; 0: QSGD without error feedback (residual 0).
    pub feedback: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StatsArgs {
    pub x: u64,
    pub items: u64,
    pub partial: u64,
    pub layer_items: u64,
    pub out: u64,
    pub nlayers: u32,
    pub pad: u32,
}

pub const STATS_PARTIAL_BYTES: usize = 40;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StatsOut {
    pub finite: u64,
    pub non_finite: u64,
    pub mean: f64,
    pub var: f64,
    pub min: f32,
    pub max: f32,
    pub max_abs: f32,
    pub pad: f32,
}

pub const VAR_PARTIAL_BYTES: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct VarOut {
    pub sigma_x2: f64,
    pub sigma_n2: f64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VarArgs {
    pub workers: u64,
    pub items: u64,
    pub partial: u64,
    pub layer_items: u64,
    pub layer_len: u64,
    pub out: u64,
    pub bad_count: u64,
    pub bad_first: u64,
    pub k: u32,
    pub nlayers: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AggArgs {
    pub out: u64,
    pub counts: u64,
    pub idx: u64,
    pub val: u64,
    pub err_idx: u64,
    pub err_val: u64,
    pub any: u64,
    pub inv: u64,
    pub scales: u64,
    pub words: u64,
    pub items: u64,
    pub len: u32,
    pub n: u32,
    pub worker: u32,
    pub workers: u32,
}

const _: () = {
    assert!(size_of::<StepStatus>() == 32);
    assert!(size_of::<StepBuffers>() == 48);
    assert!(size_of::<AccArgs>() == 64);
    assert!(size_of::<RefundArgs>() == 72);
    assert!(size_of::<SelArgs>() == 136);
    assert!(size_of::<BigGroup>() == 48);
    assert!(size_of::<CompactArgs>() == 136);
    assert!(size_of::<SmallGroup>() == 24);
    assert!(size_of::<SmallArgs>() == 104);
    assert!(size_of::<Item>() == 16);
    assert!(size_of::<SignArgs>() == 104);
    assert!(size_of::<QsgdArgs>() == 120);
    assert!(size_of::<StatsArgs>() == 48);
    assert!(size_of::<StatsOut>() == 48);
    assert!(size_of::<VarOut>() == 16);
    assert!(size_of::<VarArgs>() == 72);
    assert!(size_of::<AggArgs>() == 104);
};

/// Splits each group into work items of at most [`ITEM`] elements. Returns the items and,
/// per group, the index of its first item (`groups + 1` entries).
pub fn items(groups: &[std::ops::Range<usize>]) -> (Vec<Item>, Vec<u32>) {
    let mut items = Vec::new();
    let mut first = Vec::with_capacity(groups.len() + 1);
    for (g, r) in groups.iter().enumerate() {
        first.push(items.len() as u32);
        let mut lo = r.start;
        while lo < r.end {
            let len = (r.end - lo).min(ITEM);
            items.push(Item {
                group: g as u32,
                lo: lo as u32,
                len: len as u32,
                pad: 0,
            });
            lo += len;
        }
    }
    first.push(items.len() as u32);
    (items, first)
}
