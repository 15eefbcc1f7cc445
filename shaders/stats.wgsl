// Per-layer statistics and the K-worker variance estimator (SPEC §8) as segmented reductions:
// tiles (each inside one layer) reduce in workgroup memory, then one workgroup per layer
// reduces its tiles. Sums are f32 trees; the second pass is centred on the first pass's mean
// and also returns sum(x - mean), which the host uses to correct the mean and the variance.

struct StatsCfg {
    n: u32,
    num_layers: u32,
    num_tiles: u32,
    dtype: u32,
    workers: u32,
    tiles_off: u32,
    pad0: u32,
    pad1: u32,
}

struct Unused {
    x: vec4<u32>,
}

@group(0) @binding(0) var<uniform> unused: Unused;
@group(0) @binding(1) var<uniform> cfg: StatsCfg;
// Per layer 4 words (start, end, first tile, end tile), then per tile 4 words (layer, start, end, 0).
@group(0) @binding(2) var<storage, read> plan: array<u32>;
@group(0) @binding(3) var<storage, read> x: array<u32>;
// Per tile 8 words.
@group(0) @binding(4) var<storage, read_write> part: array<u32>;
// Per layer 8 words: finite count, non-finite count, sum, min, max, max|x|, sum(x - m), sum(x - m)^2
// (variance: noise sum, -, sum ybar, -, -, -, sum(ybar - m), sum(ybar - m)^2).
@group(0) @binding(5) var<storage, read_write> res: array<u32>;
// Per worker: non-finite count, first non-finite index.
@group(0) @binding(6) var<storage, read_write> bad: array<atomic<u32>>;

var<workgroup> s0: array<f32, 256>;
var<workgroup> s1: array<f32, 256>;
var<workgroup> s2: array<f32, 256>;
var<workgroup> s3: array<f32, 256>;
var<workgroup> c0: array<u32, 256>;
var<workgroup> c1: array<u32, 256>;

fn load(i: u32) -> f32 {
    return decode_elem(x[elem_word(i, cfg.dtype)], i, cfg.dtype);
}

// Tree reduction of all six workgroup arrays (sums, min, max, max; counts summed).
fn reduce_all(lid: u32) {
    workgroupBarrier();
    for (var off = 128u; off > 0u; off = off / 2u) {
        if lid < off {
            s0[lid] = s0[lid] + s0[lid + off];
            s1[lid] = min(s1[lid], s1[lid + off]);
            s2[lid] = max(s2[lid], s2[lid + off]);
            s3[lid] = max(s3[lid], s3[lid + off]);
            c0[lid] = c0[lid] + c0[lid + off];
            c1[lid] = c1[lid] + c1[lid + off];
        }
        workgroupBarrier();
    }
}

fn reduce_sums(lid: u32) {
    workgroupBarrier();
    for (var off = 128u; off > 0u; off = off / 2u) {
        if lid < off {
            s0[lid] = s0[lid] + s0[lid + off];
            s1[lid] = s1[lid] + s1[lid + off];
        }
        workgroupBarrier();
    }
}

// Largest finite f32 as the neutral element of min/max: WGSL has no infinity literal, and the
// host maps a layer without finite elements to (+inf, -inf) from its finite count.
const INF: f32 = 0x1.fffffep+127;

@compute @workgroup_size(256)
fn stats_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = flat_id(wid, nwg);
    if t >= cfg.num_tiles {
        return;
    }
    let tb = cfg.tiles_off + t * 4u;
    let start = plan[tb + 1u];
    let end = plan[tb + 2u];
    var sum = 0.0;
    var lo = INF;
    var hi = -INF;
    var ma = 0.0;
    var fin = 0u;
    var nf = 0u;
    var any = false;
    for (var j = 0u; j < PER_THREAD; j++) {
        let i = start + lid + j * WG;
        if i >= end {
            break;
        }
        let v = load(i);
        if is_finite_bits(bitcast<u32>(v)) {
            sum += v;
            lo = min(lo, v);
            hi = max(hi, v);
            ma = max(ma, abs(v));
            fin += 1u;
        } else {
            nf += 1u;
        }
    }
    s0[lid] = sum;
    s1[lid] = lo;
    s2[lid] = hi;
    s3[lid] = ma;
    c0[lid] = fin;
    c1[lid] = nf;
    reduce_all(lid);
    if lid == 0u {
        let o = t * 8u;
        part[o] = c0[0];
        part[o + 1u] = c1[0];
        part[o + 2u] = bitcast<u32>(s0[0]);
        part[o + 3u] = bitcast<u32>(s1[0]);
        part[o + 4u] = bitcast<u32>(s2[0]);
        part[o + 5u] = bitcast<u32>(s3[0]);
    }
}

@compute @workgroup_size(256)
fn stats_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let l = flat_id(wid, nwg);
    if l >= cfg.num_layers {
        return;
    }
    let t0 = plan[l * 4u + 2u];
    let t1 = plan[l * 4u + 3u];
    var sum = 0.0;
    var lo = INF;
    var hi = -INF;
    var ma = 0.0;
    var fin = 0u;
    var nf = 0u;
    for (var t = t0 + lid; t < t1; t += WG) {
        let o = t * 8u;
        fin += part[o];
        nf += part[o + 1u];
        sum += bitcast<f32>(part[o + 2u]);
        lo = min(lo, bitcast<f32>(part[o + 3u]));
        hi = max(hi, bitcast<f32>(part[o + 4u]));
        ma = max(ma, bitcast<f32>(part[o + 5u]));
    }
    s0[lid] = sum;
    s1[lid] = lo;
    s2[lid] = hi;
    s3[lid] = ma;
    c0[lid] = fin;
    c1[lid] = nf;
    reduce_all(lid);
    if lid == 0u {
        let o = l * 8u;
        res[o] = c0[0];
        res[o + 1u] = c1[0];
        res[o + 2u] = bitcast<u32>(s0[0]);
        res[o + 3u] = bitcast<u32>(s1[0]);
        res[o + 4u] = bitcast<u32>(s2[0]);
        res[o + 5u] = bitcast<u32>(s3[0]);
    }
}

fn layer_mean(l: u32) -> f32 {
    let c = res[l * 8u];
    if c == 0u {
        return 0.0;
    }
    return bitcast<f32>(res[l * 8u + 2u]) / f32(c);
}

@compute @workgroup_size(256)
fn m2_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = flat_id(wid, nwg);
    if t >= cfg.num_tiles {
        return;
    }
    let tb = cfg.tiles_off + t * 4u;
    let m = layer_mean(plan[tb]);
    let start = plan[tb + 1u];
    let end = plan[tb + 2u];
    var d1 = 0.0;
    var d2 = 0.0;
    for (var j = 0u; j < PER_THREAD; j++) {
        let i = start + lid + j * WG;
        if i >= end {
            break;
        }
        let v = load(i);
        if is_finite_bits(bitcast<u32>(v)) {
            let d = v - m;
            d1 += d;
            d2 += d * d;
        }
    }
    s0[lid] = d1;
    s1[lid] = d2;
    reduce_sums(lid);
    if lid == 0u {
        part[t * 8u + 6u] = bitcast<u32>(s0[0]);
        part[t * 8u + 7u] = bitcast<u32>(s1[0]);
    }
}

@compute @workgroup_size(256)
fn m2_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let l = flat_id(wid, nwg);
    if l >= cfg.num_layers {
        return;
    }
    let t0 = plan[l * 4u + 2u];
    let t1 = plan[l * 4u + 3u];
    var d1 = 0.0;
    var d2 = 0.0;
    for (var t = t0 + lid; t < t1; t += WG) {
        d1 += bitcast<f32>(part[t * 8u + 6u]);
        d2 += bitcast<f32>(part[t * 8u + 7u]);
    }
    s0[lid] = d1;
    s1[lid] = d2;
    reduce_sums(lid);
    if lid == 0u {
        res[l * 8u + 6u] = bitcast<u32>(s0[0]);
        res[l * 8u + 7u] = bitcast<u32>(s1[0]);
    }
}

// ybar_i over the K workers (stacked: worker k's element i at k * n + i).
fn ybar(i: u32) -> f32 {
    var s = 0.0;
    for (var k = 0u; k < cfg.workers; k++) {
        s += load(k * cfg.n + i);
    }
    return s / f32(cfg.workers);
}

@compute @workgroup_size(256)
fn var_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = flat_id(wid, nwg);
    if t >= cfg.num_tiles {
        return;
    }
    let tb = cfg.tiles_off + t * 4u;
    let start = plan[tb + 1u];
    let end = plan[tb + 2u];
    var noise = 0.0;
    var sy = 0.0;
    for (var j = 0u; j < PER_THREAD; j++) {
        let i = start + lid + j * WG;
        if i >= end {
            break;
        }
        for (var k = 0u; k < cfg.workers; k++) {
            let v = load(k * cfg.n + i);
            if !is_finite_bits(bitcast<u32>(v)) {
                atomicAdd(&bad[2u * k], 1u);
                atomicMin(&bad[2u * k + 1u], i);
            }
        }
        let m = ybar(i);
        for (var k = 0u; k < cfg.workers; k++) {
            let d = load(k * cfg.n + i) - m;
            noise += d * d;
        }
        sy += m;
    }
    s0[lid] = noise;
    s1[lid] = sy;
    reduce_sums(lid);
    if lid == 0u {
        part[t * 8u] = bitcast<u32>(s0[0]);
        part[t * 8u + 2u] = bitcast<u32>(s1[0]);
    }
}

@compute @workgroup_size(256)
fn var_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let l = flat_id(wid, nwg);
    if l >= cfg.num_layers {
        return;
    }
    let t0 = plan[l * 4u + 2u];
    let t1 = plan[l * 4u + 3u];
    var a = 0.0;
    var b = 0.0;
    for (var t = t0 + lid; t < t1; t += WG) {
        a += bitcast<f32>(part[t * 8u]);
        b += bitcast<f32>(part[t * 8u + 2u]);
    }
    s0[lid] = a;
    s1[lid] = b;
    reduce_sums(lid);
    if lid == 0u {
        let n = plan[l * 4u + 1u] - plan[l * 4u];
        res[l * 8u] = n;
        res[l * 8u + 1u] = bitcast<u32>(s0[0]);
        res[l * 8u + 2u] = bitcast<u32>(s1[0]);
    }
}

@compute @workgroup_size(256)
fn var_m2_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = flat_id(wid, nwg);
    if t >= cfg.num_tiles {
        return;
    }
    let tb = cfg.tiles_off + t * 4u;
    let m = layer_mean(plan[tb]);
    let start = plan[tb + 1u];
    let end = plan[tb + 2u];
    var d1 = 0.0;
    var d2 = 0.0;
    for (var j = 0u; j < PER_THREAD; j++) {
        let i = start + lid + j * WG;
        if i >= end {
            break;
        }
        let d = ybar(i) - m;
        d1 += d;
        d2 += d * d;
    }
    s0[lid] = d1;
    s1[lid] = d2;
    reduce_sums(lid);
    if lid == 0u {
        part[t * 8u + 6u] = bitcast<u32>(s0[0]);
        part[t * 8u + 7u] = bitcast<u32>(s1[0]);
    }
}
