//! Wire format (SPEC §7, §10): exact round trips, exact bit counts, compression against the
//! entropy of a uniform k-subset, canonical encodings, and decoding hostile bytes without a
//! panic, an out-of-bounds access or a huge allocation.
//!
//! Run `cargo test --test wire -- --nocapture` to see the compression table.

use gradsift::wire::{self, Bits, DecodeError};
use gradsift::{DType, Error, Payload, QsgdPayload, SignPayload, SparsePayload};
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, System};
use std::cell::Cell;

// ---------------------------------------------------------------------------------------
// Allocation tracking: the largest single allocation requested on this thread.

struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|c| c.set(c.get().max(size)));
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        note(new);
        unsafe { System.realloc(ptr, layout, new) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Runs `f` and returns its result with the largest allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|c| c.set(0));
    let r = f();
    (r, LARGEST.with(|c| c.get()))
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// SplitMix64: a fixed-seed generator with no dependency on an RNG crate's API.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..=hi` (Lemire's multiply-shift, exact).
    fn up_to(&mut self, hi: u64) -> u64 {
        let range = hi as u128 + 1;
        loop {
            let m = self.next() as u128 * range;
            if (m as u64 as u128) >= (u64::MAX as u128 + 1) % range {
                return (m >> 64) as u64;
            }
        }
    }
    /// A finite value exactly representable in `dtype`.
    fn value(&mut self, dtype: DType) -> f32 {
        let v = f32::from_bits(self.next() as u32);
        dtype.quantize(if v.is_finite() { v } else { -2.5 })
    }
}

/// A uniformly random `k`-subset of `0..n` (Floyd's algorithm), ascending.
fn uniform_subset(n: u32, k: usize, rng: &mut Rng) -> Vec<u32> {
    assert!(k as u64 <= u64::from(n));
    let mut words = vec![0u64; (n as usize).div_ceil(64)];
    let has = |w: &mut Vec<u64>, i: u64| {
        let (q, r) = ((i / 64) as usize, i % 64);
        let set = (w[q] >> r) & 1 == 1;
        w[q] |= 1 << r;
        set
    };
    for j in u64::from(n) - k as u64..u64::from(n) {
        let t = rng.up_to(j);
        if has(&mut words, t) {
            has(&mut words, j);
        }
    }
    let mut out = Vec::with_capacity(k);
    for (q, &w) in words.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            out.push((q * 64) as u32 + w.trailing_zeros());
            w &= w - 1;
        }
    }
    assert_eq!(out.len(), k);
    out
}

fn sparse(n: u32, dtype: DType, indices: Vec<u32>, values: Vec<f32>) -> Payload {
    Payload::Sparse(SparsePayload {
        n,
        values_dtype: dtype,
        indices,
        values,
    })
}

fn sparse_random(n: u32, dtype: DType, indices: Vec<u32>, rng: &mut Rng) -> Payload {
    let values = indices.iter().map(|_| rng.value(dtype)).collect();
    sparse(n, dtype, indices, values)
}

fn sign_random(n: u32, groups: usize, rng: &mut Rng) -> Payload {
    let mut negative: Vec<u64> = (0..(n as usize).div_ceil(64)).map(|_| rng.next()).collect();
    if n % 64 != 0 {
        *negative.last_mut().unwrap() &= (1u64 << (n % 64)) - 1;
    }
    Payload::Sign(SignPayload {
        n,
        scales: (0..groups).map(|_| rng.value(DType::F32).abs()).collect(),
        negative,
    })
}

fn qsgd_random(n: u32, groups: usize, levels: u8, rng: &mut Rng) -> Payload {
    let m = u64::from(levels) * 2 + 1;
    Payload::Qsgd(QsgdPayload {
        n,
        levels,
        scales: (0..groups).map(|_| rng.value(DType::F32).abs()).collect(),
        codes: (0..n)
            .map(|_| ((rng.next() % m) as i16 - i16::from(levels)) as i8)
            .collect(),
    })
}

fn encode(p: &Payload) -> (Vec<u8>, Bits) {
    let mut out = Vec::new();
    let bits = wire::encode(p, &mut out).expect("valid payload must encode");
    (out, bits)
}

/// Bit-for-bit equality (`PartialEq` on f32 would identify 0.0 with -0.0).
fn assert_identical(a: &Payload, b: &Payload) {
    match (a, b) {
        (Payload::Sparse(a), Payload::Sparse(b)) => {
            assert_eq!(a.n, b.n);
            assert_eq!(a.values_dtype, b.values_dtype);
            assert_eq!(a.indices, b.indices);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.values), bits(&b.values));
        }
        (Payload::Sign(a), Payload::Sign(b)) => {
            assert_eq!(a.n, b.n);
            assert_eq!(a.negative, b.negative);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.scales), bits(&b.scales));
        }
        (Payload::Qsgd(a), Payload::Qsgd(b)) => {
            assert_eq!((a.n, a.levels), (b.n, b.levels));
            assert_eq!(a.codes, b.codes);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.scales), bits(&b.scales));
        }
        _ => panic!("kind changed: {a:?} vs {b:?}"),
    }
}

/// Checks the exact bit accounting of one encoding.
fn check_bits(p: &Payload, bytes: &[u8], bits: Bits) {
    assert_eq!(bits.total(), 8 * bytes.len() as u64, "{bits:?}");
    assert!(bits.padding < 8);
    match p {
        Payload::Sparse(s) => {
            assert_eq!(bits.header, 13 * 8);
            assert_eq!(
                bits.values,
                s.values.len() as u64 * u64::from(s.values_dtype.bits())
            );
            // Every index costs at least the unary terminator plus the b low bits.
            let b = u64::from(bytes[12]);
            assert!(bits.indices >= s.indices.len() as u64 * (1 + b));
        }
        Payload::Sign(s) => {
            assert_eq!(bits.header, (12 + 4 * s.scales.len() as u64) * 8);
            assert_eq!(bits.indices, u64::from(s.n));
            assert_eq!(bits.values, 0);
        }
        Payload::Qsgd(q) => {
            assert_eq!(bits.header, (13 + 4 * q.scales.len() as u64) * 8);
            assert_eq!(bits.indices, 0);
            let b = u64::from(gradsift::codec::qsgd::code_bits(q.levels));
            assert_eq!(bits.values, u64::from(q.n) * b);
            let len = wire::qsgd_len(q.n, q.scales.len(), q.levels);
            assert_eq!(bytes.len(), len);
        }
    }
}

/// Encode, check the bit count, decode (fresh and into a reused payload of the other
/// kind), compare bit for bit and check re-encoding. Returns the bytes and the bit count.
fn round_trip(p: &Payload) -> (Vec<u8>, Bits) {
    let (bytes, bits) = encode(p);
    check_bits(p, &bytes, bits);
    let q = wire::decode(&bytes).expect("own encoding must decode");
    assert_identical(p, &q);
    let mut reused = match p {
        Payload::Sparse(_) => sign_random(100, 2, &mut Rng(1)),
        Payload::Sign(_) | Payload::Qsgd(_) => sparse(9, DType::F16, vec![1, 4], vec![1.0, 2.0]),
    };
    wire::decode_into(&bytes, &mut reused).unwrap();
    assert_identical(p, &reused);
    wire::decode_into(&bytes, &mut reused).unwrap();
    assert_identical(p, &reused);
    let (again, _) = encode(&q);
    assert_eq!(again, bytes, "re-encoding differs");
    (bytes, bits)
}

/// What every successfully decoded payload must satisfy: valid by construction, and the
/// unique (canonical) encoding of itself.
fn validate(p: &Payload, bytes: &[u8]) {
    match p {
        Payload::Sparse(s) => {
            assert_eq!(s.indices.len(), s.values.len());
            assert!(s.indices.windows(2).all(|w| w[0] < w[1]), "not ascending");
            assert!(s.indices.iter().all(|&i| i < s.n), "index out of range");
            for &v in &s.values {
                assert!(v.is_finite());
                assert_eq!(s.values_dtype.quantize(v).to_bits(), v.to_bits());
            }
        }
        Payload::Sign(s) => {
            assert_eq!(s.negative.len(), (s.n as usize).div_ceil(64));
            if s.n % 64 != 0 {
                assert_eq!(s.negative.last().unwrap() >> (s.n % 64), 0);
            }
            assert!(s.scales.iter().all(|v| v.is_finite()));
        }
        Payload::Qsgd(q) => {
            assert!((1..=127).contains(&q.levels));
            assert_eq!(q.codes.len(), q.n as usize);
            let l = q.levels as i8;
            assert!(q.codes.iter().all(|c| (-l..=l).contains(c)));
            assert!(q.scales.iter().all(|v| v.is_finite() && *v >= 0.0));
        }
    }
    let mut out = Vec::new();
    let bits = wire::encode(p, &mut out).expect("a decoded payload must encode");
    assert_eq!(out, bytes, "accepted a non-canonical encoding of {p:?}");
    check_bits(p, &out, bits);
}

/// Decodes hostile bytes: never panics (a panic fails the test), and success means valid.
/// Returns whether the bytes were accepted.
fn decode_hostile(bytes: &[u8]) -> bool {
    match wire::decode(bytes) {
        Ok(p) => {
            validate(&p, bytes);
            true
        }
        Err(_) => false,
    }
}

/// A hand-made sparse message: header, `count`, Rice parameter `b`, the gaps in Rice code
/// (written independently of the crate's writer), then `tail` raw.
fn craft_sparse(n: u32, dtype: DType, count: u32, b: u8, gaps: &[u64], tail: &[u8]) -> Vec<u8> {
    let mut out = vec![b'G', b'S', 1, 0x10 | dtype_code(dtype)];
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.push(b);
    let mut bitv: Vec<bool> = Vec::new();
    for &g in gaps {
        bitv.extend(std::iter::repeat_n(true, (g >> b) as usize));
        bitv.push(false);
        bitv.extend((0..b).map(|j| (g >> j) & 1 == 1));
    }
    for chunk in bitv.chunks(8) {
        out.push(
            chunk
                .iter()
                .enumerate()
                .map(|(j, &x)| u8::from(x) << j)
                .sum(),
        );
    }
    out.extend_from_slice(tail);
    out
}

fn dtype_code(d: DType) -> u8 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

fn gaps_of(indices: &[u32]) -> Vec<u64> {
    let mut prev = -1i64;
    indices
        .iter()
        .map(|&i| {
            let g = (i64::from(i) - prev - 1) as u64;
            prev = i64::from(i);
            g
        })
        .collect()
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

// ---------------------------------------------------------------------------------------
// Round trips and bit counts.

#[test]
fn sparse_round_trips_edge_cases() {
    let mut rng = Rng(7);
    for dtype in DTYPES {
        let mut cases: Vec<(u32, Vec<u32>)> = vec![
            (0, vec![]),
            (1, vec![]),
            (1, vec![0]),
            (2, vec![0]),
            (2, vec![1]),
            (2, vec![0, 1]),
            (10, vec![]),
            (10, vec![0]),
            (10, vec![9]),
            (10, vec![0, 9]),
            (100, (0..100).collect()),
            (1000, (0..1000).collect()),
            (1000, vec![0, 1, 2, 500, 998, 999]),
            (u32::MAX, vec![]),
            (u32::MAX, vec![0]),
            (u32::MAX, vec![u32::MAX - 1]),
            (u32::MAX, vec![0, u32::MAX - 1]),
            (
                u32::MAX,
                vec![0, 1, 1 << 31, (1 << 31) + 1, u32::MAX - 2, u32::MAX - 1],
            ),
            (u32::MAX, vec![12_345, 3_000_000_000]),
        ];
        for n in [17u32, 64, 65, 1 << 20] {
            let k = (n / 3) as usize;
            cases.push((n, uniform_subset(n, k, &mut rng)));
            cases.push((n, uniform_subset(n, n as usize, &mut rng)));
            cases.push((n, uniform_subset(n, 1, &mut rng)));
        }
        for (n, indices) in cases {
            let k = indices.len();
            let p = sparse_random(n, dtype, indices, &mut rng);
            let (bytes, bits) = round_trip(&p);
            assert_eq!(bits.values, k as u64 * u64::from(dtype.bits()));
            assert_eq!(bytes.len() as u64 * 8, bits.total());
        }
    }
}

#[test]
fn special_values_round_trip_bit_exactly() {
    let specials = |d: DType| -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::from_bits(0x8000_0001),
            f32::MAX,
            f32::MIN,
            65504.0,
            -65504.0,
            f16_sub(),
            1e-30,
        ];
        v.iter_mut().for_each(|x| *x = d.quantize(*x));
        v
    };
    for dtype in DTYPES {
        let values = specials(dtype);
        let n = 1000;
        let indices: Vec<u32> = (0..values.len() as u32).map(|j| j * 70 + 3).collect();
        round_trip(&sparse(n, dtype, indices, values));
    }
}

/// Smallest positive f16 subnormal.
fn f16_sub() -> f32 {
    f32::powi(2.0, -24)
}

#[test]
fn sign_round_trips() {
    let mut rng = Rng(11);
    for n in [
        0u32, 1, 2, 7, 8, 9, 15, 63, 64, 65, 100, 127, 128, 129, 1000, 4097, 100_003,
    ] {
        for groups in [0usize, 1, 3, 7, 40] {
            round_trip(&sign_random(n, groups, &mut rng));
        }
        // All negative and all positive.
        let words = (n as usize).div_ceil(64);
        let mut all = vec![u64::MAX; words];
        if n % 64 != 0 {
            *all.last_mut().unwrap() = (1u64 << (n % 64)) - 1;
        }
        for negative in [all, vec![0; words]] {
            round_trip(&Payload::Sign(SignPayload {
                n,
                scales: vec![0.5, -0.0, 3.0],
                negative,
            }));
        }
    }
}

#[test]
fn exact_bit_counts() {
    let mut rng = Rng(3);
    for dtype in DTYPES {
        for &(n, k) in &[
            (1u32 << 16, 0usize),
            (1 << 16, 1),
            (1 << 16, 655),
            (1 << 16, 1 << 16),
        ] {
            let p = sparse_random(n, dtype, uniform_subset(n, k, &mut rng), &mut rng);
            let (bytes, bits) = encode(&p);
            assert_eq!(bits.total(), 8 * bytes.len() as u64);
            assert_eq!(bits.values, k as u64 * u64::from(dtype.bits()));
            assert_eq!(
                bits.header + bits.indices + bits.padding,
                8 * (bytes.len() - k * dtype.bits() as usize / 8) as u64
            );
            // The index code is exactly the Rice length for the chosen parameter.
            let b = u64::from(bytes[12]);
            let expect: u64 = gaps_of(match &p {
                Payload::Sparse(s) => &s.indices,
                _ => unreachable!(),
            })
            .iter()
            .map(|g| 1 + b + (g >> b))
            .sum();
            assert_eq!(bits.indices, expect);
        }
    }
    let p = sign_random(1001, 5, &mut rng);
    let (bytes, bits) = encode(&p);
    assert_eq!(bits.total(), 8 * bytes.len() as u64);
    assert_eq!(bits.indices, 1001);
    assert_eq!(bits.padding, 7);
    assert_eq!(bits.header, 8 * (12 + 20));
}

// ---------------------------------------------------------------------------------------
// Compression against the entropy of a uniform k-subset.

#[test]
fn index_bits_near_entropy() {
    let mut rng = Rng(0x5EED);
    let cases: &[(u32, usize)] = &[
        (1 << 24, 1_678),   // 0.01 %
        (1 << 24, 16_777),  // 0.1 %
        (1 << 24, 167_772), // 1 %
        (100_000, 100),     // 0.1 %
        (100_000, 1_000),   // 1 %
        (100_000, 10_000),  // 10 %
    ];
    println!(
        "\n{:>10} {:>8} {:>6} {:>3} {:>12} {:>16} {:>8} {:>9}",
        "n", "k", "k/n", "b", "bits/index", "log2C(n,k)/k", "excess", "u32 index"
    );
    for &(n, k) in cases {
        let p = sparse_random(n, DType::F32, uniform_subset(n, k, &mut rng), &mut rng);
        let (bytes, bits) = round_trip(&p);
        let per = bits.indices as f64 / k as f64;
        let bound = wire::log2_binomial(u64::from(n), k as u64) / k as f64;
        println!(
            "{n:>10} {k:>8} {:>5.2}% {:>3} {per:>12.4} {bound:>16.4} {:>+8.4} {:>9}",
            100.0 * k as f64 / f64::from(n),
            bytes[12],
            per - bound,
            32
        );
        assert!(
            per <= bound + 0.25,
            "n = {n}, k = {k}: {per} bits/index vs entropy {bound}"
        );
        assert!(per >= bound - 0.5, "suspiciously below the entropy bound");
    }
}

#[test]
fn log2_binomial_values() {
    assert_eq!(wire::log2_binomial(10, 0), 0.0);
    assert_eq!(wire::log2_binomial(10, 10), 0.0);
    assert!((wire::log2_binomial(10, 1) - 10f64.log2()).abs() < 1e-12);
    assert!((wire::log2_binomial(10, 3) - 120f64.log2()).abs() < 1e-12);
    assert!((wire::log2_binomial(52, 5) - 2_598_960f64.log2()).abs() < 1e-9);
    assert_eq!(wire::log2_binomial(3, 5), 0.0);
}

// ---------------------------------------------------------------------------------------
// The encoder rejects malformed payloads.

#[test]
fn encode_rejects_malformed() {
    let bad: Vec<(&str, Payload)> = vec![
        (
            "unsorted",
            sparse(10, DType::F32, vec![3, 2], vec![1.0, 2.0]),
        ),
        (
            "duplicate",
            sparse(10, DType::F32, vec![2, 2], vec![1.0, 2.0]),
        ),
        ("index == n", sparse(10, DType::F32, vec![10], vec![1.0])),
        (
            "index > n",
            sparse(10, DType::F32, vec![u32::MAX], vec![1.0]),
        ),
        ("n = 0, k = 1", sparse(0, DType::F32, vec![0], vec![1.0])),
        (
            "too few values",
            sparse(10, DType::F32, vec![1, 2], vec![1.0]),
        ),
        (
            "too many values",
            sparse(10, DType::F32, vec![1], vec![1.0, 2.0]),
        ),
        ("NaN", sparse(10, DType::F32, vec![1], vec![f32::NAN])),
        ("inf", sparse(10, DType::F32, vec![1], vec![f32::INFINITY])),
        (
            "NaN in f16",
            sparse(10, DType::F16, vec![1], vec![f32::NAN]),
        ),
        (
            "-inf in bf16",
            sparse(10, DType::BF16, vec![1], vec![f32::NEG_INFINITY]),
        ),
        ("0.1 in f16", sparse(10, DType::F16, vec![1], vec![0.1])),
        ("1e6 in f16", sparse(10, DType::F16, vec![1], vec![1e6])),
        ("1e-8 in f16", sparse(10, DType::F16, vec![1], vec![1e-8])),
        (
            "f32 subnormal in f16",
            sparse(10, DType::F16, vec![1], vec![f32::from_bits(1)]),
        ),
        (
            "1 + 2^-10 in bf16",
            sparse(10, DType::BF16, vec![1], vec![1.0 + f32::powi(2.0, -10)]),
        ),
        (
            "f32::MAX in bf16",
            sparse(10, DType::BF16, vec![1], vec![f32::MAX]),
        ),
        (
            "sign: NaN scale",
            Payload::Sign(SignPayload {
                n: 10,
                scales: vec![f32::NAN],
                negative: vec![0],
            }),
        ),
        (
            "sign: bit beyond n",
            Payload::Sign(SignPayload {
                n: 10,
                scales: vec![1.0],
                negative: vec![1 << 10],
            }),
        ),
        (
            "sign: bit 63 beyond n",
            Payload::Sign(SignPayload {
                n: 65,
                scales: vec![1.0],
                negative: vec![0, 1 << 63],
            }),
        ),
        (
            "sign: too few words",
            Payload::Sign(SignPayload {
                n: 65,
                scales: vec![1.0],
                negative: vec![0],
            }),
        ),
        (
            "sign: too many words",
            Payload::Sign(SignPayload {
                n: 64,
                scales: vec![1.0],
                negative: vec![0, 0],
            }),
        ),
    ];
    for (what, p) in bad {
        let mut out = Vec::new();
        match wire::encode(&p, &mut out) {
            Err(Error::Encode(_)) => {}
            other => panic!("{what}: expected Error::Encode, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Hostile headers.

#[test]
fn huge_count_with_short_body_errors_without_allocating() {
    for dtype in DTYPES {
        for b in [0u8, 5, 31] {
            let bytes = craft_sparse(u32::MAX, dtype, u32::MAX, b, &[0, 1, 2], &[0; 64]);
            let (r, largest) = largest_allocation(|| wire::decode(&bytes));
            assert!(matches!(r, Err(DecodeError::Truncated { .. })), "{r:?}");
            assert!(largest < 1 << 16, "allocated {largest} bytes");
        }
    }
    // The same through `decode_into` with a reused payload.
    let bytes = craft_sparse(u32::MAX, DType::F32, u32::MAX, 0, &[], &[0; 1000]);
    let mut p = sparse(4, DType::F32, vec![1], vec![1.0]);
    let (r, largest) = largest_allocation(|| wire::decode_into(&bytes, &mut p));
    assert!(r.is_err());
    assert!(largest < 1 << 16, "allocated {largest} bytes");
    // A sign payload claiming 2^32 - 1 groups and n = 2^32 - 1.
    let mut bytes = vec![b'G', b'S', 1, 0x20];
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
    bytes.extend_from_slice(&[0; 100]);
    let (r, largest) = largest_allocation(|| wire::decode(&bytes));
    assert!(matches!(r, Err(DecodeError::Truncated { .. })), "{r:?}");
    assert!(largest < 1 << 16, "allocated {largest} bytes");
}

#[test]
fn count_above_n_is_rejected() {
    let bytes = craft_sparse(3, DType::F32, 4, 0, &[0, 0, 0, 0], &[0; 16]);
    assert!(matches!(
        wire::decode(&bytes),
        Err(DecodeError::Count { count: 4, n: 3 })
    ));
}

#[test]
fn rice_parameter_above_31_is_rejected() {
    let p = sparse(1000, DType::F32, vec![5, 500], vec![1.0, 2.0]);
    let (mut bytes, _) = encode(&p);
    for b in 32..=255u8 {
        bytes[12] = b;
        assert_eq!(wire::decode(&bytes), Err(DecodeError::RiceParameter(b)));
    }
}

#[test]
fn gaps_overflowing_n_are_rejected() {
    // Two gaps of 2^32 - 2 each: the second index is 2^33 - 3, far beyond any u32.
    let g = u64::from(u32::MAX) - 1;
    let bytes = craft_sparse(u32::MAX, DType::F32, 2, 31, &[g, g], &[0; 8]);
    match wire::decode(&bytes) {
        Err(DecodeError::IndexOutOfRange { position: 1, .. }) => {}
        other => panic!("{other:?}"),
    }
    // Gaps that fit individually but sum to exactly n.
    let bytes = craft_sparse(1000, DType::F32, 2, 8, &[500, 499], &[0; 8]);
    match wire::decode(&bytes) {
        Err(DecodeError::IndexOutOfRange {
            position: 1,
            index: 1000,
            n: 1000,
        }) => {}
        other => panic!("{other:?}"),
    }
    // One less fits.
    let bytes = craft_sparse(1000, DType::F32, 2, 8, &[500, 498], &[0; 8]);
    decode_hostile(&bytes);
    // A valid encoding whose n is lowered under its last index.
    let p = sparse(1000, DType::F32, vec![500, 900], vec![1.0, 2.0]);
    let (mut bytes, _) = encode(&p);
    bytes[4..8].copy_from_slice(&600u32.to_le_bytes());
    assert!(matches!(
        wire::decode(&bytes),
        Err(DecodeError::IndexOutOfRange { position: 1, .. })
    ));
    // An endless unary run (all ones) is cut off, whatever its length.
    for len in [1usize, 7, 100, 1 << 20] {
        let mut bytes = craft_sparse(1 << 20, DType::F32, 1, 0, &[], &vec![0xFF; len]);
        bytes.extend_from_slice(&[0; 4]);
        assert!(wire::decode(&bytes).is_err());
    }
}

#[test]
fn long_hostile_inputs_decode_quickly() {
    // 8 MiB of code bits for a claimed n = 2^32 - 1: linear work, no quadratic path.
    let t = std::time::Instant::now();
    for fill in [0x00u8, 0xFF, 0x55, 0xFE] {
        for b in [0u8, 1, 31] {
            let count = 1 << 20;
            let mut bytes = craft_sparse(u32::MAX, DType::BF16, count, b, &[], &[]);
            bytes.resize(bytes.len() + (8 << 20), fill);
            let _ = wire::decode(&bytes);
        }
    }
    assert!(t.elapsed().as_secs_f64() < 10.0, "{:?}", t.elapsed());
}

#[test]
fn only_the_encoders_rice_parameter_is_accepted() {
    // For each index set, the same gaps coded with every b in 0..=31: exactly the encoder's
    // choice decodes; every other b is rejected, so a payload has one encoding.
    let mut rng = Rng(99);
    let mut sets: Vec<(u32, Vec<u32>)> = vec![
        (10, vec![]),
        (10, vec![0]),
        (10, (0..10).collect()),
        (u32::MAX, vec![u32::MAX - 1]),
        (u32::MAX, vec![0, u32::MAX - 1]),
        (1 << 24, vec![1 << 23]),
    ];
    for &(n, k) in &[
        (1000u32, 10usize),
        (1 << 20, 1000),
        (1 << 24, 16),
        (100, 50),
        (64, 3),
    ] {
        for _ in 0..5 {
            sets.push((n, uniform_subset(n, k, &mut rng)));
        }
    }
    for (n, indices) in sets {
        let k = indices.len();
        let p = sparse_random(n, DType::F16, indices.clone(), &mut rng);
        let (good, _) = encode(&p);
        let tail = &good[good.len() - 2 * k..];
        let gaps = gaps_of(&indices);
        for b in 0..=31u8 {
            let code_bits: u64 = gaps.iter().map(|g| 1 + u64::from(b) + (g >> b)).sum();
            if code_bits > 1 << 24 {
                continue; // the decoder would see 2 MiB of ones; too slow to craft here
            }
            let bytes = craft_sparse(n, DType::F16, k as u32, b, &gaps, tail);
            if b == good[12] {
                assert_eq!(bytes, good);
                assert_identical(&wire::decode(&bytes).unwrap(), &p);
            } else {
                assert_eq!(
                    wire::decode(&bytes),
                    Err(DecodeError::RiceParameter(b)),
                    "n = {n}, k = {k}, b = {b} (encoder: {})",
                    good[12]
                );
            }
        }
    }
}

#[test]
fn padding_and_trailing_bytes_are_rejected() {
    // Non-zero padding after the index code.
    let p = sparse(
        1000,
        DType::F32,
        vec![1, 5, 9, 20],
        vec![1.0, 2.0, 3.0, 4.0],
    );
    let (bytes, bits) = encode(&p);
    assert_eq!((bytes[12], bits.indices, bits.padding), (2, 14, 2));
    let last_code = 13 + (bits.indices as usize).div_ceil(8) - 1;
    let mut bad = bytes.clone();
    bad[last_code] |= 0x80;
    assert_eq!(wire::decode(&bad), Err(DecodeError::Padding));
    // A spare zero byte before the values.
    let mut bad = bytes.clone();
    bad.insert(last_code + 1, 0);
    assert!(matches!(
        wire::decode(&bad),
        Err(DecodeError::Trailing { .. })
    ));
    // Sign payloads: bits beyond n and appended bytes.
    let p = sign_random(13, 1, &mut Rng(5));
    let (bytes, _) = encode(&p);
    let mut bad = bytes.clone();
    *bad.last_mut().unwrap() |= 0x80;
    assert_eq!(wire::decode(&bad), Err(DecodeError::Padding));
    let mut bad = bytes.clone();
    bad.push(0);
    assert_eq!(wire::decode(&bad), Err(DecodeError::Trailing { extra: 1 }));
}

#[test]
fn header_errors() {
    let p = sparse(1000, DType::BF16, vec![1, 5, 9], vec![1.0, 2.0, 3.0]);
    let (bytes, _) = encode(&p);
    let mut bad = bytes.clone();
    bad[0] = b'g';
    assert_eq!(wire::decode(&bad), Err(DecodeError::BadMagic));
    let mut bad = bytes.clone();
    bad[2] = 2;
    assert_eq!(wire::decode(&bad), Err(DecodeError::Version(2)));
    for kind in [0x00u8, 0x13, 0x1F, 0x21, 0x22, 0x31, 0x40, 0xF0] {
        let mut bad = bytes.clone();
        bad[3] = kind;
        assert_eq!(wire::decode(&bad), Err(DecodeError::Kind(kind)));
    }
    for len in 0..8 {
        assert!(matches!(
            wire::decode(&bytes[..len]),
            Err(DecodeError::Truncated { .. })
        ));
    }
    // Non-finite values and scales.
    let mut bad = bytes.clone();
    let at = bad.len() - 2;
    bad[at..].copy_from_slice(&bf16::NAN.to_le_bytes());
    assert_eq!(wire::decode(&bad), Err(DecodeError::NonFinite(2)));
    let (mut bad, _) = encode(&sign_random(10, 2, &mut Rng(1)));
    bad[16..20].copy_from_slice(&f32::INFINITY.to_le_bytes());
    assert_eq!(wire::decode(&bad), Err(DecodeError::NonFinite(1)));
}

use gradsift::bf16;

// ---------------------------------------------------------------------------------------
// Exhaustive mutations of a few small encodings.

fn small_payloads() -> Vec<Payload> {
    let mut rng = Rng(21);
    let mut v = vec![
        sparse(0, DType::F32, vec![], vec![]),
        sparse(1, DType::F16, vec![0], vec![-0.0]),
        sparse(2, DType::BF16, vec![0, 1], vec![1.0, -3.0]),
        sparse(u32::MAX, DType::F32, vec![0, u32::MAX - 1], vec![1.0, 2.0]),
        sign_random(0, 0, &mut rng),
        sign_random(13, 2, &mut rng),
        sign_random(70, 1, &mut rng),
        qsgd_random(0, 0, 1, &mut rng),
        qsgd_random(13, 2, 1, &mut rng),
        qsgd_random(70, 1, 7, &mut rng),
        qsgd_random(9, 3, 127, &mut rng),
        qsgd_random(33, 1, 8, &mut rng),
    ];
    for dtype in DTYPES {
        for &(n, k) in &[(50u32, 5usize), (1000, 20), (1 << 20, 8), (64, 64)] {
            let indices = uniform_subset(n, k, &mut rng);
            v.push(sparse_random(n, dtype, indices, &mut rng));
        }
    }
    v
}

#[test]
fn every_truncation_flip_insertion_and_deletion() {
    let mut accepted = 0usize;
    let mut tried = 0usize;
    for p in small_payloads() {
        let (bytes, _) = round_trip(&p);
        let mut check = |b: &[u8]| {
            tried += 1;
            accepted += usize::from(decode_hostile(b));
        };
        for len in 0..bytes.len() {
            check(&bytes[..len]);
        }
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            check(&b);
        }
        for at in 0..=bytes.len() {
            for x in [0x00u8, 0x01, 0x80, 0xFF] {
                let mut b = bytes.clone();
                b.insert(at, x);
                check(&b);
            }
            if at < bytes.len() {
                let mut b = bytes.clone();
                b.remove(at);
                check(&b);
            }
        }
        for extra in 1..=9 {
            let mut b = bytes.clone();
            b.extend(std::iter::repeat_n(0xA5, extra));
            check(&b);
        }
        // Every value of every header byte (magic, version, kind/dtype, n, count, b).
        let header_len = if matches!(p, Payload::Sparse(_)) {
            13
        } else {
            12
        };
        for at in 0..header_len.min(bytes.len()) {
            for x in 0..=255u8 {
                let mut b = bytes.clone();
                b[at] = x;
                check(&b);
            }
        }
        // n and count one up and one down.
        for at in [4usize, 8] {
            let v = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
            for w in [v.wrapping_add(1), v.wrapping_sub(1), 0, u32::MAX] {
                let mut b = bytes.clone();
                b[at..at + 4].copy_from_slice(&w.to_le_bytes());
                check(&b);
            }
        }
    }
    println!("mutations: {tried} tried, {accepted} accepted (all valid and canonical)");
}

// ---------------------------------------------------------------------------------------
// Property tests.

fn value_for(dtype: DType) -> impl Strategy<Value = f32> {
    prop_oneof![
        any::<u32>().prop_map(f32::from_bits),
        any::<i16>().prop_map(f32::from),
        prop::sample::select(vec![0.0f32, -0.0, 1.0, f32::MAX, f32::MIN_POSITIVE, 1e-40]),
    ]
    .prop_map(move |v| dtype.quantize(if v.is_finite() { v } else { 0.5 }))
}

fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop::sample::select(DTYPES.to_vec())
}

fn sparse_strategy(max_k: usize) -> impl Strategy<Value = Payload> {
    let n = prop_oneof![
        0u32..=70,
        1u32..=100_000,
        (u32::MAX - 70)..=u32::MAX,
        any::<u32>(),
    ];
    (n, dtype_strategy(), any::<bool>(), any::<bool>()).prop_flat_map(
        move |(n, dtype, dense, ends)| {
            let raw = prop::collection::vec(any::<u32>(), 0..=max_k);
            (
                raw,
                prop::collection::vec(value_for(dtype), max_k.max(70) + 2),
            )
                .prop_map(move |(raw, vals)| {
                    let mut indices: Vec<u32> = if n == 0 {
                        vec![]
                    } else if dense && n <= 70 {
                        (0..n).collect()
                    } else {
                        raw.iter().map(|&x| x % n).collect()
                    };
                    if ends && n > 0 {
                        indices.push(0);
                        indices.push(n - 1);
                    }
                    indices.sort_unstable();
                    indices.dedup();
                    let values = vals[..indices.len()].to_vec();
                    sparse(n, dtype, indices, values)
                })
        },
    )
}

fn sign_strategy() -> impl Strategy<Value = Payload> {
    (0u32..=700, 0usize..=6).prop_flat_map(|(n, groups)| {
        (
            prop::collection::vec(any::<u64>(), (n as usize).div_ceil(64)),
            prop::collection::vec(value_for(DType::F32), groups),
        )
            .prop_map(move |(mut negative, scales)| {
                if n % 64 != 0 {
                    *negative.last_mut().unwrap() &= (1u64 << (n % 64)) - 1;
                }
                Payload::Sign(SignPayload {
                    n,
                    scales,
                    negative,
                })
            })
    })
}

fn payload_strategy(max_k: usize) -> impl Strategy<Value = Payload> {
    prop_oneof![3 => sparse_strategy(max_k), 1 => sign_strategy()]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Vec<usize>),
    Truncate(usize),
    Append(Vec<u8>),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    SetByte(usize, u8),
    SetU32(usize, u32),
    AddU32(usize, i32),
}

fn mutation_strategy() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        prop::collection::vec(any::<usize>(), 1..4).prop_map(Mutation::Flip),
        any::<usize>().prop_map(Mutation::Truncate),
        prop::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..4))
            .prop_map(|(a, b)| Mutation::Insert(a, b)),
        (any::<usize>(), 1usize..4).prop_map(|(a, b)| Mutation::Delete(a, b)),
        (0usize..13, any::<u8>()).prop_map(|(a, b)| Mutation::SetByte(a, b)),
        (prop::sample::select(vec![4usize, 8]), any::<u32>())
            .prop_map(|(a, b)| Mutation::SetU32(a, b)),
        (prop::sample::select(vec![4usize, 8]), -3i32..=3)
            .prop_map(|(a, b)| Mutation::AddU32(a, b)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match m {
        Mutation::Flip(bits) => {
            for &bit in bits {
                let bit = bit % (8 * len);
                bytes[bit / 8] ^= 1 << (bit % 8);
            }
        }
        Mutation::Truncate(at) => bytes.truncate(at % len),
        Mutation::Append(extra) => bytes.extend_from_slice(extra),
        Mutation::Insert(at, x) => {
            let at = at % (len + 1);
            bytes.splice(at..at, x.iter().copied());
        }
        Mutation::Delete(at, count) => {
            let at = at % len;
            bytes.drain(at..(at + count).min(len));
        }
        Mutation::SetByte(at, x) => {
            if *at < len {
                bytes[*at] = *x;
            }
        }
        Mutation::SetU32(at, x) => {
            if at + 4 <= len {
                bytes[*at..at + 4].copy_from_slice(&x.to_le_bytes());
            }
        }
        Mutation::AddU32(at, d) => {
            if at + 4 <= len {
                let v = u32::from_le_bytes(bytes[*at..at + 4].try_into().unwrap());
                bytes[*at..at + 4].copy_from_slice(&v.wrapping_add_signed(*d).to_le_bytes());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    /// (a) Any valid payload round-trips bit for bit, with exact bit counts.
    #[test]
    fn prop_valid_payloads_round_trip(p in payload_strategy(300)) {
        round_trip(&p);
    }

    /// (b) Arbitrary bytes never panic; what decodes is valid and canonical.
    #[test]
    fn prop_random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        decode_hostile(&bytes);
    }

    /// (b') Arbitrary bodies behind a plausible header, so decoding gets past the checks.
    #[test]
    fn prop_random_bodies_never_panic(
        kind in prop::sample::select(vec![0x10u8, 0x11, 0x12, 0x20]),
        n in prop_oneof![0u32..200, any::<u32>()],
        count in prop_oneof![0u32..40, any::<u32>()],
        b in prop_oneof![0u8..12, any::<u8>()],
        body in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut bytes = vec![b'G', b'S', 1, kind];
        bytes.extend_from_slice(&n.to_le_bytes());
        bytes.extend_from_slice(&count.to_le_bytes());
        if kind != 0x20 {
            bytes.push(b);
        }
        bytes.extend_from_slice(&body);
        decode_hostile(&bytes);
    }

    /// (c) Mutated valid encodings never panic; what decodes is valid and canonical.
    #[test]
    fn prop_mutated_encodings_never_panic(
        p in payload_strategy(40),
        mutations in prop::collection::vec(mutation_strategy(), 1..4),
    ) {
        let (mut bytes, _) = encode(&p);
        for m in &mutations {
            if bytes.is_empty() {
                break;
            }
            mutate(&mut bytes, m);
        }
        decode_hostile(&bytes);
    }
}

/// `max_sparse_len` holds every message of `count` entries (uniform, clustered, evenly
/// spaced, all at either end, k = 0 and k = n) and stays close to a typical one: the size
/// of the fixed all-gather rows of the PyTorch hook.
#[test]
fn max_sparse_len_bounds_every_message_tightly() {
    let mut rng = Rng(0xB0D);
    for &(n, k) in &[
        (1u32, 0usize),
        (1, 1),
        (64, 64),
        (1000, 1),
        (1000, 10),
        (100_000, 1_000),
        (1 << 20, 10_486),
    ] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let bound = wire::max_sparse_len(n, k, dtype);
            let spread = (n as usize / k.max(1)).max(1) as u32;
            let layouts: Vec<Vec<u32>> = vec![
                uniform_subset(n, k, &mut rng),
                (0..k as u32).collect(),
                (n - k as u32..n).collect(),
                (0..k as u32).map(|i| i * spread).collect(),
                // clustered: a few runs of consecutive indices at random places
                {
                    let mut v: Vec<u32> = uniform_subset(n, k.div_ceil(8), &mut rng)
                        .into_iter()
                        .flat_map(|s| (s..(s + 8).min(n)).collect::<Vec<_>>())
                        .collect();
                    v.sort_unstable();
                    v.dedup();
                    v.truncate(k);
                    while v.len() < k {
                        // top up with the smallest free indices
                        let free = (0..n).find(|i| v.binary_search(i).is_err()).unwrap();
                        let at = v.binary_search(&free).unwrap_err();
                        v.insert(at, free);
                    }
                    v
                },
            ];
            for idx in layouts {
                assert_eq!(idx.len(), k);
                let (bytes, _) = round_trip(&sparse_random(n, dtype, idx, &mut rng));
                assert!(
                    bytes.len() <= bound,
                    "n = {n}, k = {k}, {dtype:?}: {} > {bound}",
                    bytes.len()
                );
            }
        }
    }
    // Tight where it matters: 1% of 2^20 with f32 values.
    let (n, k) = (1u32 << 20, 10_486);
    let (typical, _) = round_trip(&sparse_random(
        n,
        DType::F32,
        uniform_subset(n, k, &mut rng),
        &mut rng,
    ));
    let bound = wire::max_sparse_len(n, k, DType::F32);
    println!(
        "max_sparse_len: {bound} bytes against a typical {} ({:+.2}%)",
        typical.len(),
        100.0 * (bound as f64 / typical.len() as f64 - 1.0)
    );
    assert!(
        bound as f64 <= 1.02 * typical.len() as f64,
        "bound {bound} vs typical {}",
        typical.len()
    );
    // Sign payloads have one size.
    let p = sign_random(1000, 3, &mut rng);
    assert_eq!(round_trip(&p).0.len(), wire::max_sign_len(1000, 3));
}

/// `wire::max_len` holds what every method's plan sends (the slot the DDP hook reserves),
/// exactly for the fixed-size kinds.
#[test]
fn max_len_holds_every_methods_payload() {
    use gradsift::{Compress, Config, Layout, Mode, cpu};
    let layout = Layout::new(&[500, 0, 37, 1200]).unwrap();
    let n = layout.n();
    let grad: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 - 500.0).collect();
    for mode in [Mode::Global, Mode::PerLayer] {
        for mut cfg in [
            Config::topk(0.05),
            Config::rtopk(0.2, 0.05),
            Config::randomk(0.1),
            Config::sign(),
            Config::qsgd(1),
            Config::qsgd(100),
        ] {
            cfg.mode = mode;
            let groups = cfg.plan_groups(&layout).unwrap();
            let bound = wire::max_len(n as u32, &groups, &cfg);
            let mut plan = cpu::Compressor::new(&layout, &cfg).unwrap();
            let (bytes, _) = round_trip(plan.step(&grad, 0).unwrap());
            if cfg.is_sparse() {
                assert!(bytes.len() <= bound, "{cfg:?}: {} > {bound}", bytes.len());
            } else {
                assert_eq!(bytes.len(), bound, "{cfg:?}");
            }
        }
    }
}

#[test]
fn qsgd_round_trips_and_rejects_what_is_not_canonical() {
    let mut rng = Rng(5);
    for &(n, g, l) in &[(1u32, 1usize, 1u8), (64, 2, 7), (1000, 3, 127), (17, 1, 2)] {
        round_trip(&qsgd_random(n, g, l, &mut rng));
    }
    // levels 3: 3 bits per code (2 level bits, then the sign). Codes [1, -3, 0].
    let p = Payload::Qsgd(QsgdPayload {
        n: 3,
        levels: 3,
        scales: vec![2.0],
        codes: vec![1, -3, 0],
    });
    let (bytes, _) = round_trip(&p);
    let codes_at = 13 + 4;
    // 0b001 | 0b111 << 3 | 0b000 << 6, in 9 bits: one full byte, one padding byte.
    assert_eq!(&bytes[codes_at..], &[0b0011_1001, 0]);
    let decode = |b: &[u8]| wire::decode(b).unwrap_err();
    // Third code = bits 6..9: level bits 6, 7, sign bit 8 (the second byte's bit 0).
    let mut sign_of_zero = bytes.clone();
    sign_of_zero[codes_at + 1] |= 1;
    assert!(matches!(
        decode(&sign_of_zero),
        DecodeError::Code { index: 2 }
    ));
    // Level bits 0b11 with levels 2 are out of range.
    let mut over = bytes.clone();
    over[HEADER_LEVELS_AT] = 2;
    assert!(matches!(decode(&over), DecodeError::Code { index: 1 }));
    let mut zero_levels = bytes.clone();
    zero_levels[HEADER_LEVELS_AT] = 0;
    assert!(matches!(decode(&zero_levels), DecodeError::Levels(0)));
    let mut padding = bytes.clone();
    padding[codes_at + 1] |= 0b10;
    assert!(matches!(decode(&padding), DecodeError::Padding));
    let mut negative = bytes.clone();
    negative[13..17].copy_from_slice(&(-2.0f32).to_le_bytes());
    assert!(matches!(decode(&negative), DecodeError::NegativeScale(0)));
    assert!(matches!(
        decode(&bytes[..bytes.len() - 1]),
        DecodeError::Truncated { .. }
    ));
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(matches!(
        decode(&trailing),
        DecodeError::Trailing { extra: 1 }
    ));
    // The encoder refuses a code beyond the levels.
    let mut out = Vec::new();
    let beyond = Payload::Qsgd(QsgdPayload {
        n: 1,
        levels: 3,
        scales: vec![1.0],
        codes: vec![4],
    });
    assert!(matches!(
        wire::encode(&beyond, &mut out),
        Err(Error::Encode(_))
    ));
}

/// Offset of the QSGD levels byte: the 8-byte header, then the u32 group count.
const HEADER_LEVELS_AT: usize = 12;
