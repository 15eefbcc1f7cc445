//! `gradsift demo`: compresses a realistic multi-layer gradient of K workers with every
//! method and prints bits, distortion and time (the default command of the binary).

use gradsift::{
    Aggregate, Backend, Compress, Config, DType, Device, Layout, Mode, Payload, Scale, Statistics,
    VarianceEstimate, wire,
};
use std::time::Instant;

/// Layer shapes of a ResNet-18 for CIFAR-10 (conv weights, BN scales and shifts, the
/// classifier): the layer-size mix real data-parallel training hands a compressor.
fn resnet18_layout() -> Vec<usize> {
    let mut sizes = vec![3 * 64 * 9, 64, 64];
    let mut cin = 64;
    for &c in &[64usize, 128, 256, 512] {
        for block in 0..2 {
            let first = block == 0 && c != 64;
            sizes.extend([
                (if block == 0 { cin } else { c }) * c * 9,
                c,
                c,
                c * c * 9,
                c,
                c,
            ]);
            if first {
                sizes.extend([cin * c, c, c]);
            }
        }
        cin = c;
    }
    sizes.extend([512 * 10, 10]);
    sizes
}

/// K workers' gradients `y_k = x + n_k` (the seed paper's Section III model) with per-layer
/// scales spread over two decades and heavy-tailed global components, as in real networks.
fn synthetic_gradients(layout: &Layout, workers: usize) -> Vec<Vec<f32>> {
    let mut rng = super::SplitMix(2024);
    let n = layout.n();
    let mut x = vec![0f32; n];
    let mut scale = vec![0f32; n];
    for l in 0..layout.num_layers() {
        let s = 1e-3 * 10f64.powf(2.0 * rng.uniform());
        for i in layout.layer(l) {
            // Student-t with 3 degrees of freedom: a few coordinates dominate.
            let chi2: f64 = (0..3).map(|_| rng.normal().powi(2)).sum();
            x[i] = (s * rng.normal() / (chi2 / 3.0).sqrt()) as f32;
            scale[i] = (3.0 * s) as f32;
        }
    }
    (0..workers)
        .map(|_| {
            x.iter()
                .zip(&scale)
                .map(|(&x, &s)| x + s * rng.normal() as f32)
                .collect()
        })
        .collect()
}

/// Options of `gradsift demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Backend that runs the compressors, the aggregation and the variance estimate: cpu,
    /// cuda, wgpu or auto (CUDA, then wgpu, then the CPU).
    #[arg(long, default_value_t = Backend::Cpu)]
    pub backend: Backend,
}

/// Runs the demo and prints its table.
pub fn run(args: &DemoArgs) -> gradsift::Result<()> {
    let (device, notes) = super::backend::open(args.backend)?;
    for note in notes {
        eprintln!("gradsift demo: {note}");
    }
    let workers = 5;
    let layout = Layout::new(&resnet18_layout())?;
    let n = layout.n();
    println!(
        "gradsift demo: {workers} workers, ResNet-18 layout ({} layers, {n} parameters), synthetic y_k = x + n_k, backend {}",
        layout.num_layers(),
        device.backend()
    );
    let grads = synthetic_gradients(&layout, workers);
    let mean: Vec<f32> = (0..n)
        .map(|i| grads.iter().map(|g| g[i]).sum::<f32>() / workers as f32)
        .collect();
    print_variance(&device, &layout, &grads)?;

    println!(
        "{:<30} {:>10} {:>12} {:>12} {:>11} {:>10}",
        "method", "bits/elem", "bits/index", "entropy/idx", "rel. dist.", "ms/step"
    );
    let mut bench = Bench {
        device: &device,
        layout: &layout,
        grads: &grads,
        mean: &mean,
        bytes: Vec::new(),
        agg_out: vec![0f32; n],
    };
    for (name, config) in methods() {
        bench.row(name, config)?;
    }
    println!(
        "\nbits/elem: wire bits per gradient element per worker; rel. dist.: ||aggregate - mean||^2 / ||mean||^2 after one step"
    );
    println!(
        "(error feedback carries the rest to later steps). entropy/idx: log2 C(n, k) / k, the floor for index bits."
    );
    Ok(())
}

/// Prints the size-weighted mean of the per-layer variance estimates.
fn print_variance(device: &Device, layout: &Layout, grads: &[Vec<f32>]) -> gradsift::Result<()> {
    let (workers, n) = (grads.len(), layout.n());
    let views: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
    let mut est: Vec<VarianceEstimate> = Vec::new();
    device
        .stats(layout, workers)?
        .estimate_variance(&views, &mut est)?;
    let (sx, sn) = est
        .iter()
        .zip(layout.sizes())
        .fold((0.0, 0.0), |(a, b), (e, nl)| {
            (a + e.sigma_x2 * nl as f64, b + e.sigma_n2 * nl as f64)
        });
    println!(
        "estimated (size-weighted) sigma_X^2 = {:.3e}, sigma_N^2 = {:.3e}\n",
        sx / n as f64,
        sn / n as f64
    );
    Ok(())
}

/// The table's rows: name and configuration.
fn methods() -> Vec<(&'static str, Config)> {
    vec![
        ("rtopk r=0.5% k=0.1%", Config::rtopk(0.005, 0.001)),
        (
            "rtopk r=0.5% k=0.1% unbiased",
            Config {
                scale: Scale::Unbiased,
                ..Config::rtopk(0.005, 0.001)
            },
        ),
        ("topk 0.1%", Config::topk(0.001)),
        (
            "topk 0.1% per-layer",
            Config {
                mode: Mode::PerLayer,
                ..Config::topk(0.001)
            },
        ),
        (
            "topk 1% f16 values",
            Config {
                values: DType::F16,
                ..Config::topk(0.01)
            },
        ),
        ("randomk 0.1%", Config::randomk(0.001)),
        (
            "sign per-layer",
            Config {
                mode: Mode::PerLayer,
                ..Config::sign()
            },
        ),
    ]
}

/// What every row is measured on, and the buffers the rows reuse.
struct Bench<'a> {
    device: &'a Device,
    layout: &'a Layout,
    grads: &'a [Vec<f32>],
    mean: &'a [f32],
    bytes: Vec<u8>,
    agg_out: Vec<f32>,
}

/// One step of every worker through one method, after the wire round trip.
struct Sent {
    payloads: Vec<Payload>,
    bits: u64,
    /// Index bits and indices sent, summed over the sparse payloads.
    index_bits: (u64, u64),
    /// Seconds spent in the plans' `step`, summed over the workers.
    step_time: f64,
}

impl Bench<'_> {
    /// Measures one method and prints its row.
    fn row(&mut self, name: &str, mut config: Config) -> gradsift::Result<()> {
        let workers = self.grads.len();
        let n = self.layout.n();
        let sent = self.compress(&mut config)?;
        let dt = sent.step_time * 1e3 / workers as f64;
        let mut agg = self.device.aggregator(
            self.layout,
            config.mode,
            gradsift::Average::OverWorkers,
            workers,
        )?;
        agg.aggregate(&sent.payloads, &mut self.agg_out)?;
        let err: f64 = self
            .agg_out
            .iter()
            .zip(self.mean)
            .map(|(&a, &b)| f64::from(a - b).powi(2))
            .sum();
        let norm: f64 = self.mean.iter().map(|&b| f64::from(b).powi(2)).sum();
        let index_bits = sent.index_bits;
        let (per_index, entropy) = if index_bits.1 > 0 {
            let k = index_bits.1 / workers as u64;
            (
                format!("{:.2}", index_bits.0 as f64 / index_bits.1 as f64),
                format!("{:.2}", wire::log2_binomial(n as u64, k) / k as f64),
            )
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "{name:<30} {:>10.4} {per_index:>12} {entropy:>12} {:>11.4} {dt:>10.1}",
            sent.bits as f64 / (workers * n) as f64,
            err / norm
        );
        Ok(())
    }

    /// Runs one step of every worker's plan for `config` (each plan with its own
    /// `config.worker`) and passes each payload through the wire format.
    fn compress(&mut self, config: &mut Config) -> gradsift::Result<Sent> {
        let workers = self.grads.len();
        let mut payloads = Vec::with_capacity(workers);
        let mut bits = 0u64;
        let mut index_bits = (0u64, 0u64);
        // Plans are built once per worker, as in a training loop; only the step is timed.
        let mut plans = Vec::with_capacity(workers);
        for w in 0..workers {
            config.worker = w as u32;
            plans.push(self.device.compressor(self.layout, config)?);
        }
        let mut step_time = 0.0;
        for (plan, g) in plans.iter_mut().zip(self.grads) {
            let t0 = Instant::now();
            let p = plan.step(g, 0)?;
            step_time += t0.elapsed().as_secs_f64();
            let b = wire::encode(p, &mut self.bytes)?;
            bits += b.total();
            if let Payload::Sparse(s) = p {
                index_bits.0 += b.indices;
                index_bits.1 += s.indices.len() as u64;
            }
            payloads.push(wire::decode(&self.bytes)?);
        }
        Ok(Sent {
            payloads,
            bits,
            index_bits,
            step_time,
        })
    }
}
