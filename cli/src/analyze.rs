//! `gradsift analyze`: the rate-distortion analysis of every compressor on your own
//! gradients (the seed paper's Fig. 7 and the rho of Fig. 8 for your data).
//!
//! The pipeline is [`analyze`] (files in, [`Report`] out), then [`render_table`],
//! [`write_json`] and [`super::plot::draw`] for the three outputs. Gradients enter as
//! [`StepData`], so sources other than files (the built-in MNIST default,
//! [`embedded_default`]) plug in through [`analyze_steps`].

use super::npy::{LoadError, NamedArray, read_arrays};
pub use super::report::{
    AverageArg, LayerInfo, MethodConfig, MethodReport, Report, StepStatistics, Summary,
};
use gradsift::rd::{self, StepMeasurement, StepState};
use gradsift::{Average, Backend, Config, Device, Layout, Method, Mode, Scale};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Help text of the input convention, shown by `gradsift analyze --help`.
pub const INPUT_HELP: &str = "\
INPUT: one .npz file per worker per step, named <prefix>w<K>_s<T>.npz (worker K = 0, 1, ...,
step T), holding that worker's gradient of that step as one array per layer, in the same order
and with the same shapes in every file. Pass the files, or a directory that holds them (files
not named that way are skipped). Files named otherwise are read as the workers of one step, in
the order given. A .npy file holds a whole gradient as one array (one layer), named arr_0
whatever the file is called, so worker0.npy and worker1.npy are two workers' gradients of
the same layer (matched by position, not by file name).

Writing them from PyTorch, after loss.backward() on worker `rank` at step `step`:

    import numpy as np
    np.savez(f\"grads_w{rank}_s{step}.npz\", *[p.grad.detach().cpu().float().numpy() for p in model.parameters()])

Save the local gradient, before it is averaged: under DistributedDataParallel run that
backward inside `with model.no_sync():` (otherwise every worker holds the same all-reduced
gradient and the noise variance is 0). np.savez keeps the arrays in the order given (arr_0,
arr_1, ...); np.savez(path, **dict(model.named_parameters())) style names work too, and
np.savez_compressed files are read as well. dtypes: float16, float32, float64.

With no INPUT, the analysis runs on real gradients generated in-process: those of the K = 5
workers of `gradsift train`'s built-in MNIST model (MLP 784-128-64-10, batch 32 each,
uncompressed momentum SGD) at steps 0, 10, 25, 50, 100, 150 and 200 (of the 500 of its 10-epoch
run; a few seconds of training), and also draws the plot to gradsift-analyze.png unless --plot
names another file.

MEMORY: the files are read one step at a time; a run holds one step's gradients of all K
workers plus every method's state (error feedback, momentum, payloads) for the methods it
analyses together. Estimated peak: 64 MiB + n K (12 + 10 G) bytes for n elements per worker
and G methods at a time (the default methods are 10: rTop-k, top-k and random-k at 3 ratios,
and sign). G is as large as --max-memory allows (default 512 MiB; all methods when they fit,
at least 1: each further group re-reads the files). Example: K = 5 workers of n = 4 M
elements need about 64 + 240 + 200 G MB: 0.5 GB one method at a time, 2.3 GB all 10 together.
A run whose one-method estimate exceeds the memory available (MemAvailable), or an explicit
--max-memory, fails up front saying how much it needs.";

/// Selection mode (SPEC §0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// One selection over the whole gradient.
    Global,
    /// Each layer selects on its own (sign: one scale per layer, as in the seed paper).
    PerLayer,
}

/// Arguments of `gradsift analyze`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_long_help = INPUT_HELP)]
pub struct AnalyzeArgs {
    /// Gradient files (.npz/.npy) or directories of them; see below for the naming scheme.
    /// None: the built-in MNIST model's workers' gradients, with the plot.
    pub inputs: Vec<PathBuf>,
    /// Backend that runs the compressors, the aggregation and the statistics: cpu, cuda,
    /// wgpu or auto (CUDA, then wgpu, then the CPU).
    #[arg(long, default_value_t = Backend::Cpu)]
    pub backend: Backend,
    /// Send ratios k/n, each in (0, 1], at most 32 of them: rTop-k, top-k and random-k run at
    /// each.
    #[arg(long, value_delimiter = ',', default_value = "0.001,0.01,0.1")]
    pub ratios: Vec<f64>,
    /// QSGD quantisation levels s (each 1..=127) to analyse after sign, one method each
    /// (`qsgd s=7`): stochastic rounding to s levels of each group's max |p| (SPEC §13),
    /// 1 + ceil(log2(s + 1)) bits per element. None by default.
    #[arg(long, value_delimiter = ',', value_name = "S")]
    pub qsgd: Vec<u8>,
    /// rTop-k candidate ratio r/n as a multiple of k/n, in [1, 1e6] (r/n capped at 1).
    #[arg(long, default_value_t = 4.0)]
    pub r_over_k: f64,
    /// Global or per-layer selection.
    #[arg(long, value_enum, default_value = "per-layer")]
    pub mode: ModeArg,
    /// Scale sent values by r/k (unbiased for the top-r vector; random-k becomes unbiased).
    #[arg(long)]
    pub unbiased: bool,
    /// How the server averages.
    #[arg(long, value_enum, default_value = "over-workers")]
    pub average: AverageArg,
    /// DGC momentum correction factor in [0, 1) (0: plain error feedback).
    #[arg(long, default_value_t = 0.0)]
    pub momentum: f32,
    /// Seed of the random-k keys (any u64).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also print one table per method with a row per step.
    #[arg(long)]
    pub per_step: bool,
    /// Write the report as JSON to this file ('-' for standard output).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Memory target in MiB, at least 64. The files are read one step at a time, and the
    /// methods are analysed in groups small enough to stay under this (each group re-reads
    /// the files); see MEMORY below. Given explicitly it is a hard limit: a run that cannot
    /// fit it even one method at a time fails before reading anything.
    #[arg(long, value_name = "MIB")]
    pub max_memory: Option<u64>,
    /// Draw the seed paper's Fig. 7 for this data (PNG). Without INPUT the plot is drawn
    /// anyway, to gradsift-analyze.png unless this names another file.
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
}

impl Default for AnalyzeArgs {
    fn default() -> Self {
        Self {
            inputs: Vec::new(),
            backend: Backend::Cpu,
            ratios: vec![0.001, 0.01, 0.1],
            qsgd: Vec::new(),
            r_over_k: 4.0,
            mode: ModeArg::PerLayer,
            unbiased: false,
            average: AverageArg::OverWorkers,
            momentum: 0.0,
            seed: 0,
            per_step: false,
            json: None,
            max_memory: None,
            plot: None,
        }
    }
}

/// The error of `gradsift analyze`: the CLI's one error type.
pub use super::error::CliError as AnalyzeError;

/// The `K` workers' gradients of one step, flattened in layer order.
#[derive(Debug, Clone)]
pub struct StepData {
    /// Training step `t`.
    pub step: u64,
    /// One buffer per worker, in worker order.
    pub grads: Vec<Vec<f32>>,
}

/// A compressor to analyse.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodSpec {
    /// Display name (`rtopk r=4% k=1%`, `topk 1%`, `randomk 1%`, `sign`).
    pub name: String,
    /// Its configuration (the worker id is set per worker).
    pub config: Config,
}

fn percent(x: f64) -> String {
    let s = format!("{:.4}", x * 100.0);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

/// Most ratios `--ratios` takes (each adds three methods).
pub const MAX_RATIOS: usize = 32;
/// Largest `--r-over-k`; `r` is capped at `n` anyway.
pub const MAX_R_OVER_K: f64 = 1e6;

/// The methods of an analysis: rTop-k, top-k and random-k at each ratio, then scaled sign,
/// then QSGD at each of `--qsgd`'s levels.
pub fn methods(args: &AnalyzeArgs) -> Result<Vec<MethodSpec>, AnalyzeError> {
    if args.ratios.is_empty() {
        return Err(AnalyzeError::Usage(
            "--ratios needs at least one ratio".into(),
        ));
    }
    if let Some(r) = args.ratios.iter().find(|r| !(**r > 0.0 && **r <= 1.0)) {
        return Err(AnalyzeError::Usage(format!(
            "--ratios must lie in (0, 1], got {r}"
        )));
    }
    if args.qsgd.len() > MAX_RATIOS {
        return Err(AnalyzeError::Usage(format!(
            "--qsgd takes at most {MAX_RATIOS} levels, got {}",
            args.qsgd.len()
        )));
    }
    if args.ratios.len() > MAX_RATIOS {
        return Err(AnalyzeError::Usage(format!(
            "--ratios takes at most {MAX_RATIOS} ratios, got {}",
            args.ratios.len()
        )));
    }
    if !(args.r_over_k >= 1.0 && args.r_over_k <= MAX_R_OVER_K) {
        return Err(AnalyzeError::Usage(format!(
            "--r-over-k must lie in [1, {MAX_R_OVER_K:e}], got {}",
            args.r_over_k
        )));
    }
    if !(0.0..1.0).contains(&args.momentum) {
        return Err(AnalyzeError::Usage(format!(
            "--momentum must lie in [0, 1), got {}",
            args.momentum
        )));
    }
    let mode = match args.mode {
        ModeArg::Global => Mode::Global,
        ModeArg::PerLayer => Mode::PerLayer,
    };
    let finish = |mut c: Config| {
        c.mode = mode;
        c.scale = if args.unbiased {
            Scale::Unbiased
        } else {
            Scale::None
        };
        c.momentum = args.momentum;
        c.seed = args.seed;
        c
    };
    let mut out = Vec::new();
    for &k in &args.ratios {
        let r = (k * args.r_over_k).min(1.0);
        out.push(MethodSpec {
            name: format!("rtopk r={} k={}", percent(r), percent(k)),
            config: finish(Config::rtopk(r, k)),
        });
        out.push(MethodSpec {
            name: format!("topk {}", percent(k)),
            config: finish(Config::topk(k)),
        });
        out.push(MethodSpec {
            name: format!("randomk {}", percent(k)),
            config: finish(Config::randomk(k)),
        });
    }
    out.push(MethodSpec {
        name: "sign".into(),
        config: finish(Config::sign()),
    });
    for &s in &args.qsgd {
        out.push(MethodSpec {
            name: format!("qsgd s={s}"),
            config: finish(Config::qsgd(s)),
        });
    }
    for m in &out {
        m.config
            .validate()
            .map_err(|e| AnalyzeError::Usage(format!("{}: {e}", m.name)))?;
    }
    Ok(out)
}

fn method_config(c: &Config) -> MethodConfig {
    let ratio = |x: gradsift::Count| match x {
        gradsift::Count::Ratio(r) => Some(r),
        gradsift::Count::Exact(_) => None,
    };
    let (r_ratio, k_ratio) = match c.method {
        Method::RTopK { r, k } => (ratio(r), ratio(k)),
        Method::TopK { k } | Method::RandomK { k } => (None, ratio(k)),
        Method::Sign | Method::Qsgd { .. } => (None, None),
    };
    let kind = c.method.kind().name();
    MethodConfig {
        kind,
        levels: match c.method {
            Method::Qsgd { levels, .. } => Some(levels),
            _ => None,
        },
        r_ratio,
        k_ratio,
        mode: match c.mode {
            Mode::Global => "global",
            Mode::PerLayer => "per-layer",
        },
        unbiased: c.scale == Scale::Unbiased,
        momentum: c.momentum,
        seed: c.seed,
    }
}

/// Splits `<prefix>w<K>_s<T>.npz` (or `.npy`) into `(K, T)`.
pub fn parse_file_name(name: &str) -> Option<(usize, u64)> {
    let lower = name.to_ascii_lowercase();
    let stem = lower
        .strip_suffix(".npz")
        .or_else(|| lower.strip_suffix(".npy"))?;
    let (head, step) = stem.rsplit_once("_s")?;
    let pos = head.rfind('w')?;
    let worker = &head[pos + 1..];
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(worker) || !digits(step) {
        return None;
    }
    if pos > 0 && head.as_bytes()[pos - 1].is_ascii_alphanumeric() {
        return None;
    }
    Some((worker.parse().ok()?, step.parse().ok()?))
}

/// The gradient files of an analysis: per step (ascending), one path per worker.
#[derive(Debug, Clone, PartialEq)]
pub struct InputFiles {
    /// `(step, paths by worker)`.
    pub steps: Vec<(u64, Vec<PathBuf>)>,
    /// Files skipped in directories (not named `<prefix>w<K>_s<T>.npz`).
    pub skipped: Vec<PathBuf>,
}

fn is_gradient_file(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npz") || e.eq_ignore_ascii_case("npy"))
}

/// Finds and groups the gradient files of `inputs` (files or directories).
pub fn discover(inputs: &[PathBuf]) -> Result<InputFiles, AnalyzeError> {
    let mut named = Vec::new();
    let mut unnamed = Vec::new();
    let mut skipped = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let entries = std::fs::read_dir(input)
                .map_err(|e| AnalyzeError::Usage(format!("{}: {e}", input.display())))?;
            let mut paths: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_gradient_file(p))
                .collect();
            paths.sort();
            let before = named.len();
            for p in paths {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                match name.as_deref().and_then(parse_file_name) {
                    Some(ws) => named.push((ws, p)),
                    None => skipped.push(p),
                }
            }
            if named.len() == before {
                return Err(AnalyzeError::Usage(format!(
                    "{}: no gradient files named like grads_w<K>_s<T>.npz (see --help)",
                    input.display()
                )));
            }
        } else if input.is_file() {
            let name = input.file_name().map(|n| n.to_string_lossy().into_owned());
            match name.as_deref().and_then(parse_file_name) {
                Some(ws) => named.push((ws, input.clone())),
                None => unnamed.push(input.clone()),
            }
        } else {
            return Err(AnalyzeError::Usage(format!(
                "{}: no such file or directory",
                input.display()
            )));
        }
    }
    if !unnamed.is_empty() {
        if !named.is_empty() {
            return Err(AnalyzeError::Usage(format!(
                "cannot mix files named like grads_w<K>_s<T>.npz with others such as {}: \
                 name them all by worker and step, or pass only the K files of one step",
                unnamed[0].display()
            )));
        }
        let steps = vec![(0, unnamed)];
        check_workers(&steps)?;
        return Ok(InputFiles { steps, skipped });
    }
    let mut by_step: BTreeMap<u64, BTreeMap<usize, PathBuf>> = BTreeMap::new();
    for ((w, t), p) in named {
        if let Some(prev) = by_step.entry(t).or_default().insert(w, p.clone()) {
            return Err(AnalyzeError::Usage(format!(
                "two files for worker {w} at step {t}: {} and {}",
                prev.display(),
                p.display()
            )));
        }
    }
    let mut steps = Vec::new();
    let mut workers = None;
    for (t, files) in by_step {
        let k = *workers.get_or_insert(files.len());
        for w in 0..k.max(files.len()) {
            if !files.contains_key(&w) {
                let example = files.values().next().expect("non-empty");
                return Err(AnalyzeError::Usage(format!(
                    "step {t} has no file for worker {w} (other steps have {k} workers; next to {})",
                    example.display()
                )));
            }
        }
        steps.push((t, files.into_values().collect()));
    }
    check_workers(&steps)?;
    Ok(InputFiles { steps, skipped })
}

fn check_workers(steps: &[(u64, Vec<PathBuf>)]) -> Result<(), AnalyzeError> {
    match steps.first() {
        None => Err(AnalyzeError::Usage("no gradient files given".into())),
        Some((_, files)) if files.len() < 2 => Err(AnalyzeError::Usage(format!(
            "found the gradients of only {} worker ({}); the analysis needs K >= 2 workers' \
             gradients of the same step",
            files.len(),
            files[0].display()
        ))),
        Some(_) => Ok(()),
    }
}

fn shape_str(s: &[u64]) -> String {
    match s {
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            s.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Reads the `K` files of one step, checks them against the reference layers (names,
/// shapes, order; the first file read sets the reference when `layers` is empty) and for
/// non-finite values, and flattens each worker's arrays in layer order.
pub fn load_step(
    step: u64,
    files: &[PathBuf],
    layers: &mut Vec<LayerInfo>,
    reference: &mut Option<PathBuf>,
) -> Result<StepData, AnalyzeError> {
    let mut grads = Vec::with_capacity(files.len());
    for path in files {
        let arrays = read_arrays(path)?;
        if layers.is_empty() {
            *layers = arrays
                .iter()
                .map(|a| LayerInfo {
                    name: a.name.clone(),
                    shape: a.shape.clone(),
                    n: a.data.len(),
                })
                .collect();
            *reference = Some(path.clone());
        }
        let refp = reference.as_deref().unwrap_or(path);
        check_arrays(path, &arrays, layers, refp)?;
        let mut flat = Vec::with_capacity(layers.iter().map(|l| l.n).sum());
        for a in &arrays {
            flat.extend_from_slice(&a.data);
        }
        grads.push(flat);
    }
    Ok(StepData { step, grads })
}

fn check_arrays(
    path: &Path,
    arrays: &[NamedArray],
    layers: &[LayerInfo],
    reference: &Path,
) -> Result<(), LoadError> {
    if arrays.len() != layers.len() {
        return Err(LoadError::file(
            path,
            format!(
                "{} arrays, but {} has {}: every worker and step must hold the same layers",
                arrays.len(),
                reference.display(),
                layers.len()
            ),
        ));
    }
    for (i, (a, l)) in arrays.iter().zip(layers).enumerate() {
        if a.name != l.name {
            return Err(LoadError::array(
                path,
                &a.name,
                format!(
                    "layer {i} is '{}' in {}: arrays must come in the same order everywhere",
                    l.name,
                    reference.display()
                ),
            ));
        }
        if a.shape != l.shape {
            return Err(LoadError::array(
                path,
                &a.name,
                format!(
                    "shape {} differs from {} in {}",
                    shape_str(&a.shape),
                    shape_str(&l.shape),
                    reference.display()
                ),
            ));
        }
        if let Some(first) = a.data.iter().position(|v| !v.is_finite()) {
            let count = a.data.iter().filter(|v| !v.is_finite()).count();
            return Err(LoadError::array(
                path,
                &a.name,
                format!(
                    "{count} non-finite value(s) (NaN or inf, after conversion to float32), \
                     the first at flat index {first}"
                ),
            ));
        }
    }
    Ok(())
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, c) = v.fold((0.0, 0usize), |(s, c), x| (s + x, c + 1));
    if c == 0 { 0.0 } else { s / c as f64 }
}

fn summarize(steps: &[StepMeasurement]) -> Summary {
    let bits: f64 = steps.iter().map(|m| m.bits as f64).sum();
    let r_sum_bits: f64 = steps.iter().map(|m| m.r_sum_bits).sum();
    Summary {
        bits_per_element: mean(steps.iter().map(|m| m.bits_per_element)),
        sent_per_coordinate: mean(steps.iter().map(|m| m.sent_per_coordinate())),
        d_c: mean(steps.iter().map(|m| m.d_c)),
        d: mean(steps.iter().map(|m| m.d)),
        rho: mean(steps.iter().map(|m| m.rho)),
        r_sum: mean(steps.iter().map(|m| m.r_sum_per_coordinate())),
        r_in: mean(steps.iter().map(|m| m.r_in_per_coordinate())),
        r_sum_p1: mean(steps.iter().map(|m| m.r_sum_p1_bits / m.n.max(1) as f64)),
        efficiency: if bits > 0.0 { r_sum_bits / bits } else { 0.0 },
    }
}

/// The sign-model figures of one step (Fig. 7), size-weighted over the non-empty layers. An
/// empty step (`n = 0`) reports 0 for all of them, and so does a layer whose two variances
/// are 0 (its gradient is the constant 0: nothing to send).
fn statistics(m: &StepMeasurement) -> StepStatistics {
    let k = m.workers;
    let mut d_sign = 0.0;
    let mut r_sum_sign = 0.0;
    let mut r_in_sign = 0.0;
    for l in m.layers.iter().filter(|l| l.n > 0) {
        let d = rd::sign_distortion(l.sigma_x2, l.sigma_n2, k);
        d_sign += l.n as f64 * d;
        r_sum_sign += l.n as f64 * rd::sum_rate(d, l.sigma_x2, l.sigma_n2, k);
        // K/2 log2(1 + pi/(pi - 2)) whatever the (non-zero) variances.
        r_in_sign += l.n as f64 * rd::independent_rate(d, l.sigma_x2, l.sigma_n2, k);
    }
    let n = m.n.max(1) as f64;
    StepStatistics {
        step: m.step,
        sigma_x2: m.sigma_x2,
        sigma_n2: m.sigma_n2,
        layers: m.layers.iter().map(|l| (l.sigma_x2, l.sigma_n2)).collect(),
        d_sign: d_sign / n,
        r_sum_sign: r_sum_sign / n,
        r_in_sign: r_in_sign / n,
    }
}

/// Runs every method over the steps (in the order given, error feedback carried from step to
/// step per method) and collects the report. `progress` advances once per method and step.
pub fn analyze_steps(
    layers: Vec<LayerInfo>,
    workers: usize,
    steps: impl Iterator<Item = Result<StepData, AnalyzeError>>,
    methods: &[MethodSpec],
    average: Average,
    device: &Device,
    progress: &ProgressBar,
) -> Result<Report, AnalyzeError> {
    let mut layers = layers;
    let mut layout: Option<Layout> = None;
    let mut states: Vec<StepState> = methods
        .iter()
        .map(|_| StepState::new(device.clone()))
        .collect();
    let mut results: Vec<Vec<StepMeasurement>> = vec![Vec::new(); methods.len()];
    let mut stats = Vec::new();
    for data in steps {
        let data = data?;
        if layers.is_empty() {
            layers = vec![LayerInfo {
                name: "gradient".into(),
                shape: vec![data.grads.first().map_or(0, |g| g.len() as u64)],
                n: data.grads.first().map_or(0, Vec::len),
            }];
        }
        let layout = match &layout {
            Some(l) => l,
            None => {
                let sizes: Vec<usize> = layers.iter().map(|l| l.n).collect();
                layout.insert(Layout::new(&sizes).map_err(|e| AnalyzeError::Usage(e.to_string()))?)
            }
        };
        let views: Vec<&[f32]> = data.grads.iter().map(|g| g.as_slice()).collect();
        for (i, m) in methods.iter().enumerate() {
            let r = rd::measure_step(
                &views,
                layout,
                &m.config,
                average,
                &mut states[i],
                data.step,
            )
            .map_err(|source| AnalyzeError::Compute {
                method: m.name.clone(),
                step: data.step,
                source,
            })?;
            if i == 0 {
                stats.push(statistics(&r));
            }
            results[i].push(r);
            progress.inc(1);
        }
    }
    let methods = methods
        .iter()
        .zip(results)
        .map(|(m, steps)| MethodReport {
            name: m.name.clone(),
            config: method_config(&m.config),
            summary: summarize(&steps),
            steps,
        })
        .collect();
    Ok(Report {
        backend: device.backend().to_string(),
        workers,
        n: layers.iter().map(|l| l.n).sum(),
        layers,
        statistics: stats,
        average: match average {
            Average::OverWorkers => "over-workers",
            Average::OverSenders => "over-senders",
        },
        methods,
        notes: Vec::new(),
    })
}

/// Steps of the built-in default, early to late: `gradsift train`'s default run has 50 steps
/// per epoch (8,000 training images over 5 workers, batch 32), so these span its first four
/// epochs (test accuracy 92.7% after the fourth, 94.7% after all ten, training loss 0.83 in the
/// first epoch and 0.17 in the fourth); stopping there keeps the in-process training to a few
/// seconds.
pub const EMBEDDED_STEPS: [usize; 7] = [0, 10, 25, 50, 100, 150, 200];

/// Where a bare `gradsift analyze` draws its plot.
pub const EMBEDDED_PLOT: &str = "gradsift-analyze.png";

/// The input when none is given: the `K` workers' gradients of the built-in MNIST model at
/// [`EMBEDDED_STEPS`], with one layer per parameter tensor (`fc1.weight`, `fc1.bias`, ...).
pub fn embedded_default() -> Result<(Vec<LayerInfo>, usize, Vec<StepData>), AnalyzeError> {
    embedded_default_at(&EMBEDDED_STEPS)
}

/// [`embedded_default`] at other steps (strictly ascending, below 500): the gradients are
/// generated in-process by [`super::train::worker_gradients_at`] on the uncompressed
/// baseline of `gradsift train`'s default configuration (deterministic, seed 0).
pub fn embedded_default_at(
    steps: &[usize],
) -> Result<(Vec<LayerInfo>, usize, Vec<StepData>), AnalyzeError> {
    use super::train::{Mnist, Model, TrainConfig, TrainMethod, worker_gradients_at};
    let cfg = TrainConfig {
        method: TrainMethod::None,
        ..TrainConfig::default()
    };
    // The same split as `gradsift train`, so these are the gradients its baseline computes.
    let (train_set, _) = Mnist::embedded()?.split(2000);
    let layers = Model::new(cfg.model, &cfg.hidden, cfg.seed)?
        .parameters()
        .into_iter()
        .map(|(name, shape)| LayerInfo {
            name,
            n: shape.iter().product(),
            shape: shape.into_iter().map(|d| d as u64).collect(),
        })
        .collect();
    let grads = worker_gradients_at(&cfg, &train_set, steps)?;
    let steps = steps
        .iter()
        .zip(grads)
        .map(|(&t, grads)| StepData {
            step: t as u64,
            grads,
        })
        .collect();
    Ok((layers, cfg.workers, steps))
}

/// Work (elements x workers x methods x steps) above which a progress bar is shown.
const PROGRESS_WORK: f64 = 2e8;

fn progress_bar(total: u64, work: f64) -> ProgressBar {
    if work < PROGRESS_WORK {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{spinner} {bar:40} {pos}/{len} method-steps, {eta} left")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// Fixed part of [`memory_plan`]'s estimate: the program, its tables and small buffers.
pub const MEMORY_FIXED: u64 = 64 << 20;
/// Bytes per element per worker of one step's gradients and of reading them.
pub const MEMORY_PER_ELEMENT: u64 = 12;
/// Bytes per element per worker of one method's state (error feedback, momentum, selection
/// scratch, payloads, the server's estimate): measured about 9 on the CPU backend.
pub const MEMORY_PER_METHOD: u64 = 10;
/// `--max-memory`'s default, MiB.
pub const DEFAULT_MAX_MEMORY_MIB: u64 = 512;

/// How an analysis fits in memory: methods analysed together, the budget and the estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Methods analysed together (each group is one pass over the files).
    pub group: usize,
    /// The budget aimed at, bytes.
    pub budget: u64,
    /// Estimated peak of the plan, bytes.
    pub peak: u64,
}

/// Estimated peak bytes of analysing `group` methods together on `workers` gradients of `n`
/// elements: [`MEMORY_FIXED`] `+ n K (`[`MEMORY_PER_ELEMENT`]` + `[`MEMORY_PER_METHOD`]` G)`.
pub fn memory_estimate(n: usize, workers: usize, group: usize) -> u64 {
    let nk = (n as u64).saturating_mul(workers as u64);
    MEMORY_FIXED.saturating_add(nk.saturating_mul(
        MEMORY_PER_ELEMENT.saturating_add(MEMORY_PER_METHOD.saturating_mul(group as u64)),
    ))
}

/// The memory available to a new process (`MemAvailable` of /proc/meminfo), when known.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// Chooses how many of `methods` to analyse together: as many as keep the estimate under
/// `max_memory_mib` (default [`DEFAULT_MAX_MEMORY_MIB`]), at least one.
///
/// # Errors
///
/// [`AnalyzeError::Usage`] when `max_memory_mib` is below 64, or when even one method at a
/// time is estimated above an explicit `max_memory_mib` or above `available` (bytes).
pub fn memory_plan(
    n: usize,
    workers: usize,
    methods: usize,
    max_memory_mib: Option<u64>,
    available: Option<u64>,
) -> Result<MemoryPlan, AnalyzeError> {
    if let Some(m) = max_memory_mib.filter(|&m| !(64..=(1 << 40)).contains(&m)) {
        return Err(AnalyzeError::Usage(format!(
            "--max-memory must lie in [64, 2^40] MiB, got {m}"
        )));
    }
    let budget = max_memory_mib.unwrap_or(DEFAULT_MAX_MEMORY_MIB) << 20;
    let one = memory_estimate(n, workers, 1);
    let mib = |b: u64| b.div_ceil(1 << 20);
    if max_memory_mib.is_some() && one > budget {
        return Err(AnalyzeError::Usage(format!(
            "this analysis (K = {workers} workers x n = {n} elements) needs about {} MiB even \
                 one method at a time, over --max-memory {} MiB",
            mib(one),
            mib(budget)
        )));
    }
    if let Some(avail) = available.filter(|&a| one > a) {
        return Err(AnalyzeError::Usage(format!(
            "this analysis (K = {workers} workers x n = {n} elements) needs about {} MiB even \
                 one method at a time, but only {} MiB of memory is available",
            mib(one),
            mib(avail)
        )));
    }
    let methods = methods.max(1);
    let group = (1..=methods)
        .rev()
        .find(|&g| memory_estimate(n, workers, g) <= budget)
        .unwrap_or(1);
    Ok(MemoryPlan {
        group,
        budget,
        peak: memory_estimate(n, workers, group),
    })
}

/// Runs the analysis of `args` (files, or the embedded default when there are none) and
/// returns the report; prints nothing except the progress bar on long inputs.
pub fn analyze(args: &AnalyzeArgs) -> Result<Report, AnalyzeError> {
    let (device, device_notes) =
        super::backend::open(args.backend).map_err(|e| AnalyzeError::Usage(e.to_string()))?;
    let methods = methods(args)?;
    let average = Average::from(args.average);
    let mut notes = device_notes;
    let mut report = if args.inputs.is_empty() {
        let (layers, workers, steps) = embedded_default()?;
        notes.push(format!(
            "no INPUT: analysing the built-in MNIST model's gradients (`gradsift train`'s \
             baseline, MLP 784-128-64-10, K = {workers} workers, steps {})",
            EMBEDDED_STEPS.map(|t| t.to_string()).join(", ")
        ));
        let pb = ProgressBar::hidden();
        analyze_steps(
            layers,
            workers,
            steps.into_iter().map(Ok),
            &methods,
            average,
            &device,
            &pb,
        )?
    } else {
        let files = discover(&args.inputs)?;
        for s in &files.skipped {
            notes.push(format!(
                "skipped {} (not named like grads_w<K>_s<T>.npz)",
                s.display()
            ));
        }
        let workers = files.steps[0].1.len();
        let size = std::fs::metadata(&files.steps[0].1[0]).map_or(0, |m| m.len());
        let total = (files.steps.len() * methods.len()) as u64;
        // File size / 4 approximates the element count of a float32 gradient.
        let work = size as f64 / 4.0 * workers as f64 * total as f64;
        let pb = progress_bar(total, work);
        // Up front, from one file (one worker's gradient): will the run fit?
        let n: usize = read_arrays(&files.steps[0].1[0])?
            .iter()
            .map(|a| a.data.len())
            .sum();
        let plan = memory_plan(
            n,
            workers,
            methods.len(),
            args.max_memory,
            available_memory(),
        )?;
        let mut layers = Vec::new();
        let mut reference = None;
        // The layer list is set by the first file; load that step first so it is known.
        let (first_step, first_files) = &files.steps[0];
        let first = load_step(*first_step, first_files, &mut layers, &mut reference)?;
        if plan.group < methods.len() {
            notes.push(format!(
                "analysing the {} methods {} at a time (each group re-reads the files) to stay \
                 within {} MiB; estimated peak {} MiB",
                methods.len(),
                plan.group,
                plan.budget >> 20,
                plan.peak >> 20
            ));
        }
        let mut first = Some(first);
        let mut merged: Option<Report> = None;
        for group in methods.chunks(plan.group) {
            let rest_from = usize::from(first.is_some());
            let head = first.take().map(Ok);
            let layers_ref = &layers;
            let reference_ref = &reference;
            let rest = files.steps[rest_from..].iter().map(move |(t, f)| {
                let mut l = layers_ref.clone();
                let mut r = reference_ref.clone();
                load_step(*t, f, &mut l, &mut r)
            });
            let steps = head.into_iter().chain(rest);
            let r = analyze_steps(layers.clone(), workers, steps, group, average, &device, &pb);
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    pb.finish_and_clear();
                    return Err(e);
                }
            };
            match &mut merged {
                None => merged = Some(r),
                Some(m) => m.methods.extend(r.methods),
            }
        }
        pb.finish_and_clear();
        merged.expect("at least one method")
    };
    report.notes.extend(notes);
    Ok(report)
}

/// `x` in a fixed width: scientific for small or large magnitudes, `inf`, or `-` for NaN.
fn num(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x.is_infinite() {
        if x > 0.0 { "inf".into() } else { "-inf".into() }
    } else if x == 0.0 {
        "0".into()
    } else if x.abs() >= 1e-2 && x.abs() < 1e5 {
        format!("{x:.4}")
    } else {
        format!("{x:.3e}")
    }
}

const COLUMNS: [&str; 8] = [
    "bits/elem",
    "sent/coord",
    "D",
    "rho",
    "R_sum(D)",
    "R_in(D)",
    "P1 R_sum",
    "efficiency",
];

fn row(label: &str, width: usize, s: &Summary) -> String {
    let cells = [
        s.bits_per_element,
        s.sent_per_coordinate,
        s.d,
        s.rho,
        s.r_sum,
        s.r_in,
        s.r_sum_p1,
        s.efficiency,
    ];
    let mut line = format!("{label:<width$}");
    for c in cells {
        let _ = write!(line, " {:>11}", num(c));
    }
    line
}

fn header(first: &str, width: usize) -> String {
    let mut line = format!("{first:<width$}");
    for c in COLUMNS {
        let _ = write!(line, " {c:>11}");
    }
    line
}

/// The report as text: one row per method (means over steps), and with `per_step` one table
/// per method with a row per step.
pub fn render_table(report: &Report, per_step: bool) -> String {
    let mut out = String::new();
    let steps: Vec<u64> = report.statistics.iter().map(|s| s.step).collect();
    let step_text = match (steps.first(), steps.last()) {
        (Some(a), Some(b)) if steps.len() > 1 => format!("{} steps ({a}..{b})", steps.len()),
        _ => "1 step".into(),
    };
    let _ = writeln!(
        out,
        "gradsift analyze: K = {} workers, {step_text}, {} layers, n = {} elements, backend {}",
        report.workers,
        report.layers.len(),
        report.n,
        report.backend
    );
    let sx = mean(report.statistics.iter().map(|s| s.sigma_x2));
    let sn = mean(report.statistics.iter().map(|s| s.sigma_n2));
    let r_sum_sign = mean(report.statistics.iter().map(|s| s.r_sum_sign));
    let r_in_sign = mean(report.statistics.iter().map(|s| s.r_in_sign));
    let _ = writeln!(
        out,
        "sigma_X^2 = {}, sigma_N^2 = {} (size-weighted, mean over steps); at the ideal sign \
         distortion R_in = {} and R_sum = {} bits/coord\n",
        num(sx),
        num(sn),
        num(r_in_sign),
        num(r_sum_sign)
    );
    let width = report
        .methods
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let _ = writeln!(out, "{}", header("method", width));
    for m in &report.methods {
        let _ = writeln!(out, "{}", row(&m.name, width, &m.summary));
    }
    let _ = writeln!(
        out,
        "\nbits/elem: wire bits per gradient element per worker. sent/coord = K x bits/elem, the unit\n\
         of R_sum(D) and R_in(D): bits per coordinate summed over the K workers. D = sigma_N^2/K +\n\
         ||g_hat - ybar||^2/n per coordinate; rho = D K / sigma_N^2 - 1 (Fig. 8). P1 R_sum: the least\n\
         sum-rate for the same total squared error split optimally across layers (Corollary 1).\n\
         efficiency = R_sum(D) / sent: 1 is the information-theoretic limit for unbiased Gaussian\n\
         aggregation (error feedback and biased methods are outside the model, so it is a yardstick)."
    );
    if per_step {
        for m in &report.methods {
            let _ = writeln!(out, "\n{}", m.name);
            let _ = writeln!(out, "{}", header("step", 8));
            for s in &m.steps {
                let sum = summarize(std::slice::from_ref(s));
                let _ = writeln!(out, "{}", row(&s.step.to_string(), 8, &sum));
            }
        }
    }
    out
}

/// Writes the report as pretty JSON (`-` for standard output). Infinite rates become `null`.
pub fn write_json(report: &Report, path: &Path) -> Result<(), AnalyzeError> {
    let text = serde_json::to_string_pretty(report).map_err(|e| AnalyzeError::Output {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if path == Path::new("-") {
        println!("{text}");
        return Ok(());
    }
    std::fs::write(path, text + "\n").map_err(|e| AnalyzeError::Output {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Where [`run`] draws the plot: `--plot`, else [`EMBEDDED_PLOT`] when there is no input (a
/// bare `gradsift analyze` is the demonstration, so it shows the figure too), else nowhere.
pub fn plot_path(args: &AnalyzeArgs) -> Option<PathBuf> {
    args.plot
        .clone()
        .or_else(|| args.inputs.is_empty().then(|| PathBuf::from(EMBEDDED_PLOT)))
}

/// `gradsift analyze`: analysis, table on stdout, notes on stderr, then JSON and plot.
pub fn run(args: &AnalyzeArgs) -> Result<(), AnalyzeError> {
    let report = analyze(args)?;
    for n in &report.notes {
        eprintln!("gradsift analyze: {n}");
    }
    let to_stdout = args.json.as_deref() == Some(Path::new("-"));
    let table = render_table(&report, args.per_step);
    if to_stdout {
        eprint!("{table}");
    } else {
        print!("{table}");
    }
    if let Some(p) = &args.json {
        write_json(&report, p)?;
    }
    if let Some(p) = &plot_path(args) {
        super::plot::draw(&report, p)?;
        eprintln!("gradsift analyze: wrote the plot to {}", p.display());
    }
    Ok(())
}
