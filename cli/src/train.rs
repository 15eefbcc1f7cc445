//! `gradsift train`: distributed SGD with compressed aggregation on real data.
//!
//! A simulated cluster in one process: `K` workers, each with its own shard of the embedded
//! MNIST digits, compute gradients of the same MLP (candle's autograd) on their own
//! mini-batches; gradsift compresses each worker's flattened gradient (one layer per
//! parameter tensor) with error feedback, DGC momentum correction and DGC's exponential
//! sparsity warm-up; the payloads travel through the wire format; the server averages them
//! (SPEC §7) and applies the update. Every step also estimates `sigma_X^2` and `sigma_N^2`
//! and the rate-distortion efficiency of what was sent ([`gradsift::rd::measure_step`]).

use super::SplitMix;
/// The error of `gradsift train`: the CLI's one error type.
pub use super::error::CliError as TrainError;
use super::error::Result;
use super::mnist::shuffle;
pub use super::mnist::{Mnist, PIXELS};
pub use super::model::{Arch, Model};
pub use super::report::AverageArg;
use gradsift::dist::reduce::{self, Reduce, SharedScratch, SparseAllReduce, Traffic};
use gradsift::dist::{self, InProcess, Transport};
use gradsift::rd::{self, StepMeasurement};
use gradsift::{
    Aggregate, Aggregator, Average, Backend, Compress, Compressor, Config, Count, Device, Layout,
    MethodKind, Mode, Payload, QSGD_MAX_LEVELS, Scale, SparsePayload, Statistics, Stats,
    VarianceEstimate, VarianceTracker, wire,
};
use std::fmt;
use std::ops::Range;

/// The compressor a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrainMethod {
    /// rTop-k (r = `r_over_k * k`).
    Rtopk,
    /// Top-k.
    Topk,
    /// Random-k.
    Randomk,
    /// Scaled sign (1 bit per element).
    Sign,
    /// QSGD stochastic quantisation at [`TrainConfig::levels`] levels (SPEC §13), with error
    /// feedback: `1 + ceil(log2(levels + 1))` bits per element plus a scale per group.
    Qsgd,
    /// Per-layer rTop-k (r = `r_over_k * k_l`; `--r-over-k 1` makes it top-k) whose `k_l`
    /// are re-allocated every [`TrainConfig::adapt_every`] steps under the uniform per-layer
    /// budget `sum_l ceil(ratio n_l)`: problem P1 ([`rd::allocate_counts`]) on the streaming
    /// per-layer variance estimates, at the squared error the last step reached.
    Adaptive,
    /// No compression: the uncompressed baseline (32 bits per element).
    None,
}

impl TrainMethod {
    /// Whether the codec sends every element (sign, QSGD): `--ratio` and the sparsity
    /// warm-up do not apply to it.
    pub fn is_dense(self) -> bool {
        matches!(self, TrainMethod::Sign | TrainMethod::Qsgd)
    }

    /// The library's method this one runs as is, whose name (gradsift's one table,
    /// [`MethodKind::name`]) it takes; `None` for the two that are this command's own.
    pub fn codec(self) -> Option<MethodKind> {
        match self {
            TrainMethod::Rtopk => Some(MethodKind::RTopK),
            TrainMethod::Topk => Some(MethodKind::TopK),
            TrainMethod::Randomk => Some(MethodKind::RandomK),
            TrainMethod::Sign => Some(MethodKind::Sign),
            TrainMethod::Qsgd => Some(MethodKind::Qsgd),
            TrainMethod::Adaptive | TrainMethod::None => None,
        }
    }
}

impl fmt::Display for TrainMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match (self, self.codec()) {
            (_, Some(kind)) => kind.name(),
            (TrainMethod::Adaptive, _) => "adaptive",
            _ => "none",
        })
    }
}

/// One training run's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// The compressor.
    pub method: TrainMethod,
    /// Fraction of each gradient sent, `k / n` (compression `1 - ratio`): 0.01 is 99%.
    pub ratio: f64,
    /// rTop-k's `r / k`; the rTop-k paper uses the number of workers.
    pub r_over_k: f64,
    /// Workers `K`.
    pub workers: usize,
    /// Seed of the initial weights, the batches and the random keys.
    pub seed: u64,
    /// Passes over each worker's shard.
    pub epochs: usize,
    /// Mini-batch per worker.
    pub batch: usize,
    /// Learning rate.
    pub lr: f32,
    /// Momentum: DGC momentum correction on the workers for compressed runs, plain momentum
    /// SGD on the server for the baseline (the same dynamics without compression).
    pub momentum: f32,
    /// Epochs of DGC's exponential sparsity warm-up (ratios 25%, 6.25%, ... until `ratio`).
    pub warmup_epochs: usize,
    /// The network: the MLP (default) or the small CNN.
    pub model: Arch,
    /// Hidden layer widths of the MLP (the CNN's shape is fixed).
    pub hidden: Vec<usize>,
    /// Per-layer selection instead of global.
    pub per_layer: bool,
    /// Steps per epoch cap (0: a full pass); for quick tests.
    pub max_steps_per_epoch: usize,
    /// Baseline only (`method = None`): `Some(rho)` adds i.i.d. Gaussian noise of variance
    /// `rho sigma_Nl^2(t) / K` per coordinate to the exact average of each layer, so that the
    /// server's estimate has `D(t) = sigma_N^2(t)/K (1 + rho)` (the seed paper's Fig. 8), and
    /// records a [`StepMeasurement`] per step with `R_sum` at that `D`. `Some(0.0)` records the
    /// ideal-gradient statistics of Fig. 6 without adding noise.
    pub baseline_noise_rho: Option<f64>,
    /// Stop as soon as an exponential moving average (factor 0.9) of the per-step training
    /// loss reaches this value (Fig. 8's "steps to a target loss").
    pub target_loss: Option<f64>,
    /// Backend of the compressors, the aggregation and the variance estimates.
    pub backend: Backend,
    /// How the server averages the payloads (SPEC §7): over all `K` workers, or over the
    /// workers that sent each coordinate (the rTop-k paper's rule).
    pub average: Average,
    /// Algorithm 1's scaling: rTop-k's sent values are multiplied by `r / k`
    /// ([`Scale::Unbiased`]); random-k is always scaled by `n / k`.
    pub unbiased: bool,
    /// Local SGD steps per round, `H`: 1 is plain distributed SGD; with `H > 1` (the
    /// federated setting) each worker starts a round from the global model, takes `H` SGD
    /// steps of its own (no momentum) on its next `H` batches, and sends its accumulated
    /// update `(w_global - w_local) / lr` through the compressor; the server applies the
    /// aggregate with `lr`. A round counts as one step of the report; an epoch has
    /// `steps / H` rounds.
    pub local_steps: usize,
    /// [`TrainMethod::Adaptive`] only: steps between re-allocations of the per-layer counts
    /// (at least 1).
    pub adapt_every: usize,
    /// How the payloads travel and are summed (docs/SPEC.md §12): all-gathered (any
    /// method), the sparse all-reduce (top-k, rTop-k, adaptive; any backend), or shared-key
    /// random-k summed by an all-reduce (random-k only). The baseline ignores it.
    pub reduce: Reduce,
    /// [`Reduce::Sparse`]: steps between exact threshold computations (1: every step).
    pub threshold_every: u64,
    /// [`TrainMethod::Qsgd`] only: quantisation levels `s`, in `1..=127`.
    pub levels: u8,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            method: TrainMethod::Rtopk,
            ratio: 0.01,
            r_over_k: 5.0,
            workers: DEFAULT_WORKERS,
            seed: 0,
            epochs: 10,
            batch: DEFAULT_BATCH,
            lr: 0.05,
            momentum: 0.9,
            warmup_epochs: DEFAULT_WARMUP_EPOCHS,
            model: Arch::Mlp,
            hidden: vec![128, 64],
            per_layer: false,
            max_steps_per_epoch: 0,
            baseline_noise_rho: None,
            target_loss: None,
            backend: Backend::Cpu,
            average: Average::OverWorkers,
            unbiased: false,
            local_steps: 1,
            adapt_every: 10,
            reduce: Reduce::AllGather,
            threshold_every: 1,
            levels: DEFAULT_LEVELS,
        }
    }
}

impl TrainConfig {
    /// The fraction sent in `epoch` under DGC's warm-up: `0.25^(epoch + 1)` until it falls
    /// below the target ratio. The dense codecs (sign, QSGD) send every element: 1.
    pub fn ratio_at(&self, epoch: usize) -> f64 {
        if self.method.is_dense() {
            1.0
        } else if epoch < self.warmup_epochs {
            0.25f64.powi(epoch as i32 + 1).max(self.ratio)
        } else {
            self.ratio
        }
    }

    /// The gradsift configuration of `epoch` (`None` for the uncompressed baseline).
    pub fn compressor(&self, epoch: usize) -> Option<Config> {
        let k = self.ratio_at(epoch);
        let mut c = match self.method {
            TrainMethod::Rtopk | TrainMethod::Adaptive => {
                Config::rtopk((k * self.r_over_k).min(1.0), k)
            }
            TrainMethod::Topk => Config::topk(k),
            TrainMethod::Randomk => Config::randomk(k),
            TrainMethod::Sign => Config::sign(),
            TrainMethod::Qsgd => Config::qsgd(self.levels),
            TrainMethod::None => return None,
        };
        c.momentum = self.momentum;
        c.seed = self.seed;
        c.mode = if self.per_layer || self.method == TrainMethod::Adaptive {
            Mode::PerLayer
        } else {
            Mode::Global
        };
        // Random-k is unbiased only after scaling by n/k (as r = n); the sparsifiers with a
        // top-r stage are sent unscaled, as in the rTop-k paper's experiments.
        if self.method == TrainMethod::Randomk
            || (self.unbiased && matches!(self.method, TrainMethod::Rtopk | TrainMethod::Adaptive))
        {
            c.scale = Scale::Unbiased;
        }
        Some(c)
    }

    /// Checks every setting against its documented range ([`LIMITS`], shown by
    /// `gradsift train --help`): a [`TrainError::Usage`] naming the option outside its range,
    /// never a panic or an allocation that cannot succeed.
    ///
    /// # Errors
    ///
    /// [`TrainError::Usage`] for the first setting out of range.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Usage(m));
        if !(2..=MAX_WORKERS).contains(&self.workers) {
            return bad(format!(
                "--workers must lie in [2, {MAX_WORKERS}] (the variance estimator needs K >= 2), got {}",
                self.workers
            ));
        }
        if !(self.ratio > 0.0 && self.ratio <= 1.0) {
            return bad(format!("--ratio must lie in (0, 1], got {}", self.ratio));
        }
        if !(self.r_over_k >= 1.0 && self.r_over_k <= MAX_R_OVER_K) {
            return bad(format!(
                "--r-over-k must lie in [1, {MAX_R_OVER_K:e}], got {}",
                self.r_over_k
            ));
        }
        if !(1..=QSGD_MAX_LEVELS).contains(&self.levels) {
            return bad(format!(
                "--levels must lie in [1, {QSGD_MAX_LEVELS}], got {}",
                self.levels
            ));
        }
        if self.adapt_every == 0 {
            return bad("--adapt-every must be at least 1".into());
        }
        if !(1..=MAX_THRESHOLD_EVERY).contains(&self.threshold_every) {
            return bad(format!(
                "--threshold-every must lie in [1, {MAX_THRESHOLD_EVERY}], got {}",
                self.threshold_every
            ));
        }
        let fits = match self.reduce {
            Reduce::AllGather => true,
            Reduce::Sparse => matches!(
                self.method,
                TrainMethod::Topk | TrainMethod::Rtopk | TrainMethod::Adaptive | TrainMethod::None
            ),
            Reduce::SharedRandomK => {
                matches!(self.method, TrainMethod::Randomk | TrainMethod::None)
            }
        };
        if !fits {
            return bad(format!(
                "--reduce {} does not apply to --method {}: sparse takes topk, rtopk or adaptive, shared-randomk takes randomk",
                self.reduce, self.method
            ));
        }
        if !(1..=MAX_EPOCHS).contains(&self.epochs) {
            return bad(format!(
                "--epochs must lie in [1, {MAX_EPOCHS}], got {}",
                self.epochs
            ));
        }
        if self.warmup_epochs > self.epochs {
            return bad(format!(
                "--warmup-epochs must lie in [0, --epochs = {}], got {}",
                self.epochs, self.warmup_epochs
            ));
        }
        if !(1..=MAX_BATCH).contains(&self.batch) {
            return bad(format!(
                "--batch must lie in [1, {MAX_BATCH}], got {}",
                self.batch
            ));
        }
        if !(self.lr > 0.0 && self.lr <= MAX_LR) {
            return bad(format!("--lr must lie in (0, {MAX_LR}], got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!(
                "--momentum must lie in [0, 1), got {}",
                self.momentum
            ));
        }
        if !(1..=MAX_LOCAL_STEPS).contains(&self.local_steps) {
            return bad(format!(
                "--local-steps must lie in [1, {MAX_LOCAL_STEPS}], got {}",
                self.local_steps
            ));
        }
        if let Some(h) = self.hidden.iter().find(|h| !(1..=MAX_HIDDEN).contains(*h)) {
            return bad(format!(
                "hidden layer widths must lie in [1, {MAX_HIDDEN}], got {h}"
            ));
        }
        if let Some(rho) = self.baseline_noise_rho {
            if !(rho >= 0.0 && rho.is_finite()) || self.method != TrainMethod::None {
                return bad(format!(
                    "noise injection needs the uncompressed baseline and a finite rho >= 0, got {rho} with {}",
                    self.method
                ));
            }
        }
        Ok(())
    }
}

/// `--levels` when not given: 3 levels, 3 bits per element, the setting of the README's
/// shaped-link table.
pub const DEFAULT_LEVELS: u8 = 3;

/// Most workers `K` of a run (`--workers`).
pub const MAX_WORKERS: usize = 1000;
/// Most epochs of a run (`--epochs`): about an hour of the default model on one core.
pub const MAX_EPOCHS: usize = 1000;
/// Largest mini-batch per worker (`--batch`); the training split must also hold `K` of them.
pub const MAX_BATCH: usize = 65_536;
/// Largest learning rate (`--lr`).
pub const MAX_LR: f32 = 100.0;
/// Largest `r / k` (`--r-over-k`); `r` is capped at `n` anyway.
pub const MAX_R_OVER_K: f64 = 1e6;
/// Widest hidden layer of the MLP.
pub const MAX_HIDDEN: usize = 65_536;
/// Most local steps per round (`--local-steps`); an epoch must also hold one round.
pub const MAX_LOCAL_STEPS: usize = 1000;

/// The ranges of `gradsift train`'s numeric options, as `--help` shows them.
pub const LIMITS: &str = "\
RANGES: --workers 2..=1000 (the training split must also give each worker one batch);
--ratio (0, 1]; --r-over-k [1, 1e6]; --epochs 1..=1000; --warmup-epochs 0..=--epochs;
--batch 1..=65536; --lr (0, 100]; --momentum [0, 1); --local-steps 1..=1000 (and an epoch
must hold one round of them); --adapt-every >= 1; --levels 1..=127; --seed any 64-bit unsigned integer. A value
outside its range is an error that names the option, before anything runs.

DEFAULTS that follow other options: --warmup-epochs 2, or --epochs when that is smaller;
--batch 32, or 8,000 / --workers when that is smaller; --r-over-k the number of workers;
--workers 5, or under --dist mpi the number of ranks. A default changed that way is said in
the run's header; only a value given on the command line that cannot hold is an error.";

/// What one epoch achieved.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct EpochReport {
    /// Epoch, from 1.
    pub epoch: usize,
    /// Fraction `k / n` sent during the epoch (warm-up included).
    pub ratio: f64,
    /// Mean training loss over the epoch's steps (over workers).
    pub train_loss: f64,
    /// Accuracy on the held-out test set after the epoch.
    pub test_accuracy: f64,
    /// Wire bits per worker per step (headers included); `32 n` for the baseline. Under
    /// [`Reduce::Sparse`] and [`Reduce::SharedRandomK`], the bits of the pieces a worker
    /// sends in the reduction's first collective (its payload, split by region).
    pub bits_per_worker_step: f64,
    /// Bytes of the payload exchange a worker received from the others per step (the
    /// compressed runs' collectives; the measurement exchanges of losses and dense
    /// gradients are not counted); 0 for the baseline.
    pub received_per_worker_step: f64,
    /// Bytes the worker that received the most in a step received, averaged over the steps:
    /// what bounds a step on a real network; the same as `received_per_worker_step` when the
    /// traffic is even (the all-gather), larger when one owner of the sparse all-reduce's
    /// regions receives more; 0 for the baseline.
    pub received_busiest_worker_step: f64,
    /// Mean over the epoch's steps of the size-weighted `sigma_X^2` (per coordinate).
    pub sigma_x2: f64,
    /// Mean over the epoch's steps of the size-weighted `sigma_N^2`.
    pub sigma_n2: f64,
    /// Mean `rho = K D / sigma_N^2 - 1` (0 for the baseline).
    pub rho: f64,
    /// `sum R_sum(D) / sum bits` over the epoch's steps; `None` for the baseline, whose
    /// distortion sits at the `sigma_N^2 / K` boundary where `R_sum` is infinite.
    pub efficiency: Option<f64>,
}

/// A finished run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// The settings.
    pub config: TrainConfig,
    /// Parameters of the model.
    pub params: usize,
    /// One entry per epoch.
    pub epochs: Vec<EpochReport>,
    /// Every step's measurement (empty for the baseline unless
    /// [`TrainConfig::baseline_noise_rho`] is set): the time series of Fig. 6.
    pub steps: Vec<StepMeasurement>,
    /// Steps taken until the smoothed training loss reached [`TrainConfig::target_loss`];
    /// `None` when it never did (or no target was set).
    pub steps_to_target: Option<usize>,
    /// 64-bit FNV-1a of the final weights' bits (layout order): equal on two runs only if
    /// they ended with the same model, bit for bit.
    pub weights_fnv: u64,
    /// Steps in a full epoch (a run's step cap is this times [`TrainConfig::epochs`]).
    pub steps_per_epoch: usize,
}

/// Trains one run on `train`, evaluating on `test` after each epoch; `on_step(done, total)`
/// and `on_epoch` report progress. The simulation: all `K` workers in this process, through
/// [`InProcess`], the same code path as a multi-process run ([`train_with`]).
pub fn train(
    cfg: &TrainConfig,
    train: &Mnist,
    test: &Mnist,
    on_step: impl FnMut(usize, usize),
    on_epoch: impl FnMut(&EpochReport),
) -> Result<TrainReport> {
    train_with(
        cfg,
        train,
        test,
        &mut InProcess::new(cfg.workers),
        on_step,
        on_epoch,
    )
}

/// What every rank of a run must agree on: the crate version, the run's configuration, the
/// model's layout, the training data, and the number of workers the transport connects.
fn setup_fingerprint(cfg: &TrainConfig, layout: &Layout, data: &Mnist, workers: usize) -> String {
    let mut h = Fnv::default();
    data.images
        .iter()
        .for_each(|p| h.add(&p.to_bits().to_le_bytes()));
    h.add(&data.labels);
    format!(
        "gradsift {} | {cfg:?} | layout {:?} | data {} images fnv {:016x} | {workers} workers",
        env!("CARGO_PKG_VERSION"),
        layout.sizes().collect::<Vec<_>>(),
        data.len(),
        h.0
    )
}

/// 64-bit FNV-1a.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// [`train`] over any [`Transport`]: this process runs the workers `transport.local()`
/// (all of them in process, one per rank under MPI) and every process holds a replica of
/// the model.
///
/// Per step, each local worker computes its gradient on its own shard (worker `w` has the
/// same shard and batches whatever the transport), compresses it with its error-feedback
/// plan (random keys from its worker index) and encodes it in the wire format; the encoded
/// payloads are all-gathered, and every process decodes and aggregates all `K` of them in
/// worker order ([`TrainConfig::average`]), so every replica applies the same update. The
/// losses are all-gathered too, and so are the dense gradients: the variance estimates and
/// the distortion columns (`sigma_X^2`, `sigma_N^2`, `rho`, `R_sum/bits`) are measurements of
/// all `K` exact gradients, not part of the training update; `bits` counts only the wire
/// payloads. The uncompressed baseline all-gathers the dense gradients as its payload.
///
/// At start every rank checks that all ranks run the same configuration, layout and data
/// ([`dist::check_setup`]), and that the transport connects `cfg.workers` workers.
pub fn train_with(
    cfg: &TrainConfig,
    train: &Mnist,
    test: &Mnist,
    transport: &mut dyn Transport,
    mut on_step: impl FnMut(usize, usize),
    mut on_epoch: impl FnMut(&EpochReport),
) -> Result<TrainReport> {
    let mut run = Run::new(cfg, train, transport)?;
    let mut epochs = Vec::with_capacity(cfg.epochs.min(MAX_EPOCHS));
    for epoch in 0..cfg.epochs {
        let compressor = cfg.compressor(epoch);
        let mut sums = run.begin_epoch(epoch, compressor.is_some());
        for s in 0..run.steps_per_epoch {
            let step_loss = run.step(epoch, s, compressor.as_ref(), &mut sums)?;
            on_step(epoch * run.steps_per_epoch + s + 1, run.total);
            if run.reached_target(step_loss) {
                break;
            }
        }
        let mut rep = sums.finish(cfg.workers, compressor.is_some());
        rep.test_accuracy = run.model.accuracy(test)?;
        on_epoch(&rep);
        epochs.push(rep);
        if run.steps_to_target.is_some() {
            break;
        }
    }
    run.finish(epochs)
}

/// One epoch's running sums, divided into its [`EpochReport`] when the epoch ends.
struct EpochSums {
    /// The report, its per-step figures still summed.
    rep: EpochReport,
    bits: f64,
    r_sum_bits: f64,
    received_bytes: u64,
    /// The busiest worker's received bytes, summed over the steps.
    busiest_bytes: u64,
    /// Steps taken (fewer than the epoch's when the target loss stopped it).
    done: usize,
}

impl EpochSums {
    /// The epoch's report (all but its test accuracy), over `k` workers.
    fn finish(mut self, k: usize, compressed: bool) -> EpochReport {
        let steps_f = self.done as f64;
        let rep = &mut self.rep;
        rep.train_loss /= steps_f;
        rep.bits_per_worker_step = self.bits / (steps_f * k as f64);
        rep.received_per_worker_step = self.received_bytes as f64 / (steps_f * k as f64);
        rep.received_busiest_worker_step = self.busiest_bytes as f64 / steps_f;
        rep.sigma_x2 /= steps_f;
        rep.sigma_n2 /= steps_f;
        if compressed {
            rep.rho /= steps_f;
            rep.efficiency = Some(self.r_sum_bits / self.bits);
        }
        self.rep
    }
}

/// The state of one [`train_with`] run across its steps: this process's replica of the
/// model, its workers' buffers and compressors, the generators and what was measured.
struct Run<'a> {
    cfg: &'a TrainConfig,
    train: &'a Mnist,
    transport: &'a mut dyn Transport,
    model: Model,
    layout: Layout,
    k: usize,
    n: usize,
    /// The workers this process runs.
    local: Range<usize>,
    shards: Vec<Vec<usize>>,
    steps_per_epoch: usize,
    total: usize,
    /// This process's workers' gradients, and all K of them after the all-gather.
    grads: Vec<Vec<f32>>,
    all: Vec<Vec<f32>>,
    update: Vec<f32>,
    velocity: Vec<f32>,
    /// The global weights and a gradient buffer, for rounds of local steps.
    global: Vec<f32>,
    scratch: Vec<f32>,
    device: Device,
    stats: Stats,
    /// The local workers' compressors (error-feedback state), built at the first compressed
    /// epoch and reconfigured, residuals kept, when the warm-up changes the ratio.
    plans: Vec<Compressor>,
    plan_config: Option<Config>,
    aggregator: Option<Aggregator>,
    payloads: Vec<Payload>,
    exchange: Exchange,
    local_bytes: Vec<Vec<u8>>,
    gathered: Vec<Vec<u8>>,
    variances: Vec<VarianceEstimate>,
    /// Adaptive runs: the streaming per-layer estimates and the current (r_l, k_l).
    tracker: VarianceTracker,
    group_counts: Vec<(u64, u64)>,
    rng: SplitMix,
    /// A generator of its own, so that injecting noise leaves the batches unchanged.
    noise_rng: SplitMix,
    loss_ema: Option<f64>,
    steps_to_target: Option<usize>,
    steps: Vec<StepMeasurement>,
    t: u64,
}

impl<'a> Run<'a> {
    /// Checks `cfg` and the transport, then builds the model and the buffers.
    fn new(
        cfg: &'a TrainConfig,
        train: &'a Mnist,
        transport: &'a mut dyn Transport,
    ) -> Result<Self> {
        cfg.validate()?;
        let model = Model::new(cfg.model, &cfg.hidden, cfg.seed)?;
        let layout = model.layout();
        let fingerprint = setup_fingerprint(cfg, &layout, train, transport.workers());
        dist::check_setup(transport, &fingerprint)?;
        if transport.workers() != cfg.workers {
            return Err(TrainError::Usage(format!(
                "--workers {} but the {} transport connects {} workers (with mpirun, pass --workers equal to -n)",
                cfg.workers,
                transport.name(),
                transport.workers()
            )));
        }
        let k = cfg.workers;
        let local = transport.local();
        let n = layout.n();
        let (shards, steps_per_epoch) = worker_shards(cfg, train)?;
        let total = total_steps(steps_per_epoch, cfg.epochs)?;
        let (global, scratch) = if cfg.local_steps > 1 {
            (vec![0f32; n], vec![0f32; n])
        } else {
            (Vec::new(), Vec::new())
        };
        let device = Device::open(cfg.backend)?;
        let stats = device.stats(&layout, k)?;
        Ok(Self {
            cfg,
            train,
            transport,
            model,
            k,
            n,
            shards,
            steps_per_epoch,
            total,
            grads: vec![vec![0f32; n]; local.len()],
            all: vec![vec![0f32; n]; k],
            update: vec![0f32; n],
            velocity: vec![0f32; n],
            global,
            scratch,
            device,
            stats,
            plans: Vec::new(),
            plan_config: None,
            aggregator: None,
            payloads: vec![Payload::Sparse(SparsePayload::default()); k],
            exchange: Exchange::default(),
            local_bytes: vec![Vec::new(); local.len()],
            gathered: Vec::new(),
            variances: Vec::new(),
            tracker: VarianceTracker::new(ADAPT_EMA)?,
            group_counts: Vec::new(),
            rng: SplitMix(cfg.seed ^ 0x0042_4154_4348),
            noise_rng: SplitMix(cfg.seed ^ 0x004E_4F49_5345),
            loss_ema: None,
            steps_to_target: None,
            steps: Vec::new(),
            t: 0,
            layout,
            local,
        })
    }

    /// Shuffles every shard for `epoch` and opens its sums.
    fn begin_epoch(&mut self, epoch: usize, compressed: bool) -> EpochSums {
        for s in self.shards.iter_mut() {
            shuffle(s, &mut self.rng);
        }
        EpochSums {
            rep: EpochReport {
                epoch: epoch + 1,
                ratio: if compressed {
                    self.cfg.ratio_at(epoch)
                } else {
                    1.0
                },
                ..Default::default()
            },
            bits: 0.0,
            r_sum_bits: 0.0,
            received_bytes: 0,
            busiest_bytes: 0,
            done: 0,
        }
    }

    /// Step `s` of `epoch` (a round, with local steps), compressed by `compressor` (the
    /// baseline where `None`); returns the step's training loss, the mean over the workers.
    fn step(
        &mut self,
        epoch: usize,
        s: usize,
        compressor: Option<&Config>,
        sums: &mut EpochSums,
    ) -> Result<f64> {
        dist::inject_fault(self.transport.rank(), self.t);
        let loss = self.worker_gradients(s)?;
        sums.rep.train_loss += loss / self.k as f64;
        let views: Vec<&[f32]> = self.all.iter().map(|g| g.as_slice()).collect();
        self.stats.estimate_variance(&views, &mut self.variances)?;
        match compressor {
            Some(c) => self.compressed_step(epoch, s, c, sums)?,
            None => self.baseline_step(sums)?,
        }
        self.t += 1;
        sums.done += 1;
        Ok(loss / self.k as f64)
    }

    /// Fills `all` with every worker's gradient of step `s`; returns the sum of their losses.
    fn worker_gradients(&mut self, s: usize) -> Result<f64> {
        let cfg = self.cfg;
        // Local gradients (or, with local steps, local updates); then every worker's loss
        // and gradient, in worker order.
        if cfg.local_steps > 1 {
            self.model.read_params(&mut self.global)?;
        }
        for (w, g) in self.local.clone().zip(self.grads.iter_mut()) {
            let round = &self.shards[w][s * cfg.local_steps * cfg.batch..];
            let l = if cfg.local_steps == 1 {
                self.model
                    .loss_and_grad(self.train, &round[..cfg.batch], g)?
            } else {
                let (global, scratch) = (&self.global, &mut self.scratch);
                local_round(&self.model, cfg, self.train, round, global, scratch, g)?
            };
            self.local_bytes[w - self.local.start] = l.to_le_bytes().to_vec();
        }
        gather(self.transport, &self.local_bytes, &mut self.gathered)?;
        let mut loss = 0.0;
        for b in &self.gathered {
            let mut l = Vec::new();
            dist::f32_from_bytes(b, 1, &mut l)?;
            loss += f64::from(l[0]);
        }
        for (b, g) in self.local_bytes.iter_mut().zip(&self.grads) {
            dist::f32_bytes(g, b);
        }
        gather(self.transport, &self.local_bytes, &mut self.gathered)?;
        for (b, g) in self.gathered.iter().zip(self.all.iter_mut()) {
            dist::f32_from_bytes(b, self.n, g)?;
        }
        Ok(loss)
    }

    /// A compressed step under `c`: compression, exchange and aggregation, the measurement
    /// of what was sent, and the update.
    fn compressed_step(
        &mut self,
        epoch: usize,
        s: usize,
        c: &Config,
        sums: &mut EpochSums,
    ) -> Result<()> {
        let adapted = self.adapted(epoch, s, c)?;
        let c = adapted.as_ref().unwrap_or(c);
        self.prepare_plans(c)?;
        match self.cfg.reduce {
            Reduce::AllGather => self.all_gather()?,
            _ => self.exchange.reduce(
                self.cfg,
                &self.layout,
                c,
                self.transport,
                &mut self.plans,
                &self.grads,
                self.t,
                &mut self.update,
            )?,
        }
        let (sent, received, busiest) = self.exchange.settle(self.transport)?;
        let step_bits = 8 * sent;
        sums.received_bytes += received;
        sums.busiest_bytes += busiest;
        let views: Vec<&[f32]> = self.all.iter().map(|g| g.as_slice()).collect();
        let (layout, variances, update) = (&self.layout, &self.variances, &self.update);
        let m = rd::measure_aggregate(&views, layout, variances, update, step_bits, self.t)?;
        self.model.apply(&self.update, self.cfg.lr)?;
        sums.bits += m.bits as f64;
        sums.r_sum_bits += m.r_sum_bits;
        sums.rep.sigma_x2 += m.sigma_x2;
        sums.rep.sigma_n2 += m.sigma_n2;
        sums.rep.rho += m.rho;
        self.steps.push(m);
        Ok(())
    }

    /// [`TrainMethod::Adaptive`]: `c` with the current per-layer counts, re-allocated at an
    /// epoch's first step and every `adapt_every` steps; `None` for the other methods.
    fn adapted(&mut self, epoch: usize, s: usize, c: &Config) -> Result<Option<Config>> {
        let cfg = self.cfg;
        if cfg.method != TrainMethod::Adaptive {
            return Ok(None);
        }
        self.tracker.update(&self.variances)?;
        if s == 0 || self.t % cfg.adapt_every as u64 == 0 {
            let (layout, last) = (&self.layout, self.steps.last());
            self.group_counts = adaptive_counts(cfg, epoch, layout, self.tracker.current(), last)?;
        }
        Ok(Some(Config {
            group_counts: self.group_counts.clone(),
            ..c.clone()
        }))
    }

    /// Builds the local workers' compressors and the aggregator at the first compressed step;
    /// later reconfigures the compressors wherever `c` changed.
    fn prepare_plans(&mut self, c: &Config) -> Result<()> {
        let cfg = self.cfg;
        if self.plans.is_empty() {
            let (device, layout) = (&self.device, &self.layout);
            self.plans = self
                .local
                .clone()
                .map(|w| device.compressor(layout, &c.clone().with_worker(key_of(cfg, w))))
                .collect::<gradsift::Result<_>>()?;
            self.aggregator = Some(device.aggregator(layout, c.mode, cfg.average, self.k)?);
        } else if self.plan_config.as_ref() != Some(c) {
            for (w, plan) in self.local.clone().zip(self.plans.iter_mut()) {
                plan.reconfigure(&c.clone().with_worker(key_of(cfg, w)))?;
            }
        }
        self.plan_config = Some(c.clone());
        Ok(())
    }

    /// [`Reduce::AllGather`]: the encoded payloads all-gathered, then all `K` decoded and
    /// aggregated in worker order into `update`.
    fn all_gather(&mut self) -> Result<()> {
        let exchange = &mut self.exchange;
        exchange.sent.clear();
        for ((plan, g), b) in self
            .plans
            .iter_mut()
            .zip(&self.grads)
            .zip(self.local_bytes.iter_mut())
        {
            let p = plan.step(g, self.t)?;
            wire::encode(p, b)?;
            exchange.sent.push(b.len() as u64);
        }
        gather(self.transport, &self.local_bytes, &mut self.gathered)?;
        exchange
            .traffic
            .all_gather(self.local.clone(), &self.gathered);
        for (b, p) in self.gathered.iter().zip(self.payloads.iter_mut()) {
            wire::decode_into(b, p).map_err(gradsift::Error::from)?;
        }
        let agg = self.aggregator.as_mut().expect("built with the plans");
        agg.aggregate(&self.payloads, &mut self.update)?;
        Ok(())
    }

    /// Server-side momentum SGD on the exact mean: the uncompressed baseline.
    fn baseline_step(&mut self, sums: &mut EpochSums) -> Result<()> {
        let (cfg, k, n) = (self.cfg, self.k, self.n);
        let inv = 1.0 / k as f32;
        for (i, u) in self.update.iter_mut().enumerate() {
            let mut sum = 0.0f32;
            for g in &self.all {
                sum += g[i];
            }
            *u = sum * inv;
        }
        if let Some(rho) = cfg.baseline_noise_rho.filter(|&r| r > 0.0) {
            for (l, v) in self.variances.iter().enumerate() {
                let sd = (rho * v.sigma_n2 / k as f64).sqrt();
                for u in &mut self.update[self.layout.layer(l)] {
                    *u += (sd * self.noise_rng.normal()) as f32;
                }
            }
        }
        for (u, v) in self.update.iter().zip(self.velocity.iter_mut()) {
            *v = cfg.momentum * *v + *u;
        }
        self.model.apply(&self.velocity, cfg.lr)?;
        sums.bits += (32 * n * k) as f64;
        for (v, nl) in self.variances.iter().zip(self.layout.sizes()) {
            sums.rep.sigma_x2 += v.sigma_x2 * nl as f64 / n as f64;
            sums.rep.sigma_n2 += v.sigma_n2 * nl as f64 / n as f64;
        }
        if let Some(rho) = cfg.baseline_noise_rho {
            let (layout, variances) = (&self.layout, &self.variances);
            self.steps
                .push(noisy_baseline_step(self.t, k, layout, variances, rho));
        }
        Ok(())
    }

    /// Folds the step's loss into the moving average; whether that reached
    /// [`TrainConfig::target_loss`] (then recorded as the steps to the target).
    fn reached_target(&mut self, step_loss: f64) -> bool {
        let ema = self
            .loss_ema
            .map_or(step_loss, |e| 0.9 * e + 0.1 * step_loss);
        self.loss_ema = Some(ema);
        if self.cfg.target_loss.is_some_and(|target| ema <= target) {
            self.steps_to_target = Some(self.t as usize);
            return true;
        }
        false
    }

    /// Waits for every rank, then reports the run.
    fn finish(self, epochs: Vec<EpochReport>) -> Result<TrainReport> {
        self.transport.barrier()?;
        Ok(TrainReport {
            config: self.cfg.clone(),
            params: self.model.num_params(),
            weights_fnv: self.model.fingerprint()?,
            epochs,
            steps: self.steps,
            steps_to_target: self.steps_to_target,
            steps_per_epoch: self.steps_per_epoch,
        })
    }
}

/// One worker's round of `cfg.local_steps` plain SGD steps from the global weights `global`
/// on the batches at the start of `round`: leaves the accumulated update
/// `(w_global - w_local) / lr` (the sum of the round's gradients) in `out`, restores the
/// model to `global` and returns the round's mean loss.
fn local_round(
    model: &Model,
    cfg: &TrainConfig,
    train: &Mnist,
    round: &[usize],
    global: &[f32],
    grad: &mut [f32],
    out: &mut [f32],
) -> Result<f32> {
    let mut loss = 0.0f32;
    for h in 0..cfg.local_steps {
        loss += model.loss_and_grad(train, &round[h * cfg.batch..(h + 1) * cfg.batch], grad)?;
        model.apply(grad, cfg.lr)?;
    }
    model.read_params(out)?;
    let inv_lr = 1.0 / cfg.lr;
    for (o, g) in out.iter_mut().zip(global) {
        *o = (g - *o) * inv_lr;
    }
    model.write_params(global)?;
    Ok(loss / cfg.local_steps as f32)
}

/// EMA factor of the per-layer variance estimates that [`TrainMethod::Adaptive`] allocates
/// from.
pub const ADAPT_EMA: f64 = 0.9;

/// [`TrainMethod::Adaptive`]'s `(r_l, k_l)` for `epoch`: the budget is the uniform per-layer
/// one, `sum_l ceil(ratio n_l)` elements per worker; before the first measurement it is
/// split uniformly, afterwards by [`rd::allocate_counts`] at the squared error `last`
/// reached (uniformly again if that is not finite). `r_l = min(n_l, ceil(r_over_k k_l))`.
fn adaptive_counts(
    cfg: &TrainConfig,
    epoch: usize,
    layout: &Layout,
    variances: &[VarianceEstimate],
    last: Option<&StepMeasurement>,
) -> Result<Vec<(u64, u64)>> {
    let ratio = Count::Ratio(cfg.ratio_at(epoch));
    let sizes: Vec<usize> = layout.sizes().collect();
    let uniform: Vec<usize> = sizes.iter().map(|&n| ratio.resolve(n)).collect();
    let budget = last.map(|m| m.d * m.n as f64).filter(|e| e.is_finite());
    let counts = match budget {
        Some(e) => {
            let layers: Vec<rd::LayerModel> = sizes
                .iter()
                .zip(variances)
                .map(|(&n, &v)| rd::LayerModel::new(n, v))
                .collect();
            rd::allocate_counts(&layers, cfg.workers, e, uniform.iter().sum())?
        }
        None => uniform,
    };
    Ok(sizes
        .iter()
        .zip(counts)
        .map(|(&n, k)| {
            let r = ((k as f64 * cfg.r_over_k).ceil() as usize).clamp(k, n);
            (r as u64, k as u64)
        })
        .collect())
}

/// The random-key worker id of worker `w` (SPEC §3): its own, or 0 for every worker
/// under [`Reduce::SharedRandomK`], so that all draw the same indices.
fn key_of(cfg: &TrainConfig, w: usize) -> u32 {
    if cfg.reduce == Reduce::SharedRandomK {
        0
    } else {
        w as u32
    }
}

/// The state of the payload exchange, kept across steps: the reductions other than the
/// all-gather, and the traffic counters.
#[derive(Default)]
struct Exchange {
    sparse: Option<(Config, SparseAllReduce)>,
    shared: SharedScratch,
    refunds: Vec<SparsePayload>,
    traffic: Traffic,
    /// Per local worker: the bytes of its payload (or of the first collective's pieces).
    sent: Vec<u64>,
    counters: Vec<Vec<u8>>,
    all_counters: Vec<Vec<u8>>,
}

impl Exchange {
    /// One step's compression and reduction under `cfg.reduce` (not the all-gather):
    /// leaves the update in `update`, the bytes sent in `self.sent`, and returns each plan
    /// what the sparse all-reduce did not use.
    #[allow(clippy::too_many_arguments)]
    fn reduce(
        &mut self,
        cfg: &TrainConfig,
        layout: &Layout,
        c: &Config,
        transport: &mut dyn Transport,
        plans: &mut [Compressor],
        grads: &[Vec<f32>],
        t: u64,
        update: &mut [f32],
    ) -> Result<()> {
        for (plan, g) in plans.iter_mut().zip(grads) {
            plan.step(g, t)?;
        }
        let mut views = Vec::with_capacity(plans.len());
        for plan in plans.iter_mut() {
            match plan.payload()? {
                Payload::Sparse(p) => views.push(p),
                Payload::Sign(_) | Payload::Qsgd(_) => {
                    return Err(TrainError::Usage(format!(
                        "--reduce {} needs a sparse method",
                        cfg.reduce
                    )));
                }
            }
        }
        self.sent.clear();
        match cfg.reduce {
            Reduce::SharedRandomK => {
                reduce::shared_randomk(
                    transport,
                    &views,
                    update,
                    &mut self.traffic,
                    &mut self.shared,
                )?;
                // The k values (f32) in K pieces, each with its 8-byte index hash.
                for p in &views {
                    self.sent
                        .push(4 * p.values.len() as u64 + 8 * cfg.workers as u64);
                }
            }
            Reduce::Sparse => {
                if self.sparse.as_ref().map(|(have, _)| have) != Some(c) {
                    let plan = SparseAllReduce::new(
                        layout,
                        c,
                        cfg.average,
                        cfg.workers,
                        cfg.threshold_every,
                    )?;
                    self.sparse = Some((c.clone(), plan));
                }
                let (_, plan) = self.sparse.as_mut().expect("built above");
                plan.reduce(
                    transport,
                    &views,
                    t,
                    update,
                    &mut self.refunds,
                    &mut self.traffic,
                )?;
                self.sent.extend_from_slice(plan.scattered());
                drop(views);
                for (plan, back) in plans.iter_mut().zip(&self.refunds) {
                    plan.refund(back)?;
                }
            }
            Reduce::AllGather => unreachable!("the caller all-gathers"),
        }
        Ok(())
    }

    /// The step's bytes sent and received, summed over all `K` workers, and the most one
    /// worker received: one all-gather of two counters per worker (a measurement, like the
    /// losses', outside the payload exchange), so that every rank reports the same figures.
    /// Clears the counters.
    fn settle(&mut self, transport: &mut dyn Transport) -> Result<(u64, u64, u64)> {
        let n = transport.local().len();
        self.counters.resize_with(n, Vec::new);
        for (i, b) in self.counters.iter_mut().enumerate() {
            b.clear();
            b.extend_from_slice(&self.sent.get(i).copied().unwrap_or(0).to_le_bytes());
            b.extend_from_slice(
                &self
                    .traffic
                    .received
                    .get(i)
                    .copied()
                    .unwrap_or(0)
                    .to_le_bytes(),
            );
        }
        gather(transport, &self.counters, &mut self.all_counters)?;
        self.traffic.clear();
        self.sent.clear();
        let (mut sent, mut received, mut busiest) = (0u64, 0u64, 0u64);
        for b in &self.all_counters {
            let word = |at: usize| {
                b.get(at..at + 8)
                    .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
            };
            let (Some(s), Some(r)) = (word(0), word(8)) else {
                return Err(gradsift::Error::Transport {
                    transport: transport.name(),
                    reason: format!("traffic counters of {} bytes, expected 16", b.len()),
                }
                .into());
            };
            sent += s;
            received += r;
            busiest = busiest.max(r);
        }
        Ok((sent, received, busiest))
    }
}

/// All-gathers one buffer per local worker.
fn gather(t: &mut dyn Transport, local: &[Vec<u8>], out: &mut Vec<Vec<u8>>) -> Result<()> {
    let views: Vec<&[u8]> = local.iter().map(|b| b.as_slice()).collect();
    Ok(t.all_gather(&views, out)?)
}

/// The measurement of an uncompressed step whose estimate carries injected noise of
/// `rho sigma_Nl^2 / K`: `D_l = sigma_Nl^2 / K (1 + rho)` by construction, and `R_sum(D_l)`
/// is the least any scheme could send for that distortion (infinite at `rho = 0`).
fn noisy_baseline_step(
    t: u64,
    k: usize,
    layout: &Layout,
    variances: &[gradsift::VarianceEstimate],
    rho: f64,
) -> StepMeasurement {
    let kf = k as f64;
    let n = layout.n();
    let nf = n.max(1) as f64;
    let layers: Vec<rd::LayerMeasurement> = variances
        .iter()
        .zip(layout.sizes())
        .map(|(v, nl)| {
            let d = v.sigma_n2 / kf * (1.0 + rho);
            rd::LayerMeasurement {
                n: nl,
                sigma_x2: v.sigma_x2,
                sigma_n2: v.sigma_n2,
                d_c: d - v.sigma_n2 / kf,
                d,
                rho,
                r_sum: rd::sum_rate(d, v.sigma_x2, v.sigma_n2, k),
                r_in: rd::independent_rate(d, v.sigma_x2, v.sigma_n2, k),
            }
        })
        .collect();
    let weighted = |f: fn(&rd::LayerMeasurement) -> f64| -> f64 {
        layers
            .iter()
            .filter(|l| l.n > 0)
            .map(|l| l.n as f64 * f(l))
            .sum::<f64>()
    };
    let bits = (32 * n * k) as u64;
    let r_sum_bits = weighted(|l| l.r_sum);
    StepMeasurement {
        step: t,
        workers: k,
        n,
        bits,
        bits_per_element: 32.0,
        sigma_x2: weighted(|l| l.sigma_x2) / nf,
        sigma_n2: weighted(|l| l.sigma_n2) / nf,
        d_c: weighted(|l| l.d_c) / nf,
        d: weighted(|l| l.d) / nf,
        rho,
        r_sum_bits,
        r_in_bits: weighted(|l| l.r_in),
        // The per-layer split is fixed by construction here; no re-allocation is measured.
        r_sum_p1_bits: r_sum_bits,
        efficiency: r_sum_bits / bits as f64,
        layers,
    }
}

/// `steps_per_epoch * epochs`, or a usage error where it would not fit a `usize` (it cannot
/// within the validated ranges; this keeps the product from wrapping whatever the caller did).
fn total_steps(steps_per_epoch: usize, epochs: usize) -> Result<usize> {
    steps_per_epoch.checked_mul(epochs).ok_or_else(|| {
        TrainError::Usage(format!(
            "{epochs} epochs of {steps_per_epoch} steps overflow the step counter"
        ))
    })
}

/// Each worker's shard of `train` (a contiguous slice of a seeded permutation) and the steps
/// of one epoch: what [`train`] and [`worker_gradients_at`] share, so both see the same batches.
fn worker_shards(cfg: &TrainConfig, train: &Mnist) -> Result<(Vec<Vec<usize>>, usize)> {
    let k = cfg.workers;
    let mut order: Vec<usize> = (0..train.len()).collect();
    shuffle(&mut order, &mut SplitMix(cfg.seed ^ 0x0053_4841_5244));
    let shard = train.len() / k;
    if shard < cfg.batch {
        return Err(TrainError::Usage(format!(
            "--batch {} with --workers {k}: {} training images cannot give {k} workers a batch of {} each (at most --batch {shard})",
            cfg.batch,
            train.len(),
            cfg.batch
        )));
    }
    let shards = (0..k)
        .map(|w| order[w * shard..(w + 1) * shard].to_vec())
        .collect();
    // A step is a round of `local_steps` batches.
    let mut steps_per_epoch = shard / cfg.batch / cfg.local_steps;
    if steps_per_epoch == 0 {
        return Err(TrainError::Usage(format!(
            "--local-steps {} needs {} batches of {} per worker and epoch, but a worker's shard holds {} images",
            cfg.local_steps, cfg.local_steps, cfg.batch, shard
        )));
    }
    if cfg.max_steps_per_epoch > 0 {
        steps_per_epoch = steps_per_epoch.min(cfg.max_steps_per_epoch);
    }
    Ok((shards, steps_per_epoch))
}

/// The `K` workers' local gradients (layout order, before averaging) at each of `steps`
/// (0-based, strictly ascending) of the uncompressed baseline run of `cfg`: the same model,
/// shards and batches as [`train`] with `method = None`, server-side momentum SGD on the exact
/// mean. `cfg.method`, the ratios and the warm-up are ignored. Returns one `[worker][element]`
/// set per requested step; training stops after the last one.
pub fn worker_gradients_at(
    cfg: &TrainConfig,
    train: &Mnist,
    steps: &[usize],
) -> Result<Vec<Vec<Vec<f32>>>> {
    cfg.validate()?;
    if steps.windows(2).any(|w| w[0] >= w[1]) {
        return Err(TrainError::Usage(format!(
            "steps must be strictly ascending, got {steps:?}"
        )));
    }
    if cfg.local_steps != 1 {
        return Err(TrainError::Usage(format!(
            "worker gradients are those of plain SGD steps; --local-steps {} has no per-step gradient",
            cfg.local_steps
        )));
    }
    let k = cfg.workers;
    let model = Model::new(cfg.model, &cfg.hidden, cfg.seed)?;
    let n = model.num_params();
    let (mut shards, steps_per_epoch) = worker_shards(cfg, train)?;
    let total = total_steps(steps_per_epoch, cfg.epochs)?;
    if let Some(&last) = steps.last().filter(|&&l| l >= total) {
        return Err(TrainError::Usage(format!(
            "step {last} is past the run's last step {} ({} epochs of {steps_per_epoch} steps)",
            total.saturating_sub(1),
            cfg.epochs
        )));
    }
    let mut grads = vec![vec![0f32; n]; k];
    let mut velocity = vec![0f32; n];
    let mut update = vec![0f32; n];
    // The seed of train()'s batch shuffles, so that step t here is step t there.
    let mut rng = SplitMix(cfg.seed ^ 0x0042_4154_4348);
    let mut wanted = steps.iter().copied().peekable();
    let mut out = Vec::with_capacity(steps.len());
    let mut t = 0usize;
    'epochs: for _ in 0..cfg.epochs {
        for s in shards.iter_mut() {
            shuffle(s, &mut rng);
        }
        for s in 0..steps_per_epoch {
            let Some(&next) = wanted.peek() else {
                break 'epochs;
            };
            for (w, g) in grads.iter_mut().enumerate() {
                model.loss_and_grad(train, &shards[w][s * cfg.batch..(s + 1) * cfg.batch], g)?;
            }
            if t == next {
                out.push(grads.clone());
                wanted.next();
            }
            let inv = 1.0 / k as f32;
            for (i, (u, v)) in update.iter_mut().zip(velocity.iter_mut()).enumerate() {
                *u = grads.iter().map(|g| g[i]).sum::<f32>() * inv;
                *v = cfg.momentum * *v + *u;
            }
            model.apply(&velocity, cfg.lr)?;
            t += 1;
        }
    }
    Ok(out)
}

/// Options of `gradsift train`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = LIMITS)]
pub struct TrainArgs {
    /// Compressor; without this option the default run trains rTop-k next to the
    /// uncompressed baseline.
    #[arg(long, value_enum)]
    pub method: Option<TrainMethod>,
    /// Fraction of each gradient sent, k/n (0.01 = 99% compression); in (0, 1].
    #[arg(long, default_value_t = 0.01)]
    pub ratio: f64,
    /// rTop-k's r/k, in [1, 1e6] (default: the number of workers, as in the rTop-k paper).
    #[arg(long)]
    pub r_over_k: Option<f64>,
    /// Number of workers K, in 2..=1000 (default 5; under --dist mpi, the number of ranks
    /// mpirun started).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Seed of weights, batches and random keys (any u64).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Epochs, in 1..=1000.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Mini-batch per worker, in 1..=65536, and K batches must fit the 8,000 training images
    /// (default 32, or 8,000 / K when that is smaller).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Learning rate, in (0, 100].
    #[arg(long, default_value_t = 0.05)]
    pub lr: f32,
    /// Epochs of DGC sparsity warm-up, in 0..=--epochs (default 2, or --epochs when that is
    /// smaller).
    #[arg(long)]
    pub warmup_epochs: Option<usize>,
    /// Select per layer instead of over the whole gradient (`adaptive` always does).
    #[arg(long)]
    pub per_layer: bool,
    /// Momentum in [0, 1): DGC momentum correction on the workers of a compressed run,
    /// server-side momentum SGD for the baseline (the rate-distortion paper uses 0.5).
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f32,
    /// How the server averages: over all K workers, or over the workers that sent each
    /// coordinate (the rTop-k paper's rule).
    #[arg(long, value_enum, default_value = "over-workers")]
    pub average: AverageArg,
    /// Scale rTop-k's sent values by r/k (the rTop-k paper's Algorithm 1); random-k is
    /// always scaled by n/k.
    #[arg(long)]
    pub unbiased: bool,
    /// The network: mlp (784-128-64-10) or cnn (two strided convolutions, 29,666
    /// parameters).
    #[arg(long, value_enum, default_value = "mlp")]
    pub model: Arch,
    /// Local SGD steps per round, in 1..=1000: with H > 1 each worker takes H steps from the
    /// global model on its own batches and sends the accumulated update (the federated
    /// setting); a round is one step of the report.
    #[arg(long, default_value_t = 1)]
    pub local_steps: usize,
    /// `--method adaptive`: steps between re-allocations of the per-layer counts, >= 1.
    #[arg(long, default_value_t = 10)]
    pub adapt_every: usize,
    /// `--method qsgd`: quantisation levels s, in 1..=127 (1 + ceil(log2(s + 1)) bits per
    /// element; `--ratio` does not apply).
    #[arg(long, default_value_t = DEFAULT_LEVELS)]
    pub levels: u8,
    /// Backend that runs the compressors, the aggregation and the variance estimates: cpu,
    /// cuda, wgpu or auto (CUDA, then wgpu, then the CPU).
    #[arg(long, default_value_t = Backend::Cpu)]
    pub backend: Backend,
    /// How the workers run: `none` simulates all K in this process; `mpi` runs one worker
    /// per rank under `mpirun -n K` (needs the `mpi` feature), and rank 0 prints what the
    /// simulation prints, bit for bit.
    #[arg(long, value_enum, default_value_t = Dist::None)]
    pub dist: Dist,
    /// How the payloads travel (docs/SPEC.md §12): `allgather` (every worker receives every
    /// payload: traffic grows with K), `sparse` (the sparse all-reduce of top-k, rTop-k or
    /// adaptive: regions reduced at their owners, the global top-k selected, what it drops
    /// returned to the residual; CPU backend) or `shared-randomk` (random-k with one key for
    /// all workers, its values summed by an all-reduce). The baseline ignores it.
    #[arg(long, default_value_t = Reduce::AllGather, value_parser = parse_reduce)]
    pub reduce: Reduce,
    /// `--reduce sparse`: steps between exact computations of the global top-k threshold,
    /// in 1..=100000; the steps in between select by the last exact threshold (Ok-Topk's
    /// reuse), so the number sent varies.
    #[arg(long, default_value_t = 1)]
    pub threshold_every: u64,
    /// `--dist mpi`: seconds one collective may wait for the other ranks before the job
    /// stops, naming the ranks that did not arrive (a rank that hangs without dying); 0 waits
    /// for ever.
    #[arg(long, default_value_t = 600.0)]
    pub collective_timeout: f64,
    /// Also write every run's per-epoch figures (full precision) and a fingerprint of the
    /// final weights as JSON (rank 0 only under `--dist mpi`).
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
}

fn parse_reduce(s: &str) -> std::result::Result<Reduce, String> {
    s.parse().map_err(|e: gradsift::Error| e.to_string())
}

/// Where `gradsift train`'s workers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dist {
    /// All K workers in this process (the simulation).
    None,
    /// One worker per MPI rank (`mpirun -n K gradsift train --dist mpi --workers K`).
    Mpi,
}

fn open_transport(dist: Dist, workers: usize, timeout: f64) -> Result<Box<dyn Transport>> {
    if !(0.0..=1e9).contains(&timeout) {
        return Err(TrainError::Usage(format!(
            "--collective-timeout must lie in [0, 1e9] seconds, got {timeout}"
        )));
    }
    match dist {
        Dist::None => Ok(Box::new(InProcess::new(workers))),
        #[cfg(feature = "mpi")]
        Dist::Mpi => {
            let mut mpi = dist::Mpi::init()?;
            mpi.set_timeout((timeout > 0.0).then(|| std::time::Duration::from_secs_f64(timeout)));
            Ok(Box::new(mpi))
        }
        #[cfg(not(feature = "mpi"))]
        Dist::Mpi => Err(TrainError::Usage(
            "--dist mpi needs a gradsift built with the `mpi` feature (cargo build --release --features mpi; needs an MPI such as Debian's libopenmpi-dev, and libclang-dev)".into(),
        )),
    }
}

/// Largest `--threshold-every`.
pub const MAX_THRESHOLD_EVERY: u64 = 100_000;

/// Runs `gradsift train` and prints per-epoch figures. Under `--dist mpi` only rank 0
/// prints; an error on one rank aborts every rank (`MPI_Abort`), except a set-up mismatch,
/// which every rank detects and reports itself.
pub fn run(args: &TrainArgs) -> Result<()> {
    let mut transport = open_transport(
        args.dist,
        args.workers.unwrap_or(DEFAULT_WORKERS),
        args.collective_timeout,
    )?;
    if args.dist != Dist::None && transport.is_root() {
        eprintln!(
            "gradsift train: {} transport, {} ranks, one worker per rank{}",
            transport.name(),
            transport.workers(),
            if args.workers.is_none() {
                format!(
                    " (--workers {}: the number of ranks, the default under --dist {})",
                    transport.workers(),
                    transport.name()
                )
            } else {
                String::new()
            }
        );
    }
    match run_on(args, transport.as_mut()) {
        Ok(()) => Ok(()),
        Err(e @ TrainError::Gradsift(gradsift::Error::Transport { .. }))
            if args.dist != Dist::None =>
        {
            // A collective error (a set-up mismatch): every rank has it and says so, then all
            // leave together, so that mpirun kills no rank before it has reported.
            eprintln!(
                "gradsift: rank {} of {}: {e}",
                transport.rank(),
                transport.workers()
            );
            let _ = transport.barrier();
            drop(transport);
            std::process::exit(1)
        }
        Err(e) if args.dist != Dist::None => {
            eprintln!(
                "gradsift: rank {} of {}: {e}; aborting every rank",
                transport.rank(),
                transport.workers()
            );
            transport.abort(1)
        }
        Err(e) => Err(e),
    }
}

/// Under MPI only rank 0 speaks: `println!` where `root`.
macro_rules! say {
    ($root:expr, $($a:tt)*) => { if $root { println!($($a)*) } };
}

fn run_on(args: &TrainArgs, transport: &mut dyn Transport) -> Result<()> {
    let mut job = Job::new(args, transport)?;
    let (device, notes) = super::backend::open(args.backend)?;
    for note in notes.iter().filter(|_| job.root) {
        eprintln!("gradsift train: {note}");
    }
    let backend = device.backend();
    job.base.backend = backend;
    let net = job.check_ranks(transport)?;
    say!(
        job.root,
        "gradsift train: MNIST ({} train / {} test images, embedded), {}, K = {} workers, batch {} each, backend {backend}",
        job.train_set.len(),
        job.test_set.len(),
        net.describe(),
        job.base.workers,
        job.base.batch
    );
    // The defaults that the options given changed, and why.
    for d in &job.defaults {
        say!(job.root, "{d}");
    }
    let mut finals = Vec::new();
    let mut json_runs = Vec::new();
    for &method in &job.methods {
        let (last, json) = job.run_method(method, transport)?;
        json_runs.push(json);
        finals.push(last);
    }
    job.print_finals(&finals);
    if let Some(path) = args.json.as_ref().filter(|_| job.root) {
        let doc = serde_json::json!({ "runs": json_runs });
        let text = serde_json::to_string_pretty(&doc).expect("JSON of numbers and strings");
        std::fs::write(path, text + "\n").map_err(|e| TrainError::Output {
            path: path.clone(),
            message: e.to_string(),
        })?;
    }
    Ok(())
}

/// A run's line of the final summary: its label, final test accuracy, bits per worker per
/// step and parameters.
type Final = (String, f64, f64, usize);

/// What the runs of one `gradsift train` share: the methods, the data and the settings.
struct Job {
    root: bool,
    methods: Vec<TrainMethod>,
    train_set: Mnist,
    test_set: Mnist,
    base: TrainConfig,
    /// The header's lines on the defaults that other options changed.
    defaults: Vec<String>,
}

impl Job {
    /// The runs `args` ask for, every option checked.
    fn new(args: &TrainArgs, transport: &dyn Transport) -> Result<Self> {
        let root = transport.is_root();
        let methods = match args.method {
            Some(m) => vec![m],
            None => vec![TrainMethod::None, TrainMethod::Rtopk],
        };
        let data = Mnist::embedded()?;
        let (train_set, test_set) = data.split(2000);
        // Under MPI the ranks are the workers unless --workers says otherwise (and must agree).
        let ranks = (args.dist != Dist::None).then(|| transport.workers());
        let (base, defaults) = args.resolve(ranks, train_set.len());
        if let Some(r) = ranks.filter(|r| args.workers.is_none() && !(2..=MAX_WORKERS).contains(r))
        {
            return Err(TrainError::Usage(format!(
                "--dist {}: {r} rank(s), and without --workers the ranks are the workers, which must number 2..={MAX_WORKERS}: start it with mpirun -n K",
                transport.name()
            )));
        }
        // Every option is checked before anything is opened, printed or trained.
        for &method in &methods {
            let cfg = TrainConfig {
                method,
                ..base.clone()
            };
            cfg.validate()?;
            worker_shards(&cfg, &train_set)?;
        }
        Ok(Self {
            root,
            methods,
            train_set,
            test_set,
            base,
            defaults,
        })
    }

    /// Checks that every rank runs this job on as many workers as the transport connects;
    /// returns the model, for the header.
    fn check_ranks(&self, transport: &mut dyn Transport) -> Result<Model> {
        let base = &self.base;
        // Every rank runs the same job, checked before anything is printed (train_with checks
        // each run again).
        let net = Model::new(base.model, &base.hidden, base.seed)?;
        let layout = net.layout();
        let fingerprint = setup_fingerprint(base, &layout, &self.train_set, transport.workers());
        let methods = &self.methods;
        dist::check_setup(transport, &format!("methods {methods:?} | {fingerprint}"))?;
        if transport.workers() != base.workers {
            // The same on every rank (the set-up matched): a collective error.
            return Err(gradsift::Error::Transport {
                transport: transport.name(),
                reason: format!(
                    "--workers {} but the {} transport connects {} workers (with mpirun, pass --workers equal to -n)",
                    base.workers,
                    transport.name(),
                    transport.workers()
                ),
            }
            .into());
        }
        Ok(net)
    }

    /// Trains `method`, printing its table; returns its summary line and its JSON.
    fn run_method(
        &self,
        method: TrainMethod,
        transport: &mut dyn Transport,
    ) -> Result<(Final, serde_json::Value)> {
        let root = self.root;
        let cfg = TrainConfig {
            method,
            ..self.base.clone()
        };
        let label = run_label(&cfg);
        say!(root, "\n== {label}");
        say!(
            root,
            "{:>5} {:>7} {:>10} {:>9} {:>14} {:>12} {:>11} {:>11} {:>9} {:>10}",
            "epoch",
            "sent",
            "train loss",
            "test acc",
            "bits/wkr/step",
            "recv B/step",
            "sigma_X^2",
            "sigma_N^2",
            "rho",
            "R_sum/bits"
        );
        let bar = if root {
            indicatif::ProgressBar::new(0)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps {elapsed}")
                .expect("static template"),
        );
        let report = train_with(
            &cfg,
            &self.train_set,
            &self.test_set,
            transport,
            |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
            |e| {
                bar.suspend(|| {
                    say!(
                        root,
                        "{:>5} {:>6.2}% {:>10.4} {:>8.2}% {:>14.0} {:>12.0} {:>11.3e} {:>11.3e} {:>9} {:>10}",
                        e.epoch,
                        100.0 * e.ratio,
                        e.train_loss,
                        100.0 * e.test_accuracy,
                        e.bits_per_worker_step,
                        e.received_per_worker_step,
                        e.sigma_x2,
                        e.sigma_n2,
                        e.efficiency.map_or("-".into(), |_| format!("{:.1}", e.rho)),
                        e.efficiency.map_or("-".into(), |x| format!("{x:.3}")),
                    )
                })
            },
        )?;
        bar.finish_and_clear();
        let json = serde_json::json!({
            "method": method.to_string(),
            "workers": cfg.workers,
            "seed": cfg.seed,
            "params": report.params,
            "weights_fnv": format!("{:016x}", report.weights_fnv),
            "epochs": report.epochs,
        });
        let last = report.epochs.last().expect("epochs >= 1");
        let line = (
            label,
            last.test_accuracy,
            last.bits_per_worker_step,
            report.params,
        );
        Ok((line, json))
    }

    /// The final summary and the key to its columns.
    fn print_finals(&self, finals: &[Final]) {
        say!(self.root, "\nfinal test accuracy:");
        for (label, acc, bits, params) in finals {
            say!(
                self.root,
                "  {label:<45} {:>6.2}%   {:>9.0} bits/worker/step ({:.3} bits/parameter)",
                100.0 * acc,
                bits,
                bits / *params as f64
            );
        }
        say!(
            self.root,
            "\nbits: wire-format bits per worker per step; recv: bytes of the payload exchange a worker received per step; R_sum/bits: the rate-distortion sum-rate at the measured distortion over the bits sent (1 = optimal)."
        );
    }
}

/// The heading of `cfg`'s run: its method and compression, and how its payloads travel
/// where that is not the all-gather.
fn run_label(cfg: &TrainConfig) -> String {
    let method = cfg.method;
    let label = match method {
        TrainMethod::None => "baseline (no compression)".to_string(),
        TrainMethod::Rtopk => format!(
            "rtopk, {:.1}% compression (k = {}%, r = {}%)",
            100.0 * (1.0 - cfg.ratio),
            100.0 * cfg.ratio,
            100.0 * cfg.ratio * cfg.r_over_k
        ),
        TrainMethod::Sign => "scaled sign".to_string(),
        TrainMethod::Qsgd => format!(
            "QSGD, s = {} ({} bits per element)",
            cfg.levels,
            gradsift::codec::qsgd::code_bits(cfg.levels)
        ),
        m => format!("{m}, {:.1}% compression", 100.0 * (1.0 - cfg.ratio)),
    };
    if cfg.reduce != Reduce::AllGather && method != TrainMethod::None {
        let every = if cfg.reduce == Reduce::Sparse && cfg.threshold_every > 1 {
            format!(", threshold every {} steps", cfg.threshold_every)
        } else {
            String::new()
        };
        format!("{label}, --reduce {}{every}", cfg.reduce)
    } else {
        label
    }
}

/// `--workers` when not given (the simulation; under `--dist mpi` the number of ranks).
pub const DEFAULT_WORKERS: usize = 5;
/// `--batch` when not given, unless the training split cannot give every worker that many.
pub const DEFAULT_BATCH: usize = 32;
/// `--warmup-epochs` when not given, unless `--epochs` is smaller.
pub const DEFAULT_WARMUP_EPOCHS: usize = 2;

impl TrainArgs {
    /// The configuration of the run these options ask for (method and backend left at
    /// [`TrainConfig::default`]'s): each option given on the command line as given, and each
    /// one not given at its default, fitted to the options that were given so that no default
    /// makes the run impossible:
    ///
    /// - `--workers`: [`DEFAULT_WORKERS`], or `ranks` (the workers the transport connects,
    ///   under `--dist mpi`) when that is `Some`;
    /// - `--r-over-k`: the number of workers (the rTop-k paper's choice);
    /// - `--warmup-epochs`: [`DEFAULT_WARMUP_EPOCHS`], or `--epochs` when that is smaller;
    /// - `--batch`: [`DEFAULT_BATCH`], or `train_images / workers` (every worker's shard holds
    ///   one batch) when that is smaller.
    ///
    /// Also returns one line per default that another option changed, saying which value it
    /// took and why (the run prints them in its header). Nothing is checked here: a value
    /// given explicitly that cannot hold is [`TrainConfig::validate`]'s error, naming it.
    pub fn resolve(&self, ranks: Option<usize>, train_images: usize) -> (TrainConfig, Vec<String>) {
        let mut notes = Vec::new();
        let workers = self.workers.or(ranks).unwrap_or(DEFAULT_WORKERS);
        let warmup_epochs = self.warmup_epochs.unwrap_or_else(|| {
            let w = DEFAULT_WARMUP_EPOCHS.min(self.epochs);
            // The baseline has no warm-up to speak of.
            let sparse = self.method.is_none_or(|m| m != TrainMethod::None && !m.is_dense());
            if w < DEFAULT_WARMUP_EPOCHS && sparse {
                notes.push(format!(
                    "warm-up: {w} epoch{}, the default {DEFAULT_WARMUP_EPOCHS} shortened to fit --epochs {} (--warmup-epochs sets it)",
                    if w == 1 { "" } else { "s" },
                    self.epochs
                ));
            }
            w
        });
        let batch = self.batch.unwrap_or_else(|| {
            let fit = (train_images / workers.max(1)).max(1);
            if fit < DEFAULT_BATCH {
                notes.push(format!(
                    "batch: {fit} per worker, the default {DEFAULT_BATCH} shrunk so that the {train_images} training images give each of the {workers} workers one (--batch sets it)"
                ));
                fit
            } else {
                DEFAULT_BATCH
            }
        });
        let cfg = TrainConfig {
            ratio: self.ratio,
            r_over_k: self.r_over_k.unwrap_or(workers as f64),
            workers,
            seed: self.seed,
            epochs: self.epochs,
            batch,
            lr: self.lr,
            warmup_epochs,
            per_layer: self.per_layer,
            momentum: self.momentum,
            average: self.average.into(),
            unbiased: self.unbiased,
            local_steps: self.local_steps,
            model: self.model,
            adapt_every: self.adapt_every,
            reduce: self.reduce,
            threshold_every: self.threshold_every,
            levels: self.levels,
            ..TrainConfig::default()
        };
        (cfg, notes)
    }

    /// The options of a bare `gradsift train` (what `gradsift` with no command runs).
    pub fn default_run() -> Self {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: TrainArgs,
        }
        <Wrapper as clap::Parser>::parse_from(["gradsift"]).args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--method`'s names are clap's (from the variants) and the Display's (from the
    /// library's table): they must be the same words, and every library method must be one.
    #[test]
    fn method_names_are_the_library_table() {
        use clap::ValueEnum;
        for m in TrainMethod::value_variants() {
            let clap_name = m.to_possible_value().expect("no variant is hidden");
            assert_eq!(clap_name.get_name(), m.to_string(), "{m:?}");
        }
        for kind in MethodKind::ALL {
            assert!(
                TrainMethod::value_variants()
                    .iter()
                    .any(|m| m.codec() == Some(kind)),
                "gradsift train offers no --method {kind}"
            );
        }
    }

    fn parse(opts: &[&str]) -> TrainArgs {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: TrainArgs,
        }
        let argv = std::iter::once("gradsift").chain(opts.iter().copied());
        <Wrapper as clap::Parser>::try_parse_from(argv)
            .unwrap()
            .args
    }

    /// With no option given the run is [`TrainConfig::default`], and says nothing about
    /// its defaults.
    #[test]
    fn no_options_resolve_to_the_default_config() {
        let (cfg, notes) = TrainArgs::default_run().resolve(None, 8000);
        assert_eq!(cfg, TrainConfig::default());
        assert!(notes.is_empty(), "{notes:?}");
    }

    /// A default that another option makes impossible follows that option, and the header
    /// says so; the same value given explicitly is the user's, checked as given.
    #[test]
    fn defaults_follow_the_options_given() {
        let (cfg, notes) = parse(&["--epochs", "1"]).resolve(None, 8000);
        assert_eq!((cfg.epochs, cfg.warmup_epochs), (1, 1));
        assert!(cfg.validate().is_ok());
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].contains("warm-up: 1 epoch,") && notes[0].contains("--epochs 1"),
            "{notes:?}"
        );
        // The baseline alone has no warm-up to report.
        let (cfg, notes) = parse(&["--epochs", "1", "--method", "none"]).resolve(None, 8000);
        assert_eq!(cfg.warmup_epochs, 1);
        assert!(notes.is_empty(), "{notes:?}");
        // Explicit and impossible: an error naming the option.
        let (cfg, _) = parse(&["--epochs", "1", "--warmup-epochs", "2"]).resolve(None, 8000);
        match cfg.validate() {
            Err(TrainError::Usage(m)) => assert!(m.contains("--warmup-epochs"), "{m}"),
            other => panic!("{other:?}"),
        }
        // 8000 images / 1000 workers = 8 per worker: the batch shrinks to 8.
        let (cfg, notes) = parse(&["--workers", "1000"]).resolve(None, 8000);
        assert_eq!((cfg.batch, cfg.r_over_k), (8, 1000.0));
        assert!(worker_shards(&cfg, &Mnist::embedded().unwrap().split(2000).0).is_ok());
        assert!(notes[0].starts_with("batch: 8 per worker"), "{notes:?}");
        let (cfg, _) = parse(&["--workers", "1000", "--batch", "32"]).resolve(None, 8000);
        match worker_shards(&cfg, &Mnist::embedded().unwrap().split(2000).0) {
            Err(TrainError::Usage(m)) => {
                assert!(
                    m.contains("--batch 32") && m.contains("--workers 1000"),
                    "{m}"
                )
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        // Under MPI the ranks are the workers (and r/k follows), unless --workers is given.
        let (cfg, _) = parse(&[]).resolve(Some(3), 8000);
        assert_eq!((cfg.workers, cfg.r_over_k), (3, 3.0));
        let (cfg, _) = parse(&["--workers", "4"]).resolve(Some(3), 8000);
        assert_eq!(cfg.workers, 4);
    }

    /// A round of local steps sends the sum of its gradients, each taken at the weights the
    /// previous local steps reached, and leaves the model at the global weights.
    #[test]
    fn local_round_sends_the_accumulated_update_and_restores_the_model() {
        let data = Mnist::embedded().unwrap();
        let cfg = TrainConfig {
            hidden: vec![16],
            batch: 8,
            local_steps: 2,
            lr: 0.1,
            ..TrainConfig::default()
        };
        let model = Model::mlp(&cfg.hidden, 3).unwrap();
        let n = model.num_params();
        let round: Vec<usize> = (100..116).collect();
        let mut global = vec![0f32; n];
        model.read_params(&mut global).unwrap();
        let (mut scratch, mut sent) = (vec![0f32; n], vec![0f32; n]);
        let loss = local_round(
            &model,
            &cfg,
            &data,
            &round,
            &global,
            &mut scratch,
            &mut sent,
        )
        .unwrap();
        let mut after = vec![0f32; n];
        model.read_params(&mut after).unwrap();
        assert!(
            after
                .iter()
                .zip(&global)
                .all(|(a, g)| a.to_bits() == g.to_bits())
        );
        // By hand: g1 at the global weights, one step, g2 there.
        let (mut g1, mut g2) = (vec![0f32; n], vec![0f32; n]);
        let l1 = model.loss_and_grad(&data, &round[..8], &mut g1).unwrap();
        model.apply(&g1, cfg.lr).unwrap();
        let l2 = model.loss_and_grad(&data, &round[8..], &mut g2).unwrap();
        model.write_params(&global).unwrap();
        assert!((loss - (l1 + l2) / 2.0).abs() < 1e-6);
        let scale = g1.iter().map(|x| x.abs()).fold(0f32, f32::max);
        for i in 0..n {
            let want = g1[i] + g2[i];
            // (w - w') / lr loses about |w| / lr * 2^-24 to rounding.
            assert!(
                (sent[i] - want).abs() <= 1e-3 * scale + 1e-4,
                "{i}: {} vs {want}",
                sent[i]
            );
        }
    }
}
