//! The models that `gradsift train` (and `gradsift analyze`'s embedded default) train: an
//! MLP and a small CNN, candle on the CPU, parameters in the gradient layout's order.

use super::SplitMix;
use super::error::Result;
use super::mnist::{Mnist, PIXELS};
use candle_core::{D, Tensor, Var};
use gradsift::Layout;

/// The network of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Arch {
    /// Fully connected `784 -> hidden... -> 10` with ReLU.
    #[default]
    Mlp,
    /// A small all-convolutional CNN: conv 4x4 stride 2 (8 channels), ReLU, conv 5x5
    /// stride 2 (16), ReLU, fully connected 400 -> 64 -> 10 (29,666 parameters). Strided
    /// convolutions rather than max-pooling (28 -> 13 -> 5): candle 0.11's max-pool backward
    /// gave gradients 2-4x off finite differences on this data, whose blank background ties
    /// many windows' maxima (it appears to credit every tied element); the convolutions'
    /// backward agrees (`cnn_gradient_matches_finite_differences`).
    Cnn,
}

/// Channels and kernels of the CNN's two convolutions, and its hidden width.
const CNN_C1: usize = 8;
const CNN_C2: usize = 16;
const CNN_K1: usize = 4;
const CNN_K2: usize = 5;
const CNN_FC: usize = 64;
/// Elements after the second convolution: 16 channels of 5 x 5 (28 -> 13 -> 5).
const CNN_FLAT: usize = CNN_C2 * 5 * 5;

/// A network with its parameters as candle [`Var`]s in a fixed order: weight then bias of
/// each layer (the gradient layout's order).
pub struct Model {
    arch: Arch,
    params: Vec<Var>,
}

/// Kaiming-uniform values of `shape` for a fan-in of `fan_in`.
fn kaiming(rng: &mut SplitMix, shape: &[usize], fan_in: usize) -> Result<Var> {
    let bound = (6.0 / fan_in as f64).sqrt();
    let data: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
        .collect();
    Ok(Var::from_tensor(&Tensor::from_vec(
        data,
        shape,
        &candle_core::Device::Cpu,
    )?)?)
}

fn zeros(n: usize) -> Result<Var> {
    Ok(Var::from_tensor(&Tensor::zeros(
        n,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?)?)
}

impl Model {
    /// Kaiming-uniform weights and zero biases from a seeded generator; `hidden` are the
    /// MLP's hidden widths (the CNN's shape is fixed).
    pub fn new(arch: Arch, hidden: &[usize], seed: u64) -> Result<Self> {
        let mut rng = SplitMix(seed ^ 0x006D_6C70);
        let mut params = Vec::new();
        match arch {
            Arch::Mlp => {
                let mut dims = vec![PIXELS];
                dims.extend_from_slice(hidden);
                dims.push(10);
                for w in dims.windows(2) {
                    params.push(kaiming(&mut rng, &[w[0], w[1]], w[0])?);
                    params.push(zeros(w[1])?);
                }
            }
            Arch::Cnn => {
                params.push(kaiming(
                    &mut rng,
                    &[CNN_C1, 1, CNN_K1, CNN_K1],
                    CNN_K1 * CNN_K1,
                )?);
                params.push(zeros(CNN_C1)?);
                let fan = CNN_C1 * CNN_K2 * CNN_K2;
                params.push(kaiming(&mut rng, &[CNN_C2, CNN_C1, CNN_K2, CNN_K2], fan)?);
                params.push(zeros(CNN_C2)?);
                params.push(kaiming(&mut rng, &[CNN_FLAT, CNN_FC], CNN_FLAT)?);
                params.push(zeros(CNN_FC)?);
                params.push(kaiming(&mut rng, &[CNN_FC, 10], CNN_FC)?);
                params.push(zeros(10)?);
            }
        }
        Ok(Self { arch, params })
    }

    /// The MLP `784 -> hidden... -> 10`.
    pub fn mlp(hidden: &[usize], seed: u64) -> Result<Self> {
        Self::new(Arch::Mlp, hidden, seed)
    }

    /// Which network this is.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The shape in words, e.g. `MLP 784-128-64-10`.
    pub fn describe(&self) -> String {
        match self.arch {
            Arch::Mlp => {
                let mut dims: Vec<String> = vec![PIXELS.to_string()];
                dims.extend(
                    self.params
                        .iter()
                        .step_by(2)
                        .map(|w| w.dims()[1].to_string()),
                );
                format!("MLP {}", dims.join("-"))
            }
            Arch::Cnn => format!(
                "CNN conv{CNN_K1}x{CNN_K1}/2x{CNN_C1}-conv{CNN_K2}x{CNN_K2}/2x{CNN_C2}-{CNN_FLAT}-{CNN_FC}-10"
            ),
        }
    }

    /// One layer per parameter tensor, in order.
    pub fn layout(&self) -> Layout {
        Layout::new(
            &self
                .params
                .iter()
                .map(|p| p.elem_count())
                .collect::<Vec<_>>(),
        )
        .expect("an MLP has far fewer than 2^32 parameters")
    }

    /// Name and shape of each parameter tensor, in layout order: `fc1.weight` (stored
    /// `in x out`), `fc1.bias`, `fc2.weight`, ... (the CNN's first two layers are `conv1`,
    /// `conv2`, weights `out x in x 5 x 5`).
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let convs = if self.arch == Arch::Cnn { 2 } else { 0 };
        self.params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let kind = if i % 2 == 0 { "weight" } else { "bias" };
                let l = i / 2;
                let name = if l < convs {
                    format!("conv{}", l + 1)
                } else {
                    format!("fc{}", l - convs + 1)
                };
                (format!("{name}.{kind}"), p.dims().to_vec())
            })
            .collect()
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.elem_count()).sum()
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        let mut first_fc = 0;
        if self.arch == Arch::Cnn {
            h = h.reshape((x.dims()[0], 1, 28, 28))?;
            for c in 0..2 {
                let (w, b) = (&self.params[2 * c], &self.params[2 * c + 1]);
                h = h
                    .conv2d(w.as_tensor(), 0, 2, 1, 1)?
                    .broadcast_add(&b.as_tensor().reshape((1, b.dims()[0], 1, 1))?)?
                    .relu()?;
            }
            h = h.flatten_from(1)?;
            first_fc = 2;
        }
        let layers = self.params.len() / 2;
        for l in first_fc..layers {
            h = h
                .matmul(self.params[2 * l].as_tensor())?
                .broadcast_add(self.params[2 * l + 1].as_tensor())?;
            if l + 1 < layers {
                h = h.relu()?;
            }
        }
        Ok(h)
    }

    /// Mean cross-entropy of a batch and its gradient, flattened into `grad` (layout order).
    pub fn loss_and_grad(&self, data: &Mnist, batch: &[usize], grad: &mut [f32]) -> Result<f32> {
        let (x, y) = tensors(data, batch)?;
        let loss = candle_nn::loss::cross_entropy(&self.logits(&x)?, &y)?;
        let grads = loss.backward()?;
        let mut at = 0;
        for p in &self.params {
            let n = p.elem_count();
            let g = grads
                .get(p.as_tensor())
                .ok_or_else(|| super::error::CliError::Data("parameter without gradient".into()))?;
            let g = g.flatten_all()?.to_vec1::<f32>()?;
            grad[at..at + n].copy_from_slice(&g);
            at += n;
        }
        Ok(loss.to_scalar::<f32>()?)
    }

    /// `params -= lr * update` (update in layout order).
    pub fn apply(&self, update: &[f32], lr: f32) -> Result<()> {
        let mut at = 0;
        for p in &self.params {
            let n = p.elem_count();
            let u = Tensor::from_slice(&update[at..at + n], p.shape(), &candle_core::Device::Cpu)?;
            p.set(&(p.as_tensor() - (u * f64::from(lr))?)?)?;
            at += n;
        }
        Ok(())
    }

    /// Copies the weights into `out` (layout order, `num_params` elements).
    pub fn read_params(&self, out: &mut [f32]) -> Result<()> {
        let mut at = 0;
        for p in &self.params {
            let n = p.elem_count();
            out[at..at + n].copy_from_slice(&p.flatten_all()?.to_vec1::<f32>()?);
            at += n;
        }
        Ok(())
    }

    /// Sets the weights from `params` (layout order), bit for bit.
    pub fn write_params(&self, params: &[f32]) -> Result<()> {
        let mut at = 0;
        for p in &self.params {
            let n = p.elem_count();
            p.set(&Tensor::from_slice(
                &params[at..at + n],
                p.shape(),
                &candle_core::Device::Cpu,
            )?)?;
            at += n;
        }
        Ok(())
    }

    /// 64-bit FNV-1a of every parameter's f32 bits, in layout order: a fingerprint of the
    /// model that two runs share only if their weights are equal bit for bit.
    pub fn fingerprint(&self) -> Result<u64> {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for p in &self.params {
            for x in p.flatten_all()?.to_vec1::<f32>()? {
                for b in x.to_bits().to_le_bytes() {
                    h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
        }
        Ok(h)
    }

    /// Fraction of `data` classified correctly.
    pub fn accuracy(&self, data: &Mnist) -> Result<f64> {
        let idx: Vec<usize> = (0..data.len()).collect();
        let mut correct = 0usize;
        for chunk in idx.chunks(1000) {
            let (x, y) = tensors(data, chunk)?;
            let pred = self.logits(&x)?.argmax(D::Minus1)?;
            correct += pred
                .eq(&y)?
                .to_dtype(candle_core::DType::U32)?
                .sum_all()?
                .to_scalar::<u32>()? as usize;
        }
        Ok(correct as f64 / data.len().max(1) as f64)
    }
}

fn tensors(data: &Mnist, idx: &[usize]) -> Result<(Tensor, Tensor)> {
    let mut x = Vec::with_capacity(idx.len() * PIXELS);
    for &i in idx {
        x.extend_from_slice(&data.images[i * PIXELS..(i + 1) * PIXELS]);
    }
    let y: Vec<u32> = idx.iter().map(|&i| u32::from(data.labels[i])).collect();
    Ok((
        Tensor::from_vec(x, (idx.len(), PIXELS), &candle_core::Device::Cpu)?,
        Tensor::from_vec(y, idx.len(), &candle_core::Device::Cpu)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// candle's convolution backward passes against central differences, one
    /// coordinate per layer (the one with the largest gradient, away from rounding noise).
    #[test]
    fn cnn_gradient_matches_finite_differences() {
        let data = Mnist::embedded().unwrap();
        let m = Model::new(Arch::Cnn, &[], 1).unwrap();
        let n = m.num_params();
        assert_eq!(n, 29_666);
        assert_eq!(m.layout().num_layers(), 8);
        assert_eq!(m.parameters()[2].0, "conv2.weight");
        assert_eq!(m.parameters()[4], ("fc1.weight".to_string(), vec![400, 64]));
        let batch: Vec<usize> = (0..8).collect();
        let layout = m.layout();
        let mut w = vec![0f32; n];
        m.read_params(&mut w).unwrap();
        // Nonzero biases: with the initial zeros, every blank-background position of the
        // first convolution sits exactly on the ReLU's kink, where a central difference
        // averages the two one-sided slopes and the backward pass takes one of them.
        for l in (1..layout.num_layers()).step_by(2) {
            for (j, b) in w[layout.layer(l)].iter_mut().enumerate() {
                *b = 0.01 * ((j % 7) as f32 - 3.0) + 0.005;
            }
        }
        m.write_params(&w).unwrap();
        let mut g = vec![0f32; n];
        let loss = m.loss_and_grad(&data, &batch, &mut g).unwrap();
        assert!(loss.is_finite() && loss > 1.0, "{loss}");
        let mut scratch = vec![0f32; n];
        for l in 0..layout.num_layers() {
            let r = layout.layer(l);
            let i = r
                .clone()
                .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                .unwrap();
            // Small enough that few ReLUs change sides, large against f32 rounding.
            let eps = 1e-3f32;
            let mut at = |d: f32| {
                let mut v = w.clone();
                v[i] += d;
                m.write_params(&v).unwrap();
                m.loss_and_grad(&data, &batch, &mut scratch).unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            m.write_params(&w).unwrap();
            assert!(
                (fd - g[i]).abs() <= 0.05 * g[i].abs() + 1e-3,
                "layer {l} index {i}: backward {} vs central difference {fd}",
                g[i]
            );
        }
    }
}
