//! `gradsift demo`: compresses a realistic multi-layer gradient of K workers with every
//! method and prints bits, distortion and time (the default command of the binary).

use gradsift::{
    Aggregate, Backend, Compress, Config, DType, Layout, Mode, Payload, Scale, Statistics,
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

    let views: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
    let mut est: Vec<VarianceEstimate> = Vec::new();
    device
        .stats(&layout, workers)?
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

    let methods: Vec<(&str, Config)> = vec![
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
    ];
    println!(
        "{:<30} {:>10} {:>12} {:>12} {:>11} {:>10}",
        "method", "bits/elem", "bits/index", "entropy/idx", "rel. dist.", "ms/step"
    );
    let mut bytes = Vec::new();
    let mut agg_out = vec![0f32; n];
    for (name, mut config) in methods {
        let mut payloads = Vec::with_capacity(workers);
        let mut bits = 0u64;
        let mut index_bits = (0u64, 0u64);
        // Plans are built once per worker, as in a training loop; only the step is timed.
        let mut plans = Vec::with_capacity(workers);
        for w in 0..workers {
            config.worker = w as u32;
            plans.push(device.compressor(&layout, &config)?);
        }
        let mut step_time = 0.0;
        for (plan, g) in plans.iter_mut().zip(&grads) {
            let t0 = Instant::now();
            let p = plan.step(g, 0)?;
            step_time += t0.elapsed().as_secs_f64();
            let b = wire::encode(p, &mut bytes)?;
            bits += b.total();
            if let Payload::Sparse(s) = p {
                index_bits.0 += b.indices;
                index_bits.1 += s.indices.len() as u64;
            }
            payloads.push(wire::decode(&bytes)?);
        }
        let dt = step_time * 1e3 / workers as f64;
        let mut agg = device.aggregator(
            &layout,
            config.mode,
            gradsift::Average::OverWorkers,
            workers,
        )?;
        agg.aggregate(&payloads, &mut agg_out)?;
        let err: f64 = agg_out
            .iter()
            .zip(&mean)
            .map(|(&a, &b)| f64::from(a - b).powi(2))
            .sum();
        let norm: f64 = mean.iter().map(|&b| f64::from(b).powi(2)).sum();
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
            bits as f64 / (workers * n) as f64,
            err / norm
        );
    }
    println!(
        "\nbits/elem: wire bits per gradient element per worker; rel. dist.: ||aggregate - mean||^2 / ||mean||^2 after one step"
    );
    println!(
        "(error feedback carries the rest to later steps). entropy/idx: log2 C(n, k) / k, the floor for index bits."
    );
    Ok(())
}
