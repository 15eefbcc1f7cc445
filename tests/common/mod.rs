//! Shared pieces of the SPEC-conformance suite: a small deterministic PRNG, and naive
//! reference implementations written from docs/SPEC.md alone (full sorts, plain loops). Nothing
//! here calls gradsift's selection, compression or statistics code; the only gradsift items
//! used are the data types and `philox4x32_10`, whose known answers the suite checks first.

#![allow(dead_code, clippy::single_range_in_vec_init)]

use gradsift::philox::philox4x32_10;
use gradsift::{Config, Count, DType, Method, Mode, Payload, Scale, bf16, f16};
use std::cmp::Reverse;
use std::ops::Range;

// ---------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------

/// SplitMix64: tiny, deterministic forever (unlike a library RNG whose algorithm may change).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_F42D_4C95_7F2D)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal by Box–Muller.
    pub fn gauss(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// Kinds of test vectors: continuous values, and the tie-heavy shapes the SPEC's tie rules
/// are about.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Data {
    /// Gaussian, distinct magnitudes (almost surely).
    Gauss,
    /// Every element equal.
    AllEqual,
    /// `+c, -c, +c, ...`: equal magnitudes, different signs.
    AlternatingSign,
    /// A handful of magnitudes (with random signs), including +-0 and subnormals: many ties.
    FewLevels,
    /// Mostly zeros of both signs, a few subnormals and a few normals.
    MostlyZero,
    /// Gaussian rounded to multiples of 1/20: tie classes of a few dozen to a few hundred
    /// elements around any cut.
    Quantized,
    /// A plateau of equal magnitudes (random signs) with a few larger values near the end:
    /// a scan in index order meets the big tie class long before the values that matter.
    Plateau,
}

pub const ALL_DATA: [Data; 7] = [
    Data::Gauss,
    Data::AllEqual,
    Data::AlternatingSign,
    Data::FewLevels,
    Data::MostlyZero,
    Data::Quantized,
    Data::Plateau,
];

pub fn make_data(kind: Data, n: usize, rng: &mut Rng) -> Vec<f32> {
    let levels = [
        0.0f32,
        f32::from_bits(1),
        f32::from_bits(0x0040_0000),
        f32::MIN_POSITIVE,
        0.5,
        1.0,
        3.25,
    ];
    (0..n)
        .map(|i| match kind {
            Data::Gauss => rng.gauss() as f32,
            Data::AllEqual => 0.75,
            Data::AlternatingSign => {
                if i % 2 == 0 {
                    1.5
                } else {
                    -1.5
                }
            }
            Data::FewLevels => {
                let v = levels[rng.below(levels.len() as u64) as usize];
                if rng.next_u32() & 1 == 1 { -v } else { v }
            }
            Data::MostlyZero => {
                let c = rng.below(100);
                let v = if c < 90 {
                    0.0
                } else if c < 95 {
                    f32::from_bits(1 + rng.below(0x7F_FFFF) as u32)
                } else {
                    rng.gauss() as f32
                };
                if rng.next_u32() & 1 == 1 { -v } else { v }
            }
            Data::Quantized => ((rng.gauss() * 20.0).round() / 20.0) as f32,
            Data::Plateau => {
                let v = if i >= n - n / 50 && rng.below(10) == 0 {
                    2.0 + rng.below(4) as f32
                } else {
                    1.0
                };
                if rng.next_u32() & 1 == 1 { -v } else { v }
            }
        })
        .collect()
}

pub fn to_f16(x: &[f32]) -> Vec<f16> {
    x.iter().map(|&v| f16::from_f32(v)).collect()
}

pub fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

pub fn widen_f16(x: &[f16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

pub fn widen_bf16(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// Bits of a slice, for bit-exact comparisons that treat NaN payloads and signed zeros exactly.
pub fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

pub fn assert_bits_eq(got: &[f32], want: &[f32], ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{ctx}: first difference at {i}: got {:e} ({:#010x}), want {:e} ({:#010x})",
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

/// Layer offsets computed here (not by `Layout`).
pub fn offsets(sizes: &[usize]) -> Vec<usize> {
    let mut o = vec![0];
    for &s in sizes {
        o.push(o.last().unwrap() + s);
    }
    o
}

// ---------------------------------------------------------------------------------------
// SPEC §1-4 reference selection
// ---------------------------------------------------------------------------------------

/// SPEC §1: IEEE bits of `|x|` as f32, sign cleared.
pub fn mag(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

/// SPEC §2 over the coordinates `range` of `x`: sort by (magnitude bits descending, index
/// ascending), keep `min(r, len)`, report ascending (global) indices.
pub fn ref_top_r_range(x: &[f32], range: Range<usize>, r: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (range.start as u32..range.end as u32).collect();
    idx.sort_unstable_by_key(|&i| (Reverse(mag(x[i as usize])), i));
    idx.truncate(r);
    idx.sort();
    idx
}

pub fn ref_top_r(x: &[f32], r: usize) -> Vec<u32> {
    ref_top_r_range(x, 0..x.len(), r)
}

/// Full magnitude order of `x` (SPEC §1), for taking many prefixes of one sort.
pub fn ref_order(x: &[f32]) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..x.len() as u32).collect();
    idx.sort_unstable_by_key(|&i| (Reverse(mag(x[i as usize])), i));
    idx
}

/// SPEC §3: `key_i = philox4x32_10([i, w, t_lo, t_hi], [s_lo, s_hi])[0]`.
pub fn ref_key(i: u32, w: u32, t: u64, s: u64) -> u32 {
    philox4x32_10(
        [i, w, t as u32, (t >> 32) as u32],
        [s as u32, (s >> 32) as u32],
    )[0]
}

/// SPEC §3: the `min(k, |C|)` candidates with the smallest `(key_i, i)`, ascending.
pub fn ref_random_k(cands: &[u32], k: usize, w: u32, t: u64, s: u64) -> Vec<u32> {
    let mut v: Vec<(u32, u32)> = cands.iter().map(|&i| (ref_key(i, w, t, s), i)).collect();
    v.sort_unstable();
    v.truncate(k);
    let mut out: Vec<u32> = v.into_iter().map(|p| p.1).collect();
    out.sort();
    out
}

/// SPEC §4.
pub fn ref_rtopk(x: &[f32], r: usize, k: usize, w: u32, t: u64, s: u64) -> Vec<u32> {
    ref_random_k(&ref_top_r(x, r), k, w, t, s)
}

/// A value as the receiver sees it after travelling in `dt` (round to nearest even). The
/// suite keeps values inside the formats' ranges where it uses this.
pub fn ref_quantize(dt: DType, v: f32) -> f32 {
    let q = match dt {
        DType::F32 => v,
        DType::F16 => f16::from_f32(v).to_f32(),
        DType::BF16 => bf16::from_f32(v).to_f32(),
    };
    assert!(
        q.is_finite() || !v.is_finite(),
        "test data overflowed {dt:?}: {v}"
    );
    q
}

/// Whether `v` is exactly representable in `dt`.
pub fn representable(dt: DType, v: f32) -> bool {
    let q = match dt {
        DType::F32 => v,
        DType::F16 => f16::from_f32(v).to_f32(),
        DType::BF16 => bf16::from_f32(v).to_f32(),
    };
    q.to_bits() == v.to_bits()
}

// ---------------------------------------------------------------------------------------
// SPEC §2, §4-6 reference error-feedback compressor
// ---------------------------------------------------------------------------------------

/// SPEC §2: `min(n, ceil(rho * n))` in f64, or an explicit count clamped to `n`.
pub fn ref_count(c: Count, n: usize) -> usize {
    match c {
        Count::Ratio(rho) => ((rho * n as f64).ceil() as usize).min(n),
        Count::Exact(c) => c.min(n as u64) as usize,
    }
}

#[derive(Debug, Clone)]
pub struct RefGroup {
    pub range: Range<usize>,
    pub r: usize,
    pub k: usize,
    pub scale: f32,
}

pub fn ref_groups(cfg: &Config, sizes: &[usize]) -> Vec<RefGroup> {
    let off = offsets(sizes);
    let n = *off.last().unwrap();
    let ranges: Vec<Range<usize>> = match cfg.mode {
        Mode::Global => vec![0..n],
        Mode::PerLayer => (0..sizes.len()).map(|l| off[l]..off[l + 1]).collect(),
    };
    ranges
        .into_iter()
        .map(|range| {
            let n = range.len();
            let (r, k) = match cfg.method {
                Method::RTopK { r, k } => {
                    let r = ref_count(r, n);
                    (r, ref_count(k, n).min(r))
                }
                Method::TopK { k } => (ref_count(k, n), ref_count(k, n)),
                Method::RandomK { k } => (n, ref_count(k, n)),
                Method::Sign | Method::Qsgd { .. } => (n, n),
            };
            let scale = if cfg.scale == Scale::Unbiased && k > 0 {
                r as f32 / k as f32
            } else {
                1.0
            };
            RefGroup { range, r, k, scale }
        })
        .collect()
}

/// The naive worker state of SPEC §5.
pub struct RefEf {
    pub cfg: Config,
    pub groups: Vec<RefGroup>,
    pub n: usize,
    pub e: Vec<f32>,
    pub u: Vec<f32>,
}

#[derive(Debug)]
pub enum RefOut {
    Sparse {
        indices: Vec<u32>,
        values: Vec<f32>,
    },
    /// The accumulated vector `p`; the scale check and the residual are done by the caller,
    /// because SPEC §11 allows a reduction to differ in its last bit.
    Sign {
        p: Vec<f32>,
    },
}

impl RefEf {
    pub fn new(cfg: &Config, sizes: &[usize]) -> Self {
        let n = sizes.iter().sum();
        Self {
            cfg: cfg.clone(),
            groups: ref_groups(cfg, sizes),
            n,
            e: vec![0.0; n],
            u: vec![0.0; n],
        }
    }

    /// `p` (and the next `u`) from the current state, without committing.
    pub fn accumulate(&self, g: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let m = self.cfg.momentum;
        if m > 0.0 {
            let u: Vec<f32> = (0..self.n).map(|i| m * self.u[i] + g[i]).collect();
            let p = (0..self.n).map(|i| self.e[i] + u[i]).collect();
            (p, u)
        } else {
            (
                (0..self.n).map(|i| self.e[i] + g[i]).collect(),
                self.u.clone(),
            )
        }
    }

    /// One step. `Err((count, first_index))` when `p` is not finite, or else when a sent
    /// value is not finite (only `Scale::Unbiased` can overflow it, SPEC §5); the state is
    /// then untouched.
    pub fn step(&mut self, g: &[f32], t: u64) -> Result<RefOut, (u64, u32)> {
        let (p, u) = self.accumulate(g);
        let bad: Vec<usize> = (0..self.n).filter(|&i| !p[i].is_finite()).collect();
        if !bad.is_empty() {
            return Err((bad.len() as u64, bad[0] as u32));
        }
        let m = self.cfg.momentum;
        match self.cfg.method {
            Method::Sign => {
                self.u = u;
                self.e = p.clone();
                Ok(RefOut::Sign { p })
            }
            _ => {
                let (w, s) = (self.cfg.worker, self.cfg.seed);
                let mut indices = Vec::new();
                let mut values = Vec::new();
                let mut e = p.clone();
                let mut u = u;
                for g in &self.groups {
                    // (Shortcuts that change nothing: no sort when nothing is sent or when
                    // every element is a candidate.)
                    let top: Vec<u32> = if g.k == 0 {
                        Vec::new()
                    } else if g.r >= g.range.len() {
                        (g.range.start as u32..g.range.end as u32).collect()
                    } else {
                        ref_top_r_range(&p, g.range.clone(), g.r)
                    };
                    let sel = ref_random_k(&top, g.k, w, t, s);
                    for &i in &sel {
                        let i = i as usize;
                        let v = ref_quantize(self.cfg.values, p[i] * g.scale);
                        values.push(v);
                        e[i] = p[i] - v;
                        if m > 0.0 {
                            u[i] = 0.0;
                        }
                    }
                    indices.extend(sel);
                }
                let bad: Vec<u32> = indices
                    .iter()
                    .zip(&values)
                    .filter(|(_, v)| !v.is_finite())
                    .map(|(&i, _)| i)
                    .collect();
                if !bad.is_empty() {
                    return Err((bad.len() as u64, bad[0]));
                }
                self.e = e;
                self.u = u;
                Ok(RefOut::Sparse { indices, values })
            }
        }
    }

    /// SPEC §6 scales from `p`, f64 accumulation (the tests allow 1 ulp against these).
    pub fn sign_scales(&self, p: &[f32]) -> Vec<f32> {
        self.groups
            .iter()
            .map(|g| {
                if g.range.is_empty() {
                    0.0
                } else {
                    let s: f64 = p[g.range.clone()].iter().map(|x| f64::from(x.abs())).sum();
                    (s / g.range.len() as f64) as f32
                }
            })
            .collect()
    }
}

/// Distance in units in the last place between two finite f32 of the same sign.
pub fn ulps(a: f32, b: f32) -> u32 {
    if a == b {
        return 0;
    }
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

/// Compares one compressor step against the reference, and brings the reference's residual
/// in line for sign payloads (whose scale may differ by 1 ulp, SPEC §11).
pub fn check_payload_against_ref(
    payload: &Payload,
    out: RefOut,
    re: &mut RefEf,
    residual: &[f32],
    momentum: &[f32],
    ctx: &str,
) {
    assert_eq!(payload.n() as usize, re.n, "{ctx}: payload n");
    match (payload, out) {
        (Payload::Sparse(sp), RefOut::Sparse { indices, values }) => {
            assert_eq!(sp.values_dtype, re.cfg.values, "{ctx}: values dtype");
            assert_eq!(sp.indices, indices, "{ctx}: sent indices");
            assert_bits_eq(&sp.values, &values, &format!("{ctx}: sent values"));
        }
        (Payload::Sign(sg), RefOut::Sign { p }) => {
            let want = re.sign_scales(&p);
            assert_eq!(sg.scales.len(), want.len(), "{ctx}: one scale per group");
            for (j, (&a, &b)) in sg.scales.iter().zip(&want).enumerate() {
                assert!(ulps(a, b) <= 1, "{ctx}: scale {j}: got {a:e}, want {b:e}");
            }
            assert_eq!(sg.negative.len(), re.n.div_ceil(64), "{ctx}: sign words");
            for (gi, g) in re.groups.iter().enumerate() {
                let s = sg.scales[gi];
                for i in g.range.clone() {
                    let neg = p[i] < 0.0; // sign(0) = +1, for -0.0 too
                    assert_eq!(
                        sg.is_negative(i),
                        neg,
                        "{ctx}: sign of {i} (p = {:e})",
                        p[i]
                    );
                    let d = if neg { -s } else { s };
                    re.e[i] = p[i] - d;
                }
            }
            if re.n % 64 != 0 {
                assert_eq!(
                    sg.negative.last().unwrap() >> (re.n % 64),
                    0,
                    "{ctx}: bits beyond n"
                );
            }
            if re.cfg.momentum > 0.0 {
                re.u.iter_mut().for_each(|u| *u = 0.0);
            }
        }
        (p, o) => panic!("{ctx}: payload kind {p:?} vs reference {o:?}"),
    }
    assert_bits_eq(residual, &re.e, &format!("{ctx}: residual"));
    if re.cfg.momentum > 0.0 {
        assert_bits_eq(momentum, &re.u, &format!("{ctx}: momentum"));
    }
}

/// SPEC §8/§11: a GPU backend's per-layer statistics against the CPU reference — counts and
/// extremes exact, mean within `1e-5 (|mean| + sd)`, variance within `1e-4 var`; both NaN
/// when the layer has no finite element.
pub fn assert_stats_close(want: &gradsift::LayerStats, got: &gradsift::LayerStats, what: &str) {
    assert_eq!(
        (want.count, want.non_finite),
        (got.count, got.non_finite),
        "{what}: counts"
    );
    assert_eq!(
        (want.min, want.max, want.max_abs),
        (got.min, got.max, got.max_abs),
        "{what}: extremes"
    );
    if want.count == want.non_finite {
        // No finite element (an empty layer included): mean and variance are NaN (SPEC §8).
        assert!(
            want.mean.is_nan() && want.var.is_nan() && got.mean.is_nan() && got.var.is_nan(),
            "{what}: no finite element, want NaN moments: {want:?} vs {got:?}"
        );
        return;
    }
    let sd = want.var.sqrt();
    assert!(
        (want.mean - got.mean).abs() <= 1e-5 * (want.mean.abs() + sd),
        "{what}: mean {} vs {}",
        want.mean,
        got.mean
    );
    assert!(
        (want.var - got.var).abs() <= 1e-4 * want.var,
        "{what}: var {} vs {}",
        want.var,
        got.var
    );
}

/// Whether `mpirun` runs on this machine. Without it: a panic under
/// `GRADSIFT_REQUIRE_MPI=1` (CI must not skip), otherwise `SKIPPED: <what>` and `false`.
pub fn mpirun_found(what: &str) -> bool {
    let found = std::process::Command::new("mpirun")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("GRADSIFT_REQUIRE_MPI").as_deref() != Ok("1"),
            "mpirun not found and GRADSIFT_REQUIRE_MPI=1"
        );
        eprintln!("SKIPPED: {what}: mpirun not found (scripts/test.sh installs openmpi-bin)");
    }
    found
}
