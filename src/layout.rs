//! How a flat gradient buffer splits into layers, and how layers group for selection.

use crate::{Error, Result};
use std::ops::Range;

/// Largest number of elements gradsift accepts in one buffer (`n < 2^32`, SPEC §0).
pub const MAX_ELEMENTS: u64 = u32::MAX as u64;

/// Contiguous layers `n_1..n_L` of one flat buffer. A layer may be empty. Built once per
/// model; plans keep their own copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// `L + 1` offsets, `offsets[0] = 0`, `offsets[L] = n`.
    offsets: Vec<u32>,
}

impl Layout {
    /// A layout from layer sizes (elements). Errors with [`Error::TooLarge`] when the sizes add
    /// up to `2^32` or more.
    pub fn new(sizes: &[usize]) -> Result<Self> {
        let mut offsets = Vec::with_capacity(sizes.len() + 1);
        let mut total = 0u64;
        offsets.push(0);
        for &s in sizes {
            // Saturating: sizes near usize::MAX must give TooLarge, not an overflow panic.
            total = total.saturating_add(s as u64);
            if total > MAX_ELEMENTS {
                return Err(Error::TooLarge {
                    n: sizes.iter().fold(0u64, |a, &s| a.saturating_add(s as u64)),
                });
            }
            offsets.push(total as u32);
        }
        Ok(Self { offsets })
    }

    /// One layer covering `n` elements.
    pub fn single(n: usize) -> Result<Self> {
        Self::new(&[n])
    }

    /// Total number of elements `n`.
    pub fn n(&self) -> usize {
        *self.offsets.last().unwrap_or(&0) as usize
    }

    /// Number of layers `L`.
    pub fn num_layers(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Element range of layer `l` (panics if `l >= L`, like slice indexing).
    pub fn layer(&self, l: usize) -> Range<usize> {
        self.offsets[l] as usize..self.offsets[l + 1] as usize
    }

    /// Layer sizes in order.
    pub fn sizes(&self) -> impl ExactSizeIterator<Item = usize> + '_ {
        self.offsets.windows(2).map(|w| (w[1] - w[0]) as usize)
    }

    /// The `L + 1` layer offsets (`u32`, as GPU backends upload them).
    pub fn offsets(&self) -> &[u32] {
        &self.offsets
    }

    /// The groups a selection runs over: the whole buffer in [`Mode::Global`], each layer in
    /// [`Mode::PerLayer`].
    pub fn groups(&self, mode: Mode) -> Vec<Range<usize>> {
        match mode {
            Mode::Global => std::iter::once(0..self.n()).collect(),
            Mode::PerLayer => (0..self.num_layers()).map(|l| self.layer(l)).collect(),
        }
    }

    /// Checks that a buffer of `len` elements matches this layout.
    pub fn check_len(&self, what: &'static str, len: usize) -> Result<()> {
        if len as u64 > MAX_ELEMENTS {
            return Err(Error::TooLarge { n: len as u64 });
        }
        if len != self.n() {
            return Err(Error::LengthMismatch {
                what,
                expected: self.n(),
                got: len,
            });
        }
        Ok(())
    }
}

/// Whether a selection runs once over the whole buffer or once per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// One selection over all `n` elements (counts from ratios use `n`).
    #[default]
    Global,
    /// Each layer selects on its own with its own counts `r_l`, `k_l`.
    PerLayer,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_groups() {
        let l = Layout::new(&[3, 0, 5]).unwrap();
        assert_eq!(l.n(), 8);
        assert_eq!(l.num_layers(), 3);
        assert_eq!(l.layer(1), 3..3);
        assert_eq!(l.groups(Mode::PerLayer), vec![0..3, 3..3, 3..8]);
        assert_eq!(l.groups(Mode::Global), vec![0..8]);
        assert!(matches!(
            l.check_len("g", 7),
            Err(Error::LengthMismatch {
                expected: 8,
                got: 7,
                ..
            })
        ));
    }

    #[test]
    fn too_large_is_an_error_not_a_panic() {
        let half = (1usize << 31) + 1;
        assert!(matches!(
            Layout::new(&[half, half]),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(
            Layout::single(1 << 32),
            Err(Error::TooLarge { .. })
        ));
        assert!(Layout::single((1 << 32) - 1).is_ok());
    }
}
