//! What a worker sends: the in-memory form of a compressed gradient. [`crate::wire`] turns it
//! into bytes and back.

use crate::DType;

/// A sparse payload: ascending, distinct indices into a buffer of `n` elements and the
/// values the receiver reconstructs at them (already rounded to `values_dtype`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SparsePayload {
    /// Length of the dense buffer the indices point into.
    pub n: u32,
    /// Format the values travel in.
    pub values_dtype: DType,
    /// Strictly ascending indices, each `< n`.
    pub indices: Vec<u32>,
    /// One value per index, exactly representable in `values_dtype`.
    pub values: Vec<f32>,
}

/// A scaled-sign payload (SPEC §6): one f32 scale per group and one sign bit per element.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SignPayload {
    /// Number of elements.
    pub n: u32,
    /// Per group (the whole buffer in global mode, each layer in per-layer mode): `mean |p|`.
    pub scales: Vec<f32>,
    /// Bit `i % 64` of word `i / 64` is set when element `i` is negative (`sign(0) = +1`).
    /// Bits at or beyond `n` are zero.
    pub negative: Vec<u64>,
}

impl SignPayload {
    /// Whether element `i` was sent as `-scale`.
    #[inline]
    pub fn is_negative(&self, i: usize) -> bool {
        (self.negative[i / 64] >> (i % 64)) & 1 == 1
    }
}

/// A QSGD payload (SPEC §13): one f32 scale per group (`max |p|`) and one signed level per
/// element; element `i` of group `g` decodes to `level_i * scales[g] / levels` (SPEC §13's
/// exact f32 operations: [`crate::codec::qsgd::decode`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QsgdPayload {
    /// Number of elements.
    pub n: u32,
    /// Quantisation levels `s` (`1..=127`).
    pub levels: u8,
    /// Per group (the whole buffer in global mode, each layer in per-layer mode): `max |p|`.
    pub scales: Vec<f32>,
    /// One signed level per element, each in `-levels..=levels`.
    pub codes: Vec<i8>,
}

/// One worker's compressed gradient.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// Indices and values (top-r, random-k, rTop-k).
    Sparse(SparsePayload),
    /// Scaled sign.
    Sign(SignPayload),
    /// QSGD stochastic quantisation.
    Qsgd(QsgdPayload),
}

impl Default for Payload {
    /// An empty sparse payload (`n = 0`): a slot that [`crate::Compress::read_payload`]
    /// fills, reusing its allocations.
    fn default() -> Self {
        Payload::Sparse(SparsePayload::default())
    }
}

impl Payload {
    /// The sparse payload, or `None` for a sign payload.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Payload, SignPayload};
    /// assert!(Payload::default().as_sparse().is_some());
    /// assert!(Payload::Sign(SignPayload::default()).as_sparse().is_none());
    /// ```
    pub fn as_sparse(&self) -> Option<&SparsePayload> {
        match self {
            Payload::Sparse(p) => Some(p),
            Payload::Sign(_) | Payload::Qsgd(_) => None,
        }
    }

    /// The sign payload, or `None` for a sparse one.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Payload, SignPayload};
    /// assert!(Payload::default().as_sign().is_none());
    /// assert!(Payload::Sign(SignPayload::default()).as_sign().is_some());
    /// ```
    pub fn as_sign(&self) -> Option<&SignPayload> {
        match self {
            Payload::Sign(p) => Some(p),
            Payload::Sparse(_) | Payload::Qsgd(_) => None,
        }
    }

    /// The QSGD payload, or `None` for the other kinds.
    ///
    /// # Examples
    /// ```
    /// use gradsift::{Payload, QsgdPayload};
    /// assert!(Payload::default().as_qsgd().is_none());
    /// assert!(Payload::Qsgd(QsgdPayload::default()).as_qsgd().is_some());
    /// ```
    pub fn as_qsgd(&self) -> Option<&QsgdPayload> {
        match self {
            Payload::Qsgd(p) => Some(p),
            Payload::Sparse(_) | Payload::Sign(_) => None,
        }
    }

    /// This slot as a sparse payload: its own buffers when it already is one, an empty one
    /// otherwise (the decoders and read-backs fill a slot in place, reusing allocations).
    pub(crate) fn sparse_slot(&mut self) -> &mut SparsePayload {
        slot(self, Payload::Sparse, |p| match p {
            Payload::Sparse(s) => Some(s),
            _ => None,
        })
    }

    /// This slot as a sign payload, as [`Payload::sparse_slot`].
    pub(crate) fn sign_slot(&mut self) -> &mut SignPayload {
        slot(self, Payload::Sign, |p| match p {
            Payload::Sign(s) => Some(s),
            _ => None,
        })
    }

    /// This slot as a QSGD payload, as [`Payload::sparse_slot`].
    pub(crate) fn qsgd_slot(&mut self) -> &mut QsgdPayload {
        slot(self, Payload::Qsgd, |p| match p {
            Payload::Qsgd(q) => Some(q),
            _ => None,
        })
    }

    /// Length of the dense buffer this payload describes.
    pub fn n(&self) -> u32 {
        match self {
            Payload::Sparse(p) => p.n,
            Payload::Sign(p) => p.n,
            Payload::Qsgd(p) => p.n,
        }
    }
}

fn slot<T: Default>(
    p: &mut Payload,
    wrap: fn(T) -> Payload,
    get: fn(&mut Payload) -> Option<&mut T>,
) -> &mut T {
    if get(p).is_none() {
        *p = wrap(T::default());
    }
    get(p).expect("the slot was just set to this kind")
}
