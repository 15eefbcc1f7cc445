//! What `gradsift analyze` reports: the data `render_table`, `write_json` and the plot read.
//! Its own module so that the analysis and the plot both depend on it rather than on each
//! other.

use gradsift::Average;
use gradsift::rd::StepMeasurement;
use serde::Serialize;

/// Server averaging rule (SPEC §7), as `--average` of `analyze` and `train` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AverageArg {
    /// Divide by K.
    OverWorkers,
    /// Divide by the number of workers that sent each coordinate.
    OverSenders,
}

impl From<AverageArg> for Average {
    fn from(a: AverageArg) -> Self {
        match a {
            AverageArg::OverWorkers => Average::OverWorkers,
            AverageArg::OverSenders => Average::OverSenders,
        }
    }
}

/// One layer of the analysed model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerInfo {
    /// Array name (`arr_0`, ... or the name given to `np.savez`).
    pub name: String,
    /// Array shape.
    pub shape: Vec<u64>,
    /// Elements.
    pub n: usize,
}

/// Per-step statistics of the data, size-weighted over layers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepStatistics {
    /// Training step.
    pub step: u64,
    /// Size-weighted `sigma_X^2`.
    pub sigma_x2: f64,
    /// Size-weighted `sigma_N^2`.
    pub sigma_n2: f64,
    /// Per layer `(sigma_X^2, sigma_N^2)`.
    pub layers: Vec<(f64, f64)>,
    /// `sum_l n_l D_sign,l / n`: the distortion of ideal scaled sign under the Gaussian model.
    pub d_sign: f64,
    /// `sum_l n_l R_sum,l(D_sign,l) / n`: Fig. 7's theoretical minimum, bits per coordinate
    /// summed over the `K` workers.
    pub r_sum_sign: f64,
    /// `sum_l n_l R_in,l(D_sign,l) / n`: Fig. 7's "ideal quantization" `R_in(D_sign)`, which is
    /// `K/2 log2(1 + pi/(pi-2))` for every layer with a non-zero variance. 0 for an empty
    /// step (`n = 0`), like every figure here; a layer with both variances 0 adds 0.
    pub r_in_sign: f64,
}

/// The configuration of a method, as written to JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MethodConfig {
    /// `rtopk`, `topk`, `randomk`, `sign` or `qsgd`.
    pub kind: &'static str,
    /// Quantisation levels s (QSGD), else absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub levels: Option<u8>,
    /// Candidate ratio r/n (rTop-k).
    pub r_ratio: Option<f64>,
    /// Send ratio k/n (sparse methods).
    pub k_ratio: Option<f64>,
    /// `global` or `per-layer`.
    pub mode: &'static str,
    /// Values scaled by r/k.
    pub unbiased: bool,
    /// Momentum correction factor.
    pub momentum: f32,
    /// Random-k seed.
    pub seed: u64,
}

/// Means over steps of one method's figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct Summary {
    /// Wire bits per gradient element per worker.
    pub bits_per_element: f64,
    /// Wire bits per coordinate summed over the `K` workers (`K x bits_per_element`): the
    /// unit of `r_sum` and `r_in`.
    pub sent_per_coordinate: f64,
    /// Compression-added distortion per coordinate.
    pub d_c: f64,
    /// Total distortion `sigma_N^2/K + D_c` per coordinate.
    pub d: f64,
    /// `D K / sigma_N^2 - 1`.
    pub rho: f64,
    /// `R_sum(D)`, bits per coordinate summed over the `K` workers.
    pub r_sum: f64,
    /// `R_in(D)`, same unit.
    pub r_in: f64,
    /// The best per-layer split of the same squared error (Corollary 1), same unit.
    pub r_sum_p1: f64,
    /// `sum_t R_sum bits / sum_t wire bits`.
    pub efficiency: f64,
}

/// One method's results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MethodReport {
    /// Display name.
    pub name: String,
    /// Its configuration.
    pub config: MethodConfig,
    /// Per step, in step order.
    pub steps: Vec<StepMeasurement>,
    /// Means over steps.
    pub summary: Summary,
}

/// The whole analysis.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The backend that ran the compressors (`cpu`, `cuda`, `wgpu`).
    pub backend: String,
    /// Workers `K`.
    pub workers: usize,
    /// Gradient elements `n`.
    pub n: usize,
    /// Layers in order.
    pub layers: Vec<LayerInfo>,
    /// Data statistics per step.
    pub statistics: Vec<StepStatistics>,
    /// Server averaging rule.
    pub average: &'static str,
    /// One entry per method.
    pub methods: Vec<MethodReport>,
    /// Things the user should know (backend fallback, skipped files).
    pub notes: Vec<String>,
}
