// The parameter server's decoder (SPEC §7). One dispatch per worker, in worker order, so each
// coordinate receives its f32 adds in the order k = 0..K-1, exactly as on the CPU. Indices
// were validated on the host before anything was uploaded.

struct WorkerParams {
    offset: u32,
    len: u32,
    scale_off: u32,
    bits_off: u32,
}

struct AggCfg {
    n: u32,
    num_groups: u32,
    over_senders: u32,
    workers: u32,
}

@group(0) @binding(0) var<uniform> wk: WorkerParams;
@group(0) @binding(1) var<uniform> cfg: AggCfg;
@group(0) @binding(2) var<storage, read> idx: array<u32>;
// Sparse values, then sign scales or QSGD steps (scale / s, divided on the host), all workers
// concatenated.
@group(0) @binding(3) var<storage, read> val: array<f32>;
@group(0) @binding(4) var<storage, read> signs: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read_write> counts: array<u32>;
// inv[c] = f32(1 / c) computed on the host (a GPU division need not be correctly rounded).
@group(0) @binding(7) var<storage, read> inv: array<f32>;
// Group start offsets (sign payloads carry one scale per group).
@group(0) @binding(8) var<storage, read> starts: array<u32>;
// A QSGD payload's decoded values (SPEC §13), written by one dispatch and added by the next,
// so that no driver can fuse the multiply into the add (the sum must be the CPU's bits).
@group(0) @binding(9) var<storage, read_write> decoded: array<f32>;

fn element(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return flat_id(wid, nwg) * WG + lid;
}

@compute @workgroup_size(256)
fn clear(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wid, nwg, lid);
    if i < cfg.n {
        out[i] = 0.0;
        counts[i] = 0u;
    }
}

@compute @workgroup_size(256)
fn scatter(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = element(wid, nwg, lid);
    if j < wk.len {
        let i = idx[wk.offset + j];
        out[i] = out[i] + val[wk.offset + j];
        counts[i] = counts[i] + 1u;
    }
}

fn group_of(i: u32) -> u32 {
    var lo = 0u;
    var hi = cfg.num_groups;
    while hi - lo > 1u {
        let mid = (lo + hi) / 2u;
        if starts[mid] <= i {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

@compute @workgroup_size(256)
fn add_sign(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wid, nwg, lid);
    if i < cfg.n {
        let s = val[wk.scale_off + group_of(i)];
        let neg = (signs[wk.bits_off + (i >> 5u)] >> (i & 31u)) & 1u;
        if neg == 1u {
            out[i] = out[i] + (-s);
        } else {
            out[i] = out[i] + s;
        }
        counts[i] = counts[i] + 1u;
    }
}

// QSGD codes are packed four to a word of `signs` (element 4 w + j in byte j).
@compute @workgroup_size(256)
fn decode_qsgd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wid, nwg, lid);
    if i < cfg.n {
        let step = val[wk.scale_off + group_of(i)];
        let byte = (signs[wk.bits_off + (i >> 2u)] >> (8u * (i & 3u))) & 0xFFu;
        decoded[i] = f32(bitcast<i32>(byte << 24u) >> 24u) * step;
    }
}

@compute @workgroup_size(256)
fn add_decoded(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wid, nwg, lid);
    if i < cfg.n {
        out[i] = out[i] + decoded[i];
        counts[i] = counts[i] + 1u;
    }
}

@compute @workgroup_size(256)
fn finish(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = element(wid, nwg, lid);
    if i < cfg.n {
        var c = cfg.workers;
        if cfg.over_senders != 0u {
            c = counts[i];
        }
        out[i] = out[i] * inv[c];
    }
}
