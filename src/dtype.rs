//! Element types of gradients and of transmitted values.

use half::{bf16, f16};

/// The three floating-point formats a gradient or a transmitted value can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DType {
    /// IEEE binary32.
    #[default]
    F32,
    /// IEEE binary16 (max finite 65504).
    F16,
    /// bfloat16: the top 16 bits of an f32.
    BF16,
}

impl DType {
    /// Bits one value of this type occupies on the wire.
    pub const fn bits(self) -> u32 {
        match self {
            DType::F32 => 32,
            DType::F16 | DType::BF16 => 16,
        }
    }

    /// Code used in the wire header.
    pub(crate) const fn code(self) -> u8 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
        }
    }

    pub(crate) const fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(DType::F32),
            1 => Some(DType::F16),
            2 => Some(DType::BF16),
            _ => None,
        }
    }

    /// `v` as the receiver sees it after travelling in this format: round to nearest even,
    /// and a finite `v` beyond the format's range saturates to its largest finite value
    /// (the excess stays in the residual instead of becoming infinity at the server).
    #[inline]
    pub fn quantize(self, v: f32) -> f32 {
        match self {
            DType::F32 => v,
            DType::F16 => {
                let h = f16::from_f32(v);
                if h.is_infinite() && v.is_finite() {
                    f16::MAX.to_f32().copysign(v)
                } else {
                    h.to_f32()
                }
            }
            DType::BF16 => {
                let h = bf16::from_f32(v);
                if h.is_infinite() && v.is_finite() {
                    bf16::MAX.to_f32().copysign(v)
                } else {
                    h.to_f32()
                }
            }
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A gradient element type: `f32`, [`half::f16`] or [`half::bf16`]. Arithmetic happens in
/// f32; the 16-bit types are widened exactly on load (SPEC §0).
pub trait Element: bytemuck::Pod + Send + Sync + sealed::Sealed + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Exact widening to f32.
    fn to_f32(self) -> f32;
    /// Round-to-nearest-even narrowing from f32.
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_saturates_instead_of_overflowing() {
        assert_eq!(DType::F16.quantize(1e6), 65504.0);
        assert_eq!(DType::F16.quantize(-1e6), -65504.0);
        assert_eq!(DType::BF16.quantize(f32::MAX), bf16::MAX.to_f32());
        assert!(DType::F16.quantize(f32::NAN).is_nan());
        assert_eq!(DType::F32.quantize(1e30), 1e30);
        // Round to nearest even at the f16 mantissa boundary: 1 + 2^-11 is a tie.
        assert_eq!(DType::F16.quantize(1.0 + f32::powi(2.0, -11)), 1.0);
    }
}
