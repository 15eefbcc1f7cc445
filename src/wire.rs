//! The wire format: compact, exactly counted, and safe to decode from hostile bytes.
//!
//! Every message starts with an 8-byte header: magic `b"GS"`, version `1`, a byte holding
//! the kind (high nibble: 1 sparse, 2 sign, 3 QSGD) and the value format (low nibble: 0 f32,
//! 1 f16, 2 bf16), then `n` as u32 little-endian.
//!
//! **Sparse** (`kind = 1`): `count` (u32 LE), the Rice parameter `b` (one byte), the
//! Golomb-Rice code of the index gaps (`gap_0 = i_0`, `gap_j = i_j - i_{j-1} - 1`: the
//! quotient `gap >> b` in unary as ones closed by a zero, then the `b` low bits; bits are
//! filled least significant first), zero bits up to the next byte, then `count` values
//! little-endian in the value format. The encoder picks the `b` that minimises the exact
//! length, so indices cost within a few hundredths of a bit of the entropy of a geometric
//! gap source: about `log2(C(n,k))/k` bits each.
//!
//! **Sign** (`kind = 2`, value format 0): the group count `G` (u32 LE), `G` f32 scales, then
//! `n` sign bits (set = negative), least significant first, zero-padded to a byte.
//!
//! **QSGD** (`kind = 3`, value format 0): the group count `G` (u32 LE), the levels `s` (one
//! byte, `1..=127`), `G` f32 scales, then `n` codes of `b = 1 + ceil(log2(s + 1))` bits
//! each, least significant first: the level `|q|` in the low `b - 1` bits, then a sign bit
//! (set = negative, never set with level 0), zero-padded to a byte (SPEC §13).
//!
//! The decoder checks every length against the bytes it has before it reserves or writes
//! anything, so truncated, oversized or corrupt input is a [`DecodeError`], never a panic.

use crate::codec::qsgd;
use crate::{DType, Error, Payload, QsgdPayload, Result, SignPayload, SparsePayload, bf16, f16};

const MAGIC: [u8; 2] = *b"GS";
const VERSION: u8 = 1;
const KIND_SPARSE: u8 = 1;
const KIND_SIGN: u8 = 2;
const KIND_QSGD: u8 = 3;
const HEADER: usize = 8;
const SPARSE_HEADER: usize = HEADER + 5;
const SIGN_HEADER: usize = HEADER + 4;
const QSGD_HEADER: usize = HEADER + 5;

/// Why a byte string is not a valid payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than the header or the counts it declares need.
    #[error("truncated: {needed} bytes needed, {got} present")]
    Truncated {
        /// Bytes the header implies (at least).
        needed: usize,
        /// Bytes given.
        got: usize,
    },
    /// More bytes than the header declares.
    #[error("{extra} trailing byte(s) after the payload")]
    Trailing {
        /// Bytes beyond the end of the message.
        extra: usize,
    },
    /// The first two bytes are not `b"GS"`.
    #[error("bad magic: not a gradsift payload")]
    BadMagic,
    /// A version this build does not read.
    #[error("unsupported version {0}")]
    Version(u8),
    /// Unknown kind or value format.
    #[error("unknown kind/format byte {0:#04x}")]
    Kind(u8),
    /// Rice parameter above 31, or not the one the encoder picks for the decoded indices
    /// (the first that minimises the code length: the encoding is canonical).
    #[error("Rice parameter {0} out of range or not canonical")]
    RiceParameter(u8),
    /// More entries declared than the buffer has elements.
    #[error("{count} entries declared for n = {n}")]
    Count {
        /// Declared entries.
        count: u64,
        /// Buffer length.
        n: u32,
    },
    /// A decoded index is not below `n`.
    #[error("index {index} at position {position} is out of range (n = {n})")]
    IndexOutOfRange {
        /// Position in the payload.
        position: usize,
        /// The decoded index (may exceed u32 when the gap overflows).
        index: u64,
        /// Buffer length.
        n: u32,
    },
    /// A NaN or infinite value or scale.
    #[error("non-finite value at position {0}")]
    NonFinite(usize),
    /// Padding bits that must be zero are not (the encoding is canonical).
    #[error("non-zero padding bits")]
    Padding,
    /// A QSGD message with levels outside `1..=127`.
    #[error("{0} quantisation levels, expected 1..=127")]
    Levels(u8),
    /// A QSGD scale below zero (a `max |p|` never is).
    #[error("negative scale at position {0}")]
    NegativeScale(usize),
    /// A QSGD code whose level exceeds the levels, or a level 0 with the sign bit set (the
    /// encoding is canonical).
    #[error("QSGD code of element {index} is out of range or not canonical")]
    Code {
        /// The element.
        index: u32,
    },
}

/// Exact size of an encoded message, in bits. `total()` is `8 * bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bits {
    /// Fixed header (and, for sign payloads, the group scales).
    pub header: u64,
    /// Index code (sparse) or sign bits (sign); 0 for QSGD.
    pub indices: u64,
    /// Values (sparse) or the per-element codes (QSGD).
    pub values: u64,
    /// Zero bits that align sections to bytes.
    pub padding: u64,
}

impl Bits {
    /// All bits of the message, `8 *` its byte length.
    pub fn total(&self) -> u64 {
        self.header + self.indices + self.values + self.padding
    }
}

/// `log2(C(n, k))`: the bits any code needs on average for a uniformly random `k`-subset of
/// `0..n` (the entropy the Rice code is measured against).
/// Returns 0 for `k > n`.
pub fn log2_binomial(n: u64, k: u64) -> f64 {
    if k > n {
        return 0.0;
    }
    let k = k.min(n - k);
    (0..k)
        .map(|j| ((n - j) as f64 / (j + 1) as f64).log2())
        .sum()
}

struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    acc: u64,
    fill: u32,
}

impl<'a> BitWriter<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        Self {
            out,
            acc: 0,
            fill: 0,
        }
    }

    /// Appends the low `len <= 32` bits of `v`.
    #[inline]
    fn put(&mut self, v: u64, len: u32) {
        self.acc |= v << self.fill;
        self.fill += len;
        while self.fill >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.fill -= 8;
        }
    }

    #[inline]
    fn ones(&mut self, mut q: u64) {
        while q >= 32 {
            self.put(0xFFFF_FFFF, 32);
            q -= 32;
        }
        self.put((1u64 << q) - 1, q as u32);
    }

    /// Pads to a byte; returns the number of padding bits.
    fn finish(mut self) -> u64 {
        let pad = (8 - self.fill % 8) % 8;
        if self.fill > 0 {
            self.put(0, pad);
        }
        u64::from(pad)
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    /// Position in bits.
    pos: usize,
}

impl BitReader<'_> {
    /// Bits left to read.
    #[inline(always)]
    fn left(&self) -> usize {
        self.bytes.len() * 8 - self.pos
    }

    /// The next bits as a word, least significant first: at least `min(57, left())` of them
    /// are real, the rest are zero.
    #[inline(always)]
    fn window(&self) -> u64 {
        let at = self.pos / 8;
        let word = match self.bytes.get(at..at + 8) {
            Some(s) => u64::from_le_bytes(s.try_into().unwrap()),
            None => {
                let rest = self.bytes.get(at..).unwrap_or(&[]);
                let mut w = [0u8; 8];
                w[..rest.len()].copy_from_slice(rest);
                u64::from_le_bytes(w)
            }
        };
        word >> (self.pos % 8)
    }

    /// Counts ones up to the closing zero, giving up once the count exceeds `limit`.
    #[inline(always)]
    fn unary(&mut self, limit: u64) -> Option<Result<u64, ()>> {
        let mut q = 0u64;
        loop {
            let valid = self.left().min(64 - self.pos % 8);
            if valid == 0 {
                return None;
            }
            let run = (self.window().trailing_ones() as usize).min(valid);
            q += run as u64;
            self.pos += run;
            if q > limit {
                return Some(Err(()));
            }
            if run < valid {
                self.pos += 1;
                return Some(Ok(q));
            }
        }
    }

    /// The next `len <= 32` bits.
    #[inline(always)]
    fn bits(&mut self, len: u32) -> Option<u64> {
        if self.left() < len as usize {
            return None;
        }
        let v = self.window() & ((1u64 << len) - 1);
        self.pos += len as usize;
        Some(v)
    }
}

/// The Rice parameter that makes the gap code shortest, and that length in bits.
fn best_rice(indices: &[u32]) -> (u32, u64) {
    let k = indices.len() as u64;
    let mut sums = [0u64; 32];
    let mut prev: i64 = -1;
    for &i in indices {
        let gap = (i64::from(i) - prev - 1) as u64;
        prev = i64::from(i);
        for (b, s) in sums.iter_mut().enumerate() {
            *s += gap >> b;
        }
    }
    (0..32u32)
        .map(|b| (b, k * (1 + u64::from(b)) + sums[b as usize]))
        .min_by_key(|&(_, len)| len)
        .unwrap()
}

fn header(out: &mut Vec<u8>, kind: u8, dtype: DType, n: u32) {
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push((kind << 4) | dtype.code());
    out.extend_from_slice(&n.to_le_bytes());
}

/// The largest encoded length, in bytes, of a sparse payload of `count` entries out of `n`
/// with values in `values`: what a fixed-size message slot (an all-gather row) must hold.
///
/// Tight, not a worst case of the code: whatever the indices, the gaps add up to at most
/// `n - count`, so with Rice parameter `b` the quotients add up to at most
/// `(n - count) >> b` and the code is at most `count * (1 + b) + ((n - count) >> b)` bits;
/// the encoder's canonical `b` is never longer than the best `b` of that bound. At 1% of a
/// million indices the bound is within 2% of the typical message.
///
/// # Errors
/// None; a `count` above `n` is clamped to `n`.
///
/// # Examples
/// ```
/// use gradsift::{DType, Payload, SparsePayload, wire};
/// let p = Payload::Sparse(SparsePayload {
///     n: 1000,
///     values_dtype: DType::F32,
///     indices: (0..10).map(|i| 100 * i + 7).collect(),
///     values: vec![1.0; 10],
/// });
/// let mut out = Vec::new();
/// wire::encode(&p, &mut out)?;
/// assert!(out.len() <= wire::max_sparse_len(1000, 10, DType::F32));
/// # Ok::<(), gradsift::Error>(())
/// ```
pub fn max_sparse_len(n: u32, count: usize, values: DType) -> usize {
    let k = (count as u64).min(u64::from(n));
    let rest = u64::from(n) - k;
    let bits = (0..32u32)
        .map(|b| k * (1 + u64::from(b)) + (rest >> b))
        .min()
        .unwrap_or(0);
    SPARSE_HEADER + bits.div_ceil(8) as usize + k as usize * (values.bits() as usize / 8)
}

/// The encoded length, in bytes, of every sign payload over `n` elements with `groups`
/// scales (it does not depend on the signs).
///
/// # Errors
/// None: plain arithmetic.
///
/// # Examples
/// ```
/// assert_eq!(gradsift::wire::max_sign_len(64, 1), 12 + 4 + 8);
/// ```
pub fn max_sign_len(n: u32, groups: usize) -> usize {
    SIGN_HEADER + 4 * groups + (n as usize).div_ceil(8)
}

/// The exact length of the QSGD message of `n` elements in `groups` groups at `levels`
/// levels (SPEC §13): the same for every such payload.
///
/// # Examples
/// ```
/// // 13 header bytes, one scale, 64 codes of 4 bits.
/// assert_eq!(gradsift::wire::qsgd_len(64, 1, 7), 13 + 4 + 32);
/// ```
pub fn qsgd_len(n: u32, groups: usize, levels: u8) -> usize {
    let code_bytes = (u64::from(n) * u64::from(qsgd::code_bits(levels))).div_ceil(8);
    QSGD_HEADER + 4 * groups + code_bytes as usize
}

/// The most bytes [`encode`] writes for a payload of `config`'s plan over `n` elements in
/// `groups` (what [`crate::Config::plan_groups`] returns): the fixed message slot of a
/// transport that reserves room once. Sparse methods: [`max_sparse_len`] of the sum of the
/// groups' `k`; sign: [`max_sign_len`]; QSGD: [`qsgd_len`].
///
/// # Errors
/// None: plain arithmetic.
///
/// # Examples
/// ```
/// use gradsift::{Config, Layout, wire};
/// let layout = Layout::new(&[100, 28])?;
/// let cfg = Config::qsgd(7);
/// let groups = cfg.plan_groups(&layout)?;
/// assert_eq!(wire::max_len(128, &groups, &cfg), wire::qsgd_len(128, 1, 7));
/// # Ok::<(), gradsift::Error>(())
/// ```
pub fn max_len(n: u32, groups: &[crate::Group], config: &crate::Config) -> usize {
    match config.method {
        crate::Method::Sign => max_sign_len(n, groups.len()),
        crate::Method::Qsgd { levels, .. } => qsgd_len(n, groups.len(), levels),
        crate::Method::TopK { .. }
        | crate::Method::RandomK { .. }
        | crate::Method::RTopK { .. } => {
            max_sparse_len(n, groups.iter().map(|g| g.k).sum(), config.values)
        }
    }
}

/// Encodes `p` into `out` (cleared first; reuse it to avoid allocating) and returns the
/// exact bit count. Errors, writing nothing useful, when the payload is malformed: indices
/// unsorted, duplicated or out of range, lengths that disagree, or values that are not
/// finite or not exactly representable in the declared format.
pub fn encode(p: &Payload, out: &mut Vec<u8>) -> Result<Bits> {
    let n = p.n() as usize;
    out.clear();
    match p {
        Payload::Sparse(s) => {
            crate::contract::check_payload(p, n, 0).map_err(Error::Encode)?;
            if let Some(j) = s
                .values
                .iter()
                .position(|&v| s.values_dtype.quantize(v).to_bits() != v.to_bits())
            {
                return Err(Error::Encode(format!(
                    "value {} at position {j} is not representable in {:?}",
                    s.values[j], s.values_dtype
                )));
            }
            let (b, _) = best_rice(&s.indices);
            header(out, KIND_SPARSE, s.values_dtype, s.n);
            out.extend_from_slice(&(s.indices.len() as u32).to_le_bytes());
            out.push(b as u8);
            let start = out.len();
            let mut w = BitWriter::new(out);
            let mut prev: i64 = -1;
            for &i in &s.indices {
                let gap = (i64::from(i) - prev - 1) as u64;
                prev = i64::from(i);
                w.ones(gap >> b);
                w.put(0, 1);
                w.put(gap & ((1u64 << b) - 1), b);
            }
            let padding = w.finish();
            let index_bits = (out.len() - start) as u64 * 8 - padding;
            for &v in &s.values {
                match s.values_dtype {
                    DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
                    DType::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
                    DType::BF16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
                }
            }
            Ok(Bits {
                header: SPARSE_HEADER as u64 * 8,
                indices: index_bits,
                values: s.values.len() as u64 * u64::from(s.values_dtype.bits()),
                padding,
            })
        }
        Payload::Sign(s) => {
            crate::contract::check_payload(p, n, s.scales.len()).map_err(Error::Encode)?;
            header(out, KIND_SIGN, DType::F32, s.n);
            out.extend_from_slice(&(s.scales.len() as u32).to_le_bytes());
            for &v in &s.scales {
                out.extend_from_slice(&v.to_le_bytes());
            }
            let head = out.len() as u64 * 8;
            for i in 0..n.div_ceil(8) {
                out.push((s.negative[i / 8] >> (8 * (i % 8))) as u8);
            }
            if n % 64 != 0 && s.negative.last().is_some_and(|&w| w >> (n % 64) != 0) {
                return Err(Error::Encode("sign bits set beyond n".into()));
            }
            let padding = (8 - n as u64 % 8) % 8;
            Ok(Bits {
                header: head,
                indices: n as u64,
                values: 0,
                padding,
            })
        }
        Payload::Qsgd(q) => encode_qsgd(q, out),
    }
}

/// The QSGD kind: the header, the scales, the codes packed `b` bits each.
fn encode_qsgd(q: &QsgdPayload, out: &mut Vec<u8>) -> Result<Bits> {
    qsgd::check(q, q.n as usize, q.scales.len()).map_err(Error::Encode)?;
    header(out, KIND_QSGD, DType::F32, q.n);
    out.extend_from_slice(&(q.scales.len() as u32).to_le_bytes());
    out.push(q.levels);
    for &v in &q.scales {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let head = out.len() as u64 * 8;
    let b = qsgd::code_bits(q.levels);
    let mut w = BitWriter::new(out);
    for &c in &q.codes {
        let sign = u64::from(c < 0);
        w.put(u64::from(c.unsigned_abs()) | sign << (b - 1), b);
    }
    let padding = w.finish();
    Ok(Bits {
        header: head,
        indices: 0,
        values: q.codes.len() as u64 * u64::from(b),
        padding,
    })
}

/// Decodes one message. Allocates the payload's vectors; [`decode_into`] reuses them.
pub fn decode(bytes: &[u8]) -> Result<Payload, DecodeError> {
    let mut p = Payload::Sparse(SparsePayload::default());
    decode_into(bytes, &mut p)?;
    Ok(p)
}

/// `len` when the message is exactly `len` bytes long (a fixed-size kind: sign, QSGD), else
/// the truncation or the trailing bytes.
fn exact_len(bytes: &[u8], len: u64) -> Result<usize, DecodeError> {
    if (bytes.len() as u64) < len {
        return Err(DecodeError::Truncated {
            needed: usize::try_from(len).unwrap_or(usize::MAX),
            got: bytes.len(),
        });
    }
    let len = len as usize;
    if bytes.len() > len {
        return Err(DecodeError::Trailing {
            extra: bytes.len() - len,
        });
    }
    Ok(len)
}

fn take<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N], DecodeError> {
    bytes
        .get(at..at + N)
        .map(|s| s.try_into().unwrap())
        .ok_or(DecodeError::Truncated {
            needed: at + N,
            got: bytes.len(),
        })
}

/// Decodes one message into `p`, reusing its buffers when the kind matches. On error `p`
/// holds unspecified (but valid) contents.
pub fn decode_into(bytes: &[u8], p: &mut Payload) -> Result<(), DecodeError> {
    let head: [u8; HEADER] = take(bytes, 0)?;
    if head[..2] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if head[2] != VERSION {
        return Err(DecodeError::Version(head[2]));
    }
    let (kind, dtype) = (head[3] >> 4, DType::from_code(head[3] & 0xF));
    let n = u32::from_le_bytes(head[4..8].try_into().unwrap());
    match (kind, dtype) {
        (KIND_SPARSE, Some(dtype)) => {
            let s = p.sparse_slot();
            decode_sparse(bytes, n, dtype, s)
        }
        (KIND_SIGN, Some(DType::F32)) => {
            let s = p.sign_slot();
            decode_sign(bytes, n, s)
        }
        (KIND_QSGD, Some(DType::F32)) => {
            let q = p.qsgd_slot();
            decode_qsgd(bytes, n, q)
        }
        _ => Err(DecodeError::Kind(head[3])),
    }
}

/// The sparse kind after the common header: count and Rice parameter, the bounds that come
/// before any allocation, the index code, the values.
fn decode_sparse(
    bytes: &[u8],
    n: u32,
    dtype: DType,
    s: &mut SparsePayload,
) -> Result<(), DecodeError> {
    let count = u32::from_le_bytes(take(bytes, HEADER)?) as usize;
    let b = take::<1>(bytes, HEADER + 4)?[0];
    if b > 31 {
        return Err(DecodeError::RiceParameter(b));
    }
    if count as u64 > u64::from(n) {
        return Err(DecodeError::Count {
            count: count as u64,
            n,
        });
    }
    // Each index costs at least 1 + b bits: bound the claim by the bytes present
    // before reserving anything.
    // (In u64: `count * 4` must not wrap where usize is 32 bits.)
    let vbytes = dtype.bits() as usize / 8;
    let min_len = SPARSE_HEADER as u64
        + (count as u64 * (1 + u64::from(b))).div_ceil(8)
        + count as u64 * vbytes as u64;
    if (bytes.len() as u64) < min_len {
        return Err(DecodeError::Truncated {
            needed: usize::try_from(min_len).unwrap_or(usize::MAX),
            got: bytes.len(),
        });
    }
    s.n = n;
    s.values_dtype = dtype;
    s.indices.clear();
    s.values.clear();
    s.indices.reserve(count);
    s.values.reserve(count);
    let value_start = bytes.len() - count * vbytes;
    decode_indices(bytes, value_start, n, b, count, &mut s.indices)?;
    for (j, c) in bytes[value_start..].chunks_exact(vbytes).enumerate() {
        let v = match dtype {
            DType::F32 => f32::from_le_bytes(c.try_into().unwrap()),
            DType::F16 => f16::from_le_bytes(c.try_into().unwrap()).to_f32(),
            DType::BF16 => bf16::from_le_bytes(c.try_into().unwrap()).to_f32(),
        };
        if !v.is_finite() {
            return Err(DecodeError::NonFinite(j));
        }
        s.values.push(v);
    }
    Ok(())
}

/// The Rice-coded gaps of `bytes[SPARSE_HEADER..value_start]` into `out`: every index below
/// `n`, the code canonical (the encoder's `b`, no trailing bytes, zero padding).
fn decode_indices(
    bytes: &[u8],
    value_start: usize,
    n: u32,
    b: u8,
    count: usize,
    out: &mut Vec<u32>,
) -> Result<(), DecodeError> {
    let code = &bytes[SPARSE_HEADER..value_start];
    let mut r = BitReader {
        bytes: code,
        pos: 0,
    };
    let trunc = || DecodeError::Truncated {
        needed: bytes.len() + 1,
        got: bytes.len(),
    };
    let mut next: u64 = 0;
    // Sums of `gap >> (b - 1)`, `gap >> b`, `gap >> (b + 1)` for the canonical check.
    let (mut sum_below, mut sum_at, mut sum_above) = (0u64, 0u64, 0u64);
    for position in 0..count {
        let q = r.unary(u64::from(n) >> b).ok_or_else(trunc)?.map_err(|_| {
            DecodeError::IndexOutOfRange {
                position,
                index: u64::MAX,
                n,
            }
        })?;
        let low = r.bits(u32::from(b)).ok_or_else(trunc)?;
        let gap = (q << b) | low;
        sum_at += q;
        sum_above += q >> 1;
        if b > 0 {
            sum_below += gap >> (b - 1);
        }
        let index = next + gap;
        if index >= u64::from(n) {
            return Err(DecodeError::IndexOutOfRange { position, index, n });
        }
        out.push(index as u32);
        next = index + 1;
    }
    // Canonical: `b` must be what `best_rice` picks, the first minimiser of the
    // length `k (1 + b) + sum(gap >> b)`. That length is convex in `b` (its step
    // `k - sum(ceil((gap >> b) / 2))` never decreases), so its neighbours decide.
    let length = |b: u64, sum: u64| count as u64 * (1 + b) + sum;
    let here = length(u64::from(b), sum_at);
    if (b > 0 && length(u64::from(b) - 1, sum_below) <= here)
        || (b < 31 && length(u64::from(b) + 1, sum_above) < here)
    {
        return Err(DecodeError::RiceParameter(b));
    }
    let used = r.pos.div_ceil(8);
    if used < code.len() {
        return Err(DecodeError::Trailing {
            extra: code.len() - used,
        });
    }
    if r.pos % 8 != 0 && code[used - 1] >> (r.pos % 8) != 0 {
        return Err(DecodeError::Padding);
    }
    Ok(())
}

/// The sign kind after the common header: group count, the f32 scales, the sign bits.
fn decode_sign(bytes: &[u8], n: u32, s: &mut SignPayload) -> Result<(), DecodeError> {
    let groups = u32::from_le_bytes(take(bytes, HEADER)?) as usize;
    let sign_bytes = (n as usize).div_ceil(8);
    let len = SIGN_HEADER as u64 + groups as u64 * 4 + sign_bytes as u64;
    exact_len(bytes, len)?;
    s.n = n;
    s.scales.clear();
    s.negative.clear();
    for (j, c) in bytes[SIGN_HEADER..SIGN_HEADER + groups * 4]
        .chunks_exact(4)
        .enumerate()
    {
        let v = f32::from_le_bytes(c.try_into().unwrap());
        if !v.is_finite() {
            return Err(DecodeError::NonFinite(j));
        }
        s.scales.push(v);
    }
    let bits = &bytes[SIGN_HEADER + groups * 4..];
    if n % 8 != 0 && bits[sign_bytes - 1] >> (n % 8) != 0 {
        return Err(DecodeError::Padding);
    }
    s.negative.extend(bits.chunks(8).map(|c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        u64::from_le_bytes(w)
    }));
    Ok(())
}

/// The QSGD kind after the common header: groups and levels, the exact length before any
/// allocation, the scales, the codes (each level within `levels`, no negative zero, zero
/// padding).
fn decode_qsgd(bytes: &[u8], n: u32, q: &mut QsgdPayload) -> Result<(), DecodeError> {
    let groups = u32::from_le_bytes(take(bytes, HEADER)?) as usize;
    let [levels] = take::<1>(bytes, HEADER + 4)?;
    if !(1..=crate::QSGD_MAX_LEVELS).contains(&levels) {
        return Err(DecodeError::Levels(levels));
    }
    let b = qsgd::code_bits(levels);
    let code_bytes = (u64::from(n) * u64::from(b)).div_ceil(8);
    let len = QSGD_HEADER as u64 + groups as u64 * 4 + code_bytes;
    let len = exact_len(bytes, len)?;
    q.n = n;
    q.levels = levels;
    q.scales.clear();
    q.codes.clear();
    let scales_end = QSGD_HEADER + groups * 4;
    for (j, c) in bytes[QSGD_HEADER..scales_end].chunks_exact(4).enumerate() {
        let v = f32::from_le_bytes(c.try_into().unwrap());
        if !v.is_finite() {
            return Err(DecodeError::NonFinite(j));
        }
        if v < 0.0 {
            return Err(DecodeError::NegativeScale(j));
        }
        q.scales.push(v);
    }
    let mut r = BitReader {
        bytes: &bytes[scales_end..],
        pos: 0,
    };
    let sign_bit = 1u64 << (b - 1);
    q.codes.reserve(n as usize);
    for i in 0..n {
        let c = r.bits(b).ok_or(DecodeError::Truncated {
            needed: len,
            got: bytes.len(),
        })?;
        let l = c & (sign_bit - 1);
        if l > u64::from(levels) || (l == 0 && c & sign_bit != 0) {
            return Err(DecodeError::Code { index: i });
        }
        let l = l as i8;
        q.codes.push(if c & sign_bit != 0 { -l } else { l });
    }
    let used = u64::from(n) * u64::from(b);
    if used % 8 != 0 && bytes[len - 1] >> (used % 8) != 0 {
        return Err(DecodeError::Padding);
    }
    Ok(())
}
