// Shared by every gradsift shader module: it is prepended to each module's source, both by
// build.rs (naga validation) and at pipeline creation, so line numbers in build errors are
// mapped back to this file or to the module file.

const WG: u32 = 256u;
// Elements per tile: every tile lies inside one group, so a workgroup can keep one
// workgroup-local histogram or partial sum and flush it once.
const TILE: u32 = 4096u;
const PER_THREAD: u32 = 16u;
const NONE: u32 = 0xFFFFFFFFu;

// Workgroup id of a 2-D dispatch flattened to one index (dispatches are split into
// x <= 65535 and y rows because of maxComputeWorkgroupsPerDimension).
fn flat_id(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

fn is_finite_bits(b: u32) -> bool {
    return (b & 0x7F800000u) != 0x7F800000u;
}

// SPEC §1 as a key where smaller ranks first: larger |x| bits give a smaller key, and the
// index is the second half of the 64-bit composite key, so ties go to the lower index.
// Shifted left by one (bit 31 of the key is always 0) so that the first radix byte is the
// whole exponent: 256 useful bins in round 0 instead of 128, fewer candidates after it.
fn magnitude_key(x: f32) -> u32 {
    return (0x7FFFFFFFu ^ (bitcast<u32>(x) & 0x7FFFFFFFu)) << 1u;
}

// Exact f16 -> f32 widening with integer operations: unpack2x16float may flush f16
// subnormals on some drivers, and SPEC §0 asks for an exact widening.
fn f16_bits_to_f32(h: u32) -> f32 {
    let s = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1Fu;
    let m = h & 0x3FFu;
    if e == 0x1Fu {
        return bitcast<f32>(s | 0x7F800000u | (m << 13u));
    }
    if e == 0u {
        // m * 2^-24 is exact and a normal f32; the sign is put back by bits so -0 stays -0.
        let v = f32(m) * bitcast<f32>(0x33800000u);
        return bitcast<f32>(s | bitcast<u32>(v));
    }
    return bitcast<f32>(s | ((e + 112u) << 23u) | (m << 13u));
}

// Element `i` of a gradient stored as packed u32 words: dtype 0 = f32, 1 = f16, 2 = bf16
// (two 16-bit values per word, element 2j in the low half, as little-endian memory holds them).
fn decode_elem(w: u32, i: u32, dtype: u32) -> f32 {
    if dtype == 0u {
        return bitcast<f32>(w);
    }
    let h = (w >> ((i & 1u) * 16u)) & 0xFFFFu;
    if dtype == 1u {
        return f16_bits_to_f32(h);
    }
    return bitcast<f32>(h << 16u);
}

// Word index holding element `i` for a dtype.
fn elem_word(i: u32, dtype: u32) -> u32 {
    if dtype == 0u {
        return i;
    }
    return i >> 1u;
}

// DType::quantize: round to nearest even into f16/bf16 and back, saturating finite values at
// the format's largest finite value. Integer rounding because WGSL leaves pack2x16float's
// rounding unspecified.
fn quantize(v: f32, dt: u32) -> f32 {
    if dt == 0u {
        return v;
    }
    let b = bitcast<u32>(v);
    let s = b & 0x80000000u;
    let a = b & 0x7FFFFFFFu;
    if a >= 0x7F800000u {
        return v;
    }
    if dt == 2u {
        var r = (a + 0x7FFFu + ((a >> 16u) & 1u)) & 0xFFFF0000u;
        if r >= 0x7F800000u {
            r = 0x7F7F0000u;
        }
        return bitcast<f32>(s | r);
    }
    if a >= 0x38800000u {
        var r = (a + 0xFFFu + ((a >> 13u) & 1u)) & 0xFFFFE000u;
        if r > 0x477FE000u {
            r = 0x477FE000u;
        }
        return bitcast<f32>(s | r);
    }
    // f16 subnormal range: a multiple of 2^-24; round() is ties-to-even in WGSL.
    let m = round(bitcast<f32>(a) * 16777216.0);
    return bitcast<f32>(s | bitcast<u32>(m * bitcast<f32>(0x33800000u)));
}

// (hi, lo) of the 64-bit product, from 16-bit halves since WGSL has no u64.
fn mulhilo(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xFFFFu;
    let a1 = a >> 16u;
    let b0 = b & 0xFFFFu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    let mid = (p00 >> 16u) + (p01 & 0xFFFFu) + (p10 & 0xFFFFu);
    let hi = p11 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u);
    return vec2<u32>(hi, a * b);
}

// Philox4x32-10, bit for bit as src/philox.rs.
fn philox4x32_10(counter: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
    var c = counter;
    var k = key;
    for (var round = 0u; round < 10u; round++) {
        if round > 0u {
            k = k + vec2<u32>(0x9E3779B9u, 0xBB67AE85u);
        }
        let p0 = mulhilo(0xD2511F53u, c.x);
        let p1 = mulhilo(0xCD9E8D57u, c.z);
        c = vec4<u32>(p1.x ^ c.y ^ k.x, p1.y, p0.x ^ c.w ^ k.y, p0.y);
    }
    return c;
}

// Byte `d` (0 = most significant) of the 64-bit composite key (key << 32 | index).
fn composite_digit(key: u32, index: u32, d: u32) -> u32 {
    if d < 4u {
        return (key >> (24u - 8u * d)) & 0xFFu;
    }
    return (index >> (24u - 8u * (d - 4u))) & 0xFFu;
}

// Mantissa (leading bit included, in [2^23, 2^24)) and exponent of a positive finite f32
// given by its bits, subnormals normalised: x = m * 2^(e - 23).
fn f32_parts(b: u32) -> vec2<i32> {
    var e = i32(b >> 23u);
    var m = b & 0x7FFFFFu;
    if e == 0 {
        let sh = countLeadingZeros(m) - 8u;
        m = m << sh;
        e = -126 - i32(sh);
    } else {
        m = m | 0x800000u;
        e = e - 127;
    }
    return vec2<i32>(i32(m), e);
}

// a / b rounded to nearest even, for finite a >= 0 and b > 0 (either may be subnormal; +inf
// on overflow): WGSL's `/` may be 2.5 ulp off, and SPEC §13 needs the correctly rounded
// quotient. Restoring division of the mantissas into 26 quotient bits and a sticky bit,
// then one rounding at the result's precision (normal or subnormal). Integer operations
// only, so no flush-to-zero applies.
fn div_rn(a: f32, b: f32) -> f32 {
    let ab = bitcast<u32>(a) & 0x7FFFFFFFu;
    if ab == 0u {
        return 0.0;
    }
    let pa = f32_parts(ab);
    let pb = f32_parts(bitcast<u32>(b) & 0x7FFFFFFFu);
    var ma = u32(pa.x);
    let mb = u32(pb.x);
    var x = pa.y - pb.y;
    if ma < mb {
        ma = ma << 1u;
        x = x - 1;
    }
    var rem = ma;
    var q = 0u;
    for (var i = 0u; i < 26u; i++) {
        q = q << 1u;
        if rem >= mb {
            rem = rem - mb;
            q = q | 1u;
        }
        rem = rem << 1u;
    }
    // a / b = q * 2^(x - 25), q in [2^25, 2^26); rem != 0 when more bits would follow.
    let eb = x + 127;
    if eb >= 255 {
        return bitcast<f32>(0x7F800000u);
    }
    var sh = 2u;
    if eb < 1 {
        if 3 - eb >= 27 {
            return 0.0;
        }
        sh = u32(3 - eb);
    }
    var m = q >> sh;
    let half = 1u << (sh - 1u);
    let low = q & ((1u << sh) - 1u);
    if low > half || (low == half && (rem != 0u || (m & 1u) == 1u)) {
        m = m + 1u;
    }
    if eb >= 1 {
        // A carry to 2^24 moves into the exponent field (and to +inf from the largest).
        return bitcast<f32>((u32(eb) << 23u) + m - 0x800000u);
    }
    return bitcast<f32>(m);
}
