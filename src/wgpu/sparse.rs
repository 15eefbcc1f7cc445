//! Sparse selection on wgpu (SPEC §2-4 and §12's refund; the radix passes of
//! `shaders/compress.wgsl`): top-r, random-k and rTop-k. The per-group stage state, the
//! radix rounds and the emission recorded into the step, and the payload's read-back.

use super::compress::{
    Buf, Dispatch, GSTATE, NONE, PLAIN, PassParams, Recorder, ST_VFIRST, Shape, WG,
};
use super::context::{floats, grid, words};
use super::passes::CompressPass as P;
use crate::{DType, Group, Payload};

/// Counter slots of the state words: the candidate lists A and B, the top-r list.
const CTR_A: u32 = 4;
const CTR_B: u32 = 5;
const CTR_SEL: u32 = 6;

impl Shape {
    /// How many elements stage 1 keeps of how many (rTop-k: r of the group, else k).
    fn stage1_need(&self, g: &Group) -> (usize, usize) {
        match (self.sparse, self.stage2) {
            (false, _) => (0, 0),
            (true, true) => (g.r, g.range.len()),
            (true, false) => (g.k, g.range.len()),
        }
    }
}

/// The device state at the start of every step: status words, then per stage and group
/// `[mode, need, 255, 0]` (mode 0 nothing to select, 1 selecting, 3 take everything).
pub(super) fn state_words(shape: &Shape, groups: &[Group]) -> Vec<u32> {
    let mut st = vec![0u32; shape.active_off as usize + 2 * shape.ng];
    st[1] = NONE;
    st[ST_VFIRST] = NONE;
    let mode = |need: usize, total: usize| match need {
        0 => 0,
        _ if need >= total => 3,
        _ => 1,
    };
    for (gi, g) in groups.iter().enumerate() {
        let (need, total) = shape.stage1_need(g);
        let b = GSTATE as usize + 4 * gi;
        st[b..b + 4].copy_from_slice(&[mode(need, total), need as u32, 255, 0]);
        if shape.stage2 {
            let b = shape.gstate2 as usize + 4 * gi;
            st[b..b + 4].copy_from_slice(&[mode(g.k, g.r), g.k as u32, 255, 0]);
        }
    }
    st
}

impl Recorder {
    /// Stage 1 (magnitude or random keys over the tiles) and, for rTop-k, stage 2 (random
    /// keys over the top-r list): up to 8 radix rounds each.
    pub(super) fn select(&mut self, shape: &Shape, num_tiles: usize) {
        let stages: &[(u32, u32, bool)] = if shape.stage2 {
            &[(0, GSTATE, true), (1, shape.gstate2, false)]
        } else {
            &[(shape.stage1_key, GSTATE, false)]
        };
        for (si, &(key_kind, gstate_off, emit_list)) in stages.iter().enumerate() {
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
            let from_list = si == 1;
            if from_list {
                let g = grid((shape.sum_r as u64).div_ceil(WG));
                let p = PassParams {
                    in_slot: CTR_SEL,
                    ..base
                };
                let bufs = [Buf::Sel, Buf::ListA, Buf::NoSel, Buf::NoArgs];
                self.push(P::HistList, p, bufs, Dispatch::Direct(g.0, g.1));
            }
            let emit = if emit_list { Buf::Sel } else { Buf::NoSel };
            for d in 0..8u32 {
                self.round(base, d, from_list, emit, shape.ng, num_tiles);
            }
        }
    }

    /// One radix round `d` of a stage: `prep` sizes it, `pivot` finds each group's pivot
    /// digit, a compaction emits what lies below it and keeps the pivot digit's elements.
    fn round(
        &mut self,
        base: PassParams,
        d: u32,
        from_list: bool,
        emit: Buf,
        ng: usize,
        num_tiles: usize,
    ) {
        // List ping-pong: round d reads the output of round d - 1 and writes the other list.
        let lists = [(Buf::ListA, CTR_A), (Buf::ListB, CTR_B)];
        let (out_buf, out_slot) = lists[(d % 2) as usize];
        // Round 0 reads the tiles (stage 1) or the top-r list (stage 2).
        let (in_buf, in_slot) = match d {
            0 if from_list => (Buf::Sel, CTR_SEL),
            0 => lists[1],
            _ => lists[((d + 1) % 2) as usize],
        };
        let tile_round = d == 0 && !from_list;
        // Round 0's pivot covers every group; later rounds only the groups the previous
        // pivot left selecting (active lists ping-pong like the lists).
        let pivot_args = if d == 0 { NONE } else { self.next_slot() };
        let compact_args = if tile_round { NONE } else { self.next_slot() };
        let p = PassParams {
            digit: d,
            next_digit: if d < 7 { d + 1 } else { NONE },
            in_slot,
            out_slot,
            act_in: if d == 0 { NONE } else { (d + 1) % 2 },
            act_out: d % 2,
            args_off: pivot_args,
            args_off2: compact_args,
            ..base
        };
        let emit_safe = if in_buf == Buf::Sel { Buf::NoSel } else { emit };
        self.push(
            P::Prep,
            p,
            [in_buf, out_buf, emit_safe, Buf::Args],
            Dispatch::Direct(1, 1),
        );
        let pivot = if d == 0 {
            let g = grid(ng as u64);
            Dispatch::Direct(g.0, g.1)
        } else {
            Dispatch::Indirect(u64::from(pivot_args) * 4)
        };
        self.push(
            P::Pivot,
            p,
            [in_buf, out_buf, emit_safe, Buf::NoArgs],
            pivot,
        );
        if tile_round {
            let g = grid(num_tiles as u64);
            let bufs = [in_buf, out_buf, emit, Buf::NoArgs];
            self.push(P::CompactTiles, p, bufs, Dispatch::Direct(g.0, g.1));
        } else {
            let bufs = [in_buf, out_buf, emit_safe, Buf::NoArgs];
            let at = Dispatch::Indirect(u64::from(compact_args) * 4);
            self.push(P::CompactList, p, bufs, at);
        }
    }

    /// The bitmap-to-index scan that writes the payload in ascending order and subtracts
    /// what was sent.
    pub(super) fn emit(&mut self, num_blocks: u64) {
        let g = grid(num_blocks);
        self.plain([
            (P::ScanBlocks, g),
            (P::ScanTop, (1, 1)),
            (P::EmitPayload, g),
        ]);
    }

    /// Error feedback of the sparse all-reduce (SPEC §12): `e[i] += v` on the current half,
    /// one invocation per entry of a refund of up to `sent` entries.
    pub(super) fn refund(&mut self, sent: u64) {
        let g = grid(sent.div_ceil(WG));
        let bufs = [Buf::RefundIdx, Buf::RefundVal, Buf::NoSel, Buf::NoArgs];
        self.push(P::Refund, PLAIN, bufs, Dispatch::Direct(g.0, g.1));
    }
}

/// A sparse payload from its read-back indices and values, reusing `out`'s buffers.
pub(super) fn fill(out: &mut Payload, n: u32, values: DType, idx: &[u8], val: &[u8]) {
    let p = out.sparse_slot();
    p.n = n;
    p.values_dtype = values;
    p.indices.clear();
    p.indices.extend(words(idx));
    p.values.clear();
    p.values.extend(floats(val));
}
