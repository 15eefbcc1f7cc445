// The fused error-feedback step (SPEC §4-6): accumulate, radix select, emit, commit.
//
// Residual and momentum are ping-pong pairs (ea/eb, ua/ub). st[CUR] names the current one;
// every pass reads it on the device, writes only the other one, and the last pass (`flip`)
// makes the other one current only when the accumulate pass counted no non-finite value and
// the emission none that the unbiased scale made non-finite (SPEC §5).
// A rejected step therefore leaves the current residual and momentum untouched without any
// host round trip in the middle of the step.
//
// Selection is a radix select over the 64-bit composite key (key << 32 | index), one byte per
// round, so ties resolve to the lower index by construction (SPEC §1, §3). Round 0 runs over
// tiles of the groups; its histogram is fused into `accumulate`. Later rounds run over compacted
// candidate lists only, with indirect dispatch sized on the device.

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
    // QSGD's s (SPEC §13), 0 for the other methods.
    levels: u32,
    // QSGD: 1 keeps p - decode in the residual, 0 leaves 0 (no error feedback).
    feedback: u32,
}

// One selection round: which composite digit it looks at and where its inputs and outputs live.
struct PassParams {
    digit: u32,
    next_digit: u32,
    key_kind: u32,
    emit_list: u32,
    gstate_off: u32,
    in_slot: u32,
    out_slot: u32,
    args_off: u32,
    // Active-group list (0 or 1) this round's pivot reads, NONE for all groups (round 0).
    act_in: u32,
    // Active-group list the pivot appends still-selecting groups to.
    act_out: u32,
    // Indirect-args word offset for this round's compact_list, NONE when it is direct.
    args_off2: u32,
    pad: u32,
}

const ST_BAD: u32 = 0u;
const ST_FIRST: u32 = 1u;
const ST_CUR: u32 = 2u;
// Sent values that only the unbiased scale made non-finite (p finite), and the lowest such
// index: counted by `emit_payload`, reported by `flip` in words 0 and 1 when p was finite.
const ST_VBAD: u32 = 9u;
const ST_VFIRST: u32 = 10u;
const CTR_SEL: u32 = 6u;
// Counts of the two active-group lists (the lists live at cfg.active_off, num_groups each).
const ACT_CNT: u32 = 7u;

@group(0) @binding(0) var<uniform> ps: PassParams;
@group(0) @binding(1) var<uniform> cfg: Cfg;
// Per group 8 words (start, end, r, k, scale bits, first tile, end tile, 0), then per tile 4
// words (group, start, end, 0) at cfg.tiles_off.
@group(0) @binding(2) var<storage, read> plan: array<u32>;
// 0 non-finite count, 1 first non-finite index, 2 current buffer, 3 rejected steps since the
// last host read, 4.. list counters, 7 and 8 active-group counts, 9 and 10 the count and first
// index of sent values made non-finite by the scale,
// then per stage and group 4 words (mode, need, pivot, 0).
@group(0) @binding(3) var<storage, read_write> st: array<atomic<u32>>;
@group(0) @binding(4) var<storage, read_write> ea: array<f32>;
@group(0) @binding(5) var<storage, read_write> eb: array<f32>;
@group(0) @binding(6) var<storage, read_write> ua: array<f32>;
@group(0) @binding(7) var<storage, read_write> ub: array<f32>;
@group(0) @binding(8) var<storage, read_write> hist: array<atomic<u32>>;
@group(0) @binding(9) var<storage, read> list_in: array<u32>;
@group(0) @binding(10) var<storage, read_write> list_out: array<u32>;
@group(0) @binding(11) var<storage, read_write> sel: array<u32>;
@group(0) @binding(12) var<storage, read_write> args: array<u32>;
@group(0) @binding(13) var<storage, read_write> bits: array<atomic<u32>>;
@group(0) @binding(14) var<storage, read_write> out_idx: array<u32>;
@group(0) @binding(15) var<storage, read_write> out_val: array<f32>;
@group(0) @binding(16) var<storage, read_write> partial: array<u32>;
@group(1) @binding(0) var<storage, read> grad: array<u32>;

var<workgroup> wh: array<atomic<u32>, 256>;
// Round-0 histogram of `accumulate` in 8 copies (lane % 8): typical gradients put most
// elements in a handful of exponent bins, and one copy would serialise a whole warp's atomics
// on the same address.
const HCOPIES: u32 = 8u;
var<workgroup> wh8: array<atomic<u32>, 2048>;
var<workgroup> wcnt: array<atomic<u32>, 2>;
var<workgroup> wbase: array<u32, 2>;
var<workgroup> wmode: u32;
var<workgroup> wpivot: u32;
var<workgroup> wg0: u32;
var<workgroup> wscan: array<u32, 256>;
var<workgroup> wsum: array<f32, 256>;
var<workgroup> wstate: vec2<u32>;

fn e_cur(i: u32, cur: u32) -> f32 {
    if cur == 0u {
        return ea[i];
    }
    return eb[i];
}

fn u_cur(i: u32, cur: u32) -> f32 {
    if cur == 0u {
        return ua[i];
    }
    return ub[i];
}

// `p` lives in the next residual buffer from accumulate until the step ends.
fn p_load(i: u32, cur: u32) -> f32 {
    if cur == 0u {
        return eb[i];
    }
    return ea[i];
}

fn p_store(i: u32, cur: u32, v: f32) {
    if cur == 0u {
        eb[i] = v;
    } else {
        ea[i] = v;
    }
}

fn u_next_store(i: u32, cur: u32, v: f32) {
    if cur == 0u {
        ub[i] = v;
    } else {
        ua[i] = v;
    }
}

// SPEC §3's Philox block of element `i`: word 0 is random-k's key, word 1 QSGD's rounding.
fn philox_block(i: u32) -> vec4<u32> {
    return philox4x32_10(
        vec4<u32>(i, cfg.worker, cfg.step_lo, cfg.step_hi),
        vec2<u32>(cfg.seed_lo, cfg.seed_hi)
    );
}

fn random_key(i: u32) -> u32 {
    return philox_block(i).x;
}

// Kind 0: magnitude of p (SPEC §1); kind 1: the Philox key (SPEC §3).
fn key_of(i: u32, cur: u32, kind: u32) -> u32 {
    if kind == 0u {
        return magnitude_key(p_load(i, cur));
    }
    return random_key(i);
}

// Largest g with start(g) <= i: the non-empty group holding i (empty groups share starts).
fn find_group(i: u32) -> u32 {
    var lo = 0u;
    var hi = cfg.num_groups;
    while hi - lo > 1u {
        let mid = (lo + hi) / 2u;
        if plan[mid * 8u] <= i {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

@compute @workgroup_size(256)
fn accumulate(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = flat_id(wid, nwg);
    if t >= cfg.num_tiles {
        return;
    }
    let tb = cfg.tiles_off + t * 4u;
    let g = plan[tb];
    let start = plan[tb + 1u];
    let end = plan[tb + 2u];
    if lid == 0u {
        var m = 0u;
        if cfg.first_key != NONE {
            m = atomicLoad(&st[cfg.gstate1_off + g * 4u]);
        }
        wmode = m;
    }
    for (var c = 0u; c < HCOPIES; c++) {
        atomicStore(&wh8[c * 256u + lid], 0u);
    }
    let mode = workgroupUniformLoad(&wmode);
    let cur = atomicLoad(&st[ST_CUR]);
    let copy = (lid % HCOPIES) * 256u;
    var bad = 0u;
    var first = NONE;
    for (var j = 0u; j < PER_THREAD; j++) {
        let i = start + lid + j * WG;
        if i >= end {
            break;
        }
        let gv = decode_elem(grad[elem_word(i, cfg.dtype)], i, cfg.dtype);
        var p: f32;
        if cfg.has_momentum != 0u {
            let u = cfg.momentum * u_cur(i, cur) + gv;
            u_next_store(i, cur, u);
            p = e_cur(i, cur) + u;
        } else {
            p = e_cur(i, cur) + gv;
        }
        p_store(i, cur, p);
        if !is_finite_bits(bitcast<u32>(p)) {
            bad += 1u;
            first = min(first, i);
        }
        if mode == 1u {
            var k: u32;
            if cfg.first_key == 0u {
                k = magnitude_key(p);
            } else {
                k = random_key(i);
            }
            atomicAdd(&wh8[copy + composite_digit(k, i, 0u)], 1u);
        }
    }
    if bad > 0u {
        atomicAdd(&st[ST_BAD], bad);
        atomicMin(&st[ST_FIRST], first);
    }
    workgroupBarrier();
    if mode == 1u {
        var c = 0u;
        for (var h = 0u; h < HCOPIES; h++) {
            c += atomicLoad(&wh8[h * 256u + lid]);
        }
        if c > 0u {
            atomicAdd(&hist[g * 256u + lid], c);
        }
    }
}

fn write_grid(off: u32, wgs: u32) {
    let x = min(wgs, 65535u);
    var y = 1u;
    if x > 0u {
        y = (wgs + x - 1u) / x;
    }
    args[off] = x;
    args[off + 1u] = y;
    args[off + 2u] = 1u;
}

// One thread between rounds: sizes this round's pivot (one workgroup per still-selecting
// group) and compact (one thread per candidate) from counts on the device, and resets the
// counters this round appends to. This is what keeps the host out of the loop, and what keeps
// rounds after the first proportional to the groups and candidates actually left.
@compute @workgroup_size(1)
fn prep() {
    if ps.act_in != NONE && ps.args_off != NONE {
        write_grid(ps.args_off, atomicLoad(&st[ACT_CNT + ps.act_in]));
    }
    atomicStore(&st[ACT_CNT + ps.act_out], 0u);
    if ps.args_off2 != NONE {
        let cnt = atomicLoad(&st[ps.in_slot]);
        write_grid(ps.args_off2, (cnt + WG - 1u) / WG);
    }
    atomicStore(&st[ps.out_slot], 0u);
}

// One workgroup per group (round 0) or per still-selecting group (later rounds): find the
// digit holding the need-th smallest key of this round.
@compute @workgroup_size(256)
fn pivot(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = flat_id(wid, nwg);
    var g = id;
    if ps.act_in != NONE {
        if id >= atomicLoad(&st[ACT_CNT + ps.act_in]) {
            return;
        }
        g = atomicLoad(&st[cfg.active_off + ps.act_in * cfg.num_groups + id]);
    }
    if id >= cfg.num_groups {
        return;
    }
    let base = ps.gstate_off + g * 4u;
    if lid == 0u {
        let mode = atomicLoad(&st[base]);
        // 2: took its whole pivot bin last round, done now. 3: takes everything this round.
        if mode == 2u {
            atomicStore(&st[base], 0u);
        }
        if mode == 3u {
            atomicStore(&st[base], 2u);
        }
        wstate = vec2<u32>(mode, atomicLoad(&st[base + 1u]));
    }
    let s = workgroupUniformLoad(&wstate);
    if s.x != 1u {
        return;
    }
    let need = s.y;
    let h = atomicLoad(&hist[g * 256u + lid]);
    // Cleared here so the next round's compact can histogram into the same bins.
    atomicStore(&hist[g * 256u + lid], 0u);
    wscan[lid] = h;
    workgroupBarrier();
    for (var off = 1u; off < 256u; off = off * 2u) {
        var v = wscan[lid];
        if lid >= off {
            v = v + wscan[lid - off];
        }
        workgroupBarrier();
        wscan[lid] = v;
        workgroupBarrier();
    }
    let incl = wscan[lid];
    let excl = incl - h;
    if excl < need && need <= incl {
        let rest = need - excl;
        atomicStore(&st[base + 1u], rest);
        atomicStore(&st[base + 2u], lid);
        if rest == h {
            atomicStore(&st[base], 2u);
        } else if ps.next_digit != NONE {
            let slot = atomicAdd(&st[ACT_CNT + ps.act_out], 1u);
            atomicStore(&st[cfg.active_off + ps.act_out * cfg.num_groups + slot], g);
        }
    }
}

fn emit(i: u32, slot: u32) {
    if ps.emit_list != 0u {
        sel[slot] = i;
    } else {
        atomicOr(&bits[i >> 5u], 1u << (i & 31u));
    }
}

// Round 0 over whole groups, tile by tile: digits below the pivot are selected, the pivot
// digit's elements become candidates (with their next digit histogrammed), the rest drop.
// Two sweeps over the tile (count, then write) so each workgroup makes one atomic reservation
// per list instead of one per element.
@compute @workgroup_size(256)
fn compact_tiles(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = flat_id(wid, nwg);
    if t >= cfg.num_tiles {
        return;
    }
    let tb = cfg.tiles_off + t * 4u;
    let g = plan[tb];
    let start = plan[tb + 1u];
    let end = plan[tb + 2u];
    let base = ps.gstate_off + g * 4u;
    if lid == 0u {
        wmode = atomicLoad(&st[base]);
        wpivot = atomicLoad(&st[base + 2u]);
        atomicStore(&wcnt[0], 0u);
        atomicStore(&wcnt[1], 0u);
    }
    atomicStore(&wh[lid], 0u);
    let mode = workgroupUniformLoad(&wmode);
    if mode != 1u && mode != 2u {
        return;
    }
    let pv = workgroupUniformLoad(&wpivot);
    let cur = atomicLoad(&st[ST_CUR]);
    var nc = 0u;
    var ne = 0u;
    for (var j = 0u; j < PER_THREAD; j++) {
        let i = start + lid + j * WG;
        if i >= end {
            break;
        }
        let dg = composite_digit(key_of(i, cur, ps.key_kind), i, ps.digit);
        if dg < pv || (mode == 2u && dg == pv) {
            ne += 1u;
        } else if dg == pv {
            nc += 1u;
        }
    }
    let oc = atomicAdd(&wcnt[0], nc);
    let oe = atomicAdd(&wcnt[1], ne);
    workgroupBarrier();
    if lid == 0u {
        let c = atomicLoad(&wcnt[0]);
        let e = atomicLoad(&wcnt[1]);
        var bc = 0u;
        var be = 0u;
        if c > 0u {
            bc = atomicAdd(&st[ps.out_slot], c);
        }
        if e > 0u && ps.emit_list != 0u {
            be = atomicAdd(&st[CTR_SEL], e);
        }
        wbase[0] = bc;
        wbase[1] = be;
    }
    workgroupBarrier();
    var wc = wbase[0] + oc;
    var we = wbase[1] + oe;
    for (var j = 0u; j < PER_THREAD; j++) {
        let i = start + lid + j * WG;
        if i >= end {
            break;
        }
        let k = key_of(i, cur, ps.key_kind);
        let dg = composite_digit(k, i, ps.digit);
        if dg < pv || (mode == 2u && dg == pv) {
            emit(i, we);
            we += 1u;
        } else if dg == pv {
            list_out[wc] = i;
            wc += 1u;
            if ps.next_digit != NONE {
                atomicAdd(&wh[composite_digit(k, i, ps.next_digit)], 1u);
            }
        }
    }
    workgroupBarrier();
    if ps.next_digit != NONE {
        let c = atomicLoad(&wh[lid]);
        if c > 0u {
            atomicAdd(&hist[g * 256u + lid], c);
        }
    }
}

// Later rounds (and round 0 of a list input): one thread per candidate. The histogram of the
// next digit is privatised for the group of the workgroup's first candidate, which in global
// mode is every candidate, so adversarial ties do not all hit the same global bins.
@compute @workgroup_size(256)
fn compact_list(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let j0 = flat_id(wid, nwg) * WG;
    let j = j0 + lid;
    let cnt = atomicLoad(&st[ps.in_slot]);
    if lid == 0u {
        var g0 = NONE;
        if j0 < cnt {
            g0 = find_group(list_in[j0]);
        }
        wg0 = g0;
        atomicStore(&wcnt[0], 0u);
        atomicStore(&wcnt[1], 0u);
    }
    atomicStore(&wh[lid], 0u);
    let g0 = workgroupUniformLoad(&wg0);
    if g0 == NONE {
        return;
    }
    let cur = atomicLoad(&st[ST_CUR]);
    var is_c = false;
    var is_e = false;
    var i = 0u;
    var g = 0u;
    var k = 0u;
    if j < cnt {
        i = list_in[j];
        g = find_group(i);
        let base = ps.gstate_off + g * 4u;
        let mode = atomicLoad(&st[base]);
        if mode == 1u || mode == 2u {
            let pv = atomicLoad(&st[base + 2u]);
            k = key_of(i, cur, ps.key_kind);
            let dg = composite_digit(k, i, ps.digit);
            if dg < pv || (mode == 2u && dg == pv) {
                is_e = true;
            } else if dg == pv {
                is_c = true;
            }
        }
    }
    var oc = 0u;
    var oe = 0u;
    if is_c {
        oc = atomicAdd(&wcnt[0], 1u);
        if ps.next_digit != NONE {
            let nd = composite_digit(k, i, ps.next_digit);
            if g == g0 {
                atomicAdd(&wh[nd], 1u);
            } else {
                atomicAdd(&hist[g * 256u + nd], 1u);
            }
        }
    }
    if is_e {
        oe = atomicAdd(&wcnt[1], 1u);
    }
    workgroupBarrier();
    if lid == 0u {
        let c = atomicLoad(&wcnt[0]);
        let e = atomicLoad(&wcnt[1]);
        var bc = 0u;
        var be = 0u;
        if c > 0u {
            bc = atomicAdd(&st[ps.out_slot], c);
        }
        if e > 0u && ps.emit_list != 0u {
            be = atomicAdd(&st[CTR_SEL], e);
        }
        wbase[0] = bc;
        wbase[1] = be;
    }
    workgroupBarrier();
    if is_c {
        list_out[wbase[0] + oc] = i;
    }
    if is_e {
        emit(i, wbase[1] + oe);
    }
    if ps.next_digit != NONE {
        let c = atomicLoad(&wh[lid]);
        if c > 0u {
            atomicAdd(&hist[g0 * 256u + lid], c);
        }
    }
}

// Round-0 histogram of the random keys of the top-r list (the second select of rTop-k).
@compute @workgroup_size(256)
fn hist_list(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let j0 = flat_id(wid, nwg) * WG;
    let j = j0 + lid;
    let cnt = atomicLoad(&st[ps.in_slot]);
    if lid == 0u {
        var g0 = NONE;
        if j0 < cnt {
            g0 = find_group(list_in[j0]);
        }
        wg0 = g0;
    }
    atomicStore(&wh[lid], 0u);
    let g0 = workgroupUniformLoad(&wg0);
    if g0 == NONE {
        return;
    }
    let cur = atomicLoad(&st[ST_CUR]);
    if j < cnt {
        let i = list_in[j];
        let g = find_group(i);
        if atomicLoad(&st[ps.gstate_off + g * 4u]) == 1u {
            let d = composite_digit(key_of(i, cur, ps.key_kind), i, 0u);
            if g == g0 {
                atomicAdd(&wh[d], 1u);
            } else {
                atomicAdd(&hist[g * 256u + d], 1u);
            }
        }
    }
    workgroupBarrier();
    let c = atomicLoad(&wh[lid]);
    if c > 0u {
        atomicAdd(&hist[g0 * 256u + lid], c);
    }
}

// Emission: the selection bitmap is compacted into ascending indices with a three-phase scan
// (block popcounts, one-workgroup scan of the block sums, per-block scan and write). Blocks
// are 1024 words = 32768 elements.
@compute @workgroup_size(256)
fn scan_blocks(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let b = flat_id(wid, nwg);
    if b >= cfg.num_blocks {
        return;
    }
    if lid == 0u {
        atomicStore(&wcnt[0], 0u);
    }
    workgroupBarrier();
    var c = 0u;
    for (var q = 0u; q < 4u; q++) {
        let w = b * 1024u + lid * 4u + q;
        if w < cfg.num_words {
            c += countOneBits(atomicLoad(&bits[w]));
        }
    }
    atomicAdd(&wcnt[0], c);
    workgroupBarrier();
    if lid == 0u {
        partial[b] = atomicLoad(&wcnt[0]);
    }
}

fn workgroup_exclusive_scan(lid: u32, v: u32) -> u32 {
    wscan[lid] = v;
    workgroupBarrier();
    for (var off = 1u; off < 256u; off = off * 2u) {
        var x = wscan[lid];
        if lid >= off {
            x = x + wscan[lid - off];
        }
        workgroupBarrier();
        wscan[lid] = x;
        workgroupBarrier();
    }
    return wscan[lid] - v;
}

@compute @workgroup_size(256)
fn scan_top(@builtin(local_invocation_index) lid: u32) {
    let nb = cfg.num_blocks;
    let chunk = (nb + WG - 1u) / WG;
    let lo = min(lid * chunk, nb);
    let hi = min(lo + chunk, nb);
    var s = 0u;
    for (var b = lo; b < hi; b++) {
        s += partial[b];
    }
    var run = workgroup_exclusive_scan(lid, s);
    for (var b = lo; b < hi; b++) {
        let c = partial[b];
        partial[b] = run;
        run += c;
    }
}

// Writes the payload in ascending index order and removes what was sent from the residual:
// v = quantize(p * scale), e = p - v, and momentum factor masking u = 0 (SPEC §5).
@compute @workgroup_size(256)
fn emit_payload(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let b = flat_id(wid, nwg);
    if b >= cfg.num_blocks {
        return;
    }
    var c = 0u;
    for (var q = 0u; q < 4u; q++) {
        let w = b * 1024u + lid * 4u + q;
        if w < cfg.num_words {
            c += countOneBits(atomicLoad(&bits[w]));
        }
    }
    var o = partial[b] + workgroup_exclusive_scan(lid, c);
    let cur = atomicLoad(&st[ST_CUR]);
    for (var q = 0u; q < 4u; q++) {
        let w = b * 1024u + lid * 4u + q;
        if w >= cfg.num_words {
            break;
        }
        var word = atomicLoad(&bits[w]);
        while word != 0u {
            let i = w * 32u + firstTrailingBit(word);
            word &= word - 1u;
            let g = find_group(i);
            let scale = bitcast<f32>(plan[g * 8u + 4u]);
            let p = p_load(i, cur);
            var x = p;
            if scale != 1.0 {
                x = p * scale;
            }
            let v = quantize(x, cfg.values);
            // SPEC §5: a value only the scale made non-finite (|p| * scale > f32::MAX; the
            // f16/bf16 saturation applies to finite values only) fails the step like a
            // non-finite p, which `accumulate` has counted already.
            if !is_finite_bits(bitcast<u32>(v)) && is_finite_bits(bitcast<u32>(p)) {
                atomicAdd(&st[ST_VBAD], 1u);
                atomicMin(&st[ST_VFIRST], i);
            }
            out_idx[o] = i;
            out_val[o] = v;
            p_store(i, cur, p - v);
            if cfg.has_momentum != 0u {
                u_next_store(i, cur, 0.0);
            }
            o += 1u;
        }
    }
}

// Scaled sign (SPEC §6): tile sums of |p|, then one workgroup per group, then the signs.
@compute @workgroup_size(256)
fn sign_partial(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = flat_id(wid, nwg);
    if t >= cfg.num_tiles {
        return;
    }
    let tb = cfg.tiles_off + t * 4u;
    let start = plan[tb + 1u];
    let end = plan[tb + 2u];
    let cur = atomicLoad(&st[ST_CUR]);
    var s = 0.0;
    for (var j = 0u; j < PER_THREAD; j++) {
        let i = start + lid + j * WG;
        if i >= end {
            break;
        }
        s += abs(p_load(i, cur));
    }
    wsum[lid] = s;
    workgroupBarrier();
    for (var off = 128u; off > 0u; off = off / 2u) {
        if lid < off {
            wsum[lid] += wsum[lid + off];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        partial[t] = bitcast<u32>(wsum[0]);
    }
}

@compute @workgroup_size(256)
fn sign_scale(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = flat_id(wid, nwg);
    if g >= cfg.num_groups {
        return;
    }
    let t0 = plan[g * 8u + 5u];
    let t1 = plan[g * 8u + 6u];
    var s = 0.0;
    for (var t = t0 + lid; t < t1; t += WG) {
        s += bitcast<f32>(partial[t]);
    }
    wsum[lid] = s;
    workgroupBarrier();
    for (var off = 128u; off > 0u; off = off / 2u) {
        if lid < off {
            wsum[lid] += wsum[lid + off];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        let n = plan[g * 8u + 1u] - plan[g * 8u];
        var scale = 0.0;
        if n > 0u {
            scale = wsum[0] / f32(n);
        }
        out_val[g] = scale;
    }
}

@compute @workgroup_size(256)
fn sign_apply(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = flat_id(wid, nwg);
    if t >= cfg.num_tiles {
        return;
    }
    let tb = cfg.tiles_off + t * 4u;
    let g = plan[tb];
    let start = plan[tb + 1u];
    let end = plan[tb + 2u];
    let s = out_val[g];
    let cur = atomicLoad(&st[ST_CUR]);
    for (var j = 0u; j < PER_THREAD; j++) {
        let i = start + lid + j * WG;
        if i >= end {
            break;
        }
        let p = p_load(i, cur);
        if p < 0.0 {
            atomicOr(&bits[i >> 5u], 1u << (i & 31u));
            p_store(i, cur, p + s);
        } else {
            p_store(i, cur, p - s);
        }
        if cfg.has_momentum != 0u {
            u_next_store(i, cur, 0.0);
        }
    }
}

// QSGD (SPEC §13): tile maxima of |p| (as bits: non-negative floats order as u32, and a
// maximum is exact in any order), then per group the scale and its two correctly rounded
// quotients (partial[num_tiles + 2 g], + 1: inv and step), then the codes, four to a word of
// `bits` (element 4 w + j in byte j), and p - decode into the residual.
@compute @workgroup_size(256)
fn qsgd_partial(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = flat_id(wid, nwg);
    if t >= cfg.num_tiles {
        return;
    }
    let tb = cfg.tiles_off + t * 4u;
    let start = plan[tb + 1u];
    let end = plan[tb + 2u];
    let cur = atomicLoad(&st[ST_CUR]);
    var m = 0u;
    for (var j = 0u; j < PER_THREAD; j++) {
        let i = start + lid + j * WG;
        if i >= end {
            break;
        }
        m = max(m, bitcast<u32>(p_load(i, cur)) & 0x7FFFFFFFu);
    }
    let top = workgroup_max(lid, m);
    if lid == 0u {
        partial[t] = top;
    }
}

fn workgroup_max(lid: u32, v: u32) -> u32 {
    wscan[lid] = v;
    workgroupBarrier();
    for (var off = 128u; off > 0u; off = off / 2u) {
        if lid < off {
            wscan[lid] = max(wscan[lid], wscan[lid + off]);
        }
        workgroupBarrier();
    }
    return wscan[0];
}

@compute @workgroup_size(256)
fn qsgd_scale(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = flat_id(wid, nwg);
    if g >= cfg.num_groups {
        return;
    }
    let t0 = plan[g * 8u + 5u];
    let t1 = plan[g * 8u + 6u];
    var m = 0u;
    for (var t = t0 + lid; t < t1; t += WG) {
        m = max(m, partial[t]);
    }
    let top = workgroup_max(lid, m);
    if lid == 0u {
        let scale = bitcast<f32>(top);
        let s = f32(cfg.levels);
        var inv = 0.0;
        if top != 0u {
            inv = div_rn(s, scale);
        }
        out_val[g] = scale;
        partial[cfg.num_tiles + 2u * g] = bitcast<u32>(inv);
        partial[cfg.num_tiles + 2u * g + 1u] = bitcast<u32>(div_rn(scale, s));
    }
}

// SPEC §13's level, with the zero test and the infinite inv on the bits (so that neither
// depends on how a driver treats subnormals).
fn qsgd_level(x: f32, inv: f32, s: u32, u: f32) -> i32 {
    let xb = bitcast<u32>(x);
    if (xb & 0x7FFFFFFFu) == 0u {
        return 0;
    }
    var l = s;
    let a = abs(x) * inv;
    if bitcast<u32>(inv) != 0x7F800000u && a < f32(s) {
        let f = floor(a);
        l = u32(f);
        if u < a - f {
            l += 1u;
        }
    }
    if (xb >> 31u) == 1u {
        return -i32(l);
    }
    return i32(l);
}

@compute @workgroup_size(256)
fn qsgd_apply(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = flat_id(wid, nwg);
    if t >= cfg.num_tiles {
        return;
    }
    let tb = cfg.tiles_off + t * 4u;
    let g = plan[tb];
    let start = plan[tb + 1u];
    let end = plan[tb + 2u];
    let inv = bitcast<f32>(partial[cfg.num_tiles + 2u * g]);
    let step = bitcast<f32>(partial[cfg.num_tiles + 2u * g + 1u]);
    let cur = atomicLoad(&st[ST_CUR]);
    for (var w = (start >> 2u) + lid; w <= ((end - 1u) >> 2u); w += WG) {
        var packed = 0u;
        for (var j = 0u; j < 4u; j++) {
            let i = 4u * w + j;
            if i < start || i >= end {
                continue;
            }
            let u = f32(philox_block(i).y >> 8u) * bitcast<f32>(0x33800000u);
            let x = p_load(i, cur);
            let q = qsgd_level(x, inv, cfg.levels, u);
            packed = packed | ((bitcast<u32>(q) & 0xFFu) << (8u * j));
            if cfg.feedback != 0u {
                p_store(i, cur, x - f32(q) * step);
            } else {
                p_store(i, cur, 0.0);
            }
            if cfg.has_momentum != 0u {
                u_next_store(i, cur, 0.0);
            }
        }
        // `bits` is cleared before every step; a word shared with the neighbouring tile is
        // ORed, a word of this tile alone stored.
        if 4u * w >= start && 4u * w + 4u <= end {
            atomicStore(&bits[w], packed);
        } else {
            atomicOr(&bits[w], packed);
        }
    }
}

// Commit: the next buffers become current only if p was finite everywhere and so was every
// sent value; with a finite p, the overflowing scaled values become the step's report (words
// 0 and 1, SPEC §5). Word 3 counts rejected steps until the host reads it (so a rejection is
// not lost when several steps run between two reads).
@compute @workgroup_size(1)
fn flip() {
    let vbad = atomicLoad(&st[ST_VBAD]);
    if atomicLoad(&st[ST_BAD]) == 0u && vbad != 0u {
        atomicStore(&st[ST_BAD], vbad);
        atomicStore(&st[ST_FIRST], atomicLoad(&st[ST_VFIRST]));
    }
    if atomicLoad(&st[ST_BAD]) == 0u {
        atomicXor(&st[ST_CUR], 1u);
    } else {
        atomicAdd(&st[3u], 1u);
    }
}

// SPEC §12: entries a distributed reduction did not use return to the current residual, one
// f32 addition each. list_in holds the count, then the indices (checked on the host: distinct,
// below n, so no two invocations touch one element); list_out the values' bits. The current
// half is read here: the refund follows the step on the queue.
@compute @workgroup_size(256)
fn refund(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = flat_id(wid, nwg) * 256u + lid;
    if t >= list_in[0] {
        return;
    }
    let i = list_in[1u + t];
    let v = bitcast<f32>(list_out[t]);
    if (atomicLoad(&st[ST_CUR]) & 1u) == 0u {
        ea[i] = ea[i] + v;
    } else {
        eb[i] = eb[i] + v;
    }
}
