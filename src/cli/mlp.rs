//! The MLP that `gradsift train` and `gradsift analyze`'s embedded default train: candle on
//! the CPU, parameters in the gradient layout's order.

use super::SplitMix;
use super::error::Result;
use super::mnist::{Mnist, PIXELS};
use crate::Layout;
use candle_core::{D, Tensor, Var};

/// A fully connected network `784 -> hidden... -> 10` with ReLU, parameters as candle
/// [`Var`]s in a fixed order: weight then bias of each layer (the gradient layout's order).
pub struct Mlp {
    params: Vec<Var>,
}

impl Mlp {
    /// Kaiming-uniform weights and zero biases from a seeded generator.
    pub fn new(hidden: &[usize], seed: u64) -> Result<Self> {
        let mut rng = SplitMix(seed ^ 0x006D_6C70);
        let mut dims = vec![PIXELS];
        dims.extend_from_slice(hidden);
        dims.push(10);
        let mut params = Vec::new();
        for w in dims.windows(2) {
            let bound = (6.0 / w[0] as f64).sqrt();
            let data: Vec<f32> = (0..w[0] * w[1])
                .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                .collect();
            params.push(Var::from_tensor(&Tensor::from_vec(
                data,
                (w[0], w[1]),
                &candle_core::Device::Cpu,
            )?)?);
            params.push(Var::from_tensor(&Tensor::zeros(
                w[1],
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )?)?);
        }
        Ok(Self { params })
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
    /// `in x out`), `fc1.bias`, `fc2.weight`, ...
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        self.params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let kind = if i % 2 == 0 { "weight" } else { "bias" };
                (format!("fc{}.{kind}", i / 2 + 1), p.dims().to_vec())
            })
            .collect()
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.elem_count()).sum()
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        let layers = self.params.len() / 2;
        for l in 0..layers {
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
