//! The CUDA backend against the CPU reference (SPEC §11).
//!
//! Two kinds of tests:
//! - `kernels_compile_*`: NVRTC compiles every kernel for sm_80 and sm_90. Needs libnvrtc
//!   only, no GPU. Skips with a printed reason when NVRTC is missing, unless
//!   `GRADSIFT_REQUIRE_NVRTC=1` (CI), which makes that a failure.
//! - everything else: runs on a CUDA device and compares with `gradsift::cpu`. Skips with a
//!   printed reason when there is none, unless `GRADSIFT_REQUIRE_CUDA=1`.

#![cfg(feature = "cuda")]

mod common;

use gradsift::cpu;
use gradsift::cuda;
use gradsift::{
    Config, Count, DType, Element, Error, Layout, Method, Mode, Payload, Scale, SparsePayload,
    VarianceEstimate, bf16, f16,
};

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

fn nvrtc_or_skip() -> bool {
    match cuda::probe_nvrtc() {
        Ok(()) => true,
        Err(e) if required("GRADSIFT_REQUIRE_NVRTC") => {
            panic!("GRADSIFT_REQUIRE_NVRTC=1 but NVRTC is unavailable: {e}")
        }
        Err(e) => {
            println!("SKIPPED: NVRTC not found ({e})");
            false
        }
    }
}

fn compile_for(arch: &str) {
    if !nvrtc_or_skip() {
        return;
    }
    // Machine code first: ptxas must accept every kernel for the real architecture.
    let sm = arch.replace("compute_", "sm_");
    let (cubin, log) = cuda::compile_cubin(&sm).unwrap_or_else(|e| panic!("{e}"));
    assert!(!cubin.is_empty(), "empty cubin for {sm}");
    for name in cuda::KERNEL_NAMES {
        assert!(
            log.contains(&format!("'{name}'")),
            "ptxas did not report {name} for {sm}"
        );
    }
    for line in log.lines().filter(|l| l.contains("spill stores")) {
        if !line.contains(" 0 bytes spill stores, 0 bytes spill loads") {
            println!("warning: {sm}: register spills: {line}");
        }
    }
    println!("{sm}: cubin {} bytes", cubin.len());
    let ptx = cuda::compile_ptx(arch).unwrap_or_else(|e| panic!("{e}"));
    // scripts/gpu-stage.sh keeps these for devices without a usable NVRTC.
    if let Some(dir) = std::env::var_os("GRADSIFT_DUMP_PTX") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{arch}.ptx")), &ptx).unwrap();
    }
    for name in cuda::KERNEL_NAMES {
        assert!(
            ptx.contains(&format!(".entry {name}(")),
            "kernel {name} missing from the {arch} PTX"
        );
    }
}

#[test]
fn kernels_compile_for_sm80() {
    compile_for("compute_80");
}

#[test]
fn kernels_compile_for_sm90() {
    compile_for("compute_90");
}

#[test]
fn no_device_is_an_error_not_a_panic() {
    // On a machine without a driver or GPU this must be a typed error; with one, a context.
    match cuda::Context::new(0) {
        Ok(cx) => println!("CUDA context: {cx:?}"),
        Err(Error::BackendUnavailable { backend, reason }) => {
            assert_eq!(backend, "cuda");
            assert!(!reason.is_empty());
        }
        Err(e) => panic!("expected BackendUnavailable, got {e:?}"),
    }
    assert!(cuda::Context::new(4096).is_err());
}

fn ctx() -> Option<cuda::Context> {
    match cuda::Context::new(0) {
        Ok(cx) => Some(cx),
        Err(e) if required("GRADSIFT_REQUIRE_CUDA") => {
            panic!("GRADSIFT_REQUIRE_CUDA=1 but no CUDA context: {e}")
        }
        Err(e) => {
            println!("SKIPPED: no CUDA device ({e})");
            None
        }
    }
}

// ---- data -------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn gaussian(&mut self) -> f32 {
        ((-2.0 * self.uniform().ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos())
            as f32
    }
    fn below(&mut self, n: u64) -> u64 {
        (self.next_u64() >> 33) % n.max(1)
    }
}

fn gaussian<T: Element>(n: usize, seed: u64, scale: f32) -> Vec<T> {
    let mut r = Rng(seed);
    (0..n).map(|_| T::from_f32(r.gaussian() * scale)).collect()
}

/// Few distinct magnitudes, both zeros, subnormals: every tie rule gets exercised.
fn adversarial<T: Element>(n: usize, seed: u64) -> Vec<T> {
    let mut r = Rng(seed);
    let pool = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        2.0,
        -2.0,
        f32::from_bits(1),
        -f32::from_bits(3),
        1e-3,
    ];
    (0..n)
        .map(|_| T::from_f32(pool[r.below(pool.len() as u64) as usize]))
        .collect()
}

/// Uploads `x` (at least one element: zero-length device buffers are not allocatable, so
/// empty inputs go through the raw-pointer entry points instead).
fn upload<T: Element + cudarc::driver::DeviceRepr>(
    cx: &cuda::Context,
    x: &[T],
) -> cudarc::driver::CudaSlice<T> {
    assert!(!x.is_empty());
    cx.stream().clone_htod(x).unwrap()
}

fn gpu_step<T: Element + cudarc::driver::DeviceRepr>(
    cx: &cuda::Context,
    g: &mut cuda::Compressor,
    grad: &[T],
    t: u64,
) -> gradsift::Result<()> {
    if grad.is_empty() {
        // SAFETY: nothing is read from a zero-length buffer.
        return unsafe { g.step_raw(0, 0, T::DTYPE, t) };
    }
    let dev = upload(cx, grad);
    g.step(&dev, t)?;
    // The upload must outlive the enqueued step.
    cx.synchronize()
}

// ---- compression --------------------------------------------------------------------------

fn same_bits(a: &[f32], b: &[f32]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(usize::MAX);
    }
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
}

/// Runs `steps` gradients through both backends and compares payloads, residual and
/// momentum after every step.
fn compare_steps<T: Element + cudarc::driver::DeviceRepr>(
    cx: &cuda::Context,
    layout: &Layout,
    config: &Config,
    grads: &[Vec<T>],
    what: &str,
) {
    let mut c = cpu::Compressor::new(layout, config).unwrap();
    let mut g = cuda::Compressor::new(cx, layout, config).unwrap();
    let mut got = Payload::Sparse(SparsePayload::default());
    let (mut re, mut mo) = (Vec::new(), Vec::new());
    for (t, grad) in grads.iter().enumerate() {
        let t = t as u64 + 1;
        let want = c.step(grad, t).cloned();
        gpu_step(cx, &mut g, grad, t).unwrap();
        let res = g.read_payload(&mut got);
        match want {
            Err(e) => {
                assert_eq!(res, Err(e.clone()), "{what}: step {t}: error");
            }
            Ok(want) => {
                res.unwrap_or_else(|e| panic!("{what}: step {t}: {e}"));
                compare_payload(&want, &got, config, &format!("{what}: step {t}"));
            }
        }
        g.residual(&mut re).unwrap();
        if config.is_sparse() {
            if let Some(i) = same_bits(&re, c.residual()) {
                panic!(
                    "{what}: step {t}: residual differs at {i}: gpu {:?} cpu {:?}",
                    re.get(i),
                    c.residual().get(i)
                );
            }
        } else {
            for (i, (a, b)) in re.iter().zip(c.residual()).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{what}: step {t}: sign residual {i}: {a} vs {b}"
                );
            }
        }
        g.momentum(&mut mo).unwrap();
        if config.is_sparse() {
            assert_eq!(
                same_bits(&mo, c.momentum()),
                None,
                "{what}: step {t}: momentum"
            );
        }
    }
}

fn compare_payload(want: &Payload, got: &Payload, config: &Config, what: &str) {
    match (want, got) {
        (Payload::Sparse(w), Payload::Sparse(g)) => {
            assert_eq!(w.n, g.n, "{what}: n");
            assert_eq!(w.values_dtype, g.values_dtype, "{what}: dtype");
            if w.indices != g.indices {
                let i = w
                    .indices
                    .iter()
                    .zip(&g.indices)
                    .position(|(a, b)| a != b)
                    .unwrap_or(w.indices.len().min(g.indices.len()));
                panic!(
                    "{what}: indices differ at {i} of {}/{}: cpu {:?} gpu {:?}",
                    w.indices.len(),
                    g.indices.len(),
                    &w.indices[i.saturating_sub(2)..(i + 3).min(w.indices.len())],
                    &g.indices[i.saturating_sub(2)..(i + 3).min(g.indices.len())]
                );
            }
            assert_eq!(same_bits(&w.values, &g.values), None, "{what}: values");
        }
        (Payload::Sign(w), Payload::Sign(g)) => {
            assert_eq!(w.n, g.n);
            assert_eq!(w.scales.len(), g.scales.len(), "{what}: scales");
            for (a, b) in w.scales.iter().zip(&g.scales) {
                assert!((a - b).abs() <= 1e-6 * a.abs(), "{what}: scale {a} vs {b}");
            }
            let diff: u32 = w
                .negative
                .iter()
                .zip(&g.negative)
                .map(|(a, b)| (a ^ b).count_ones())
                .sum();
            // The scales may differ in the last bit, so after step 1 an element within an
            // ulp of zero may land on the other side.
            assert!(
                diff as usize <= w.n as usize / 100_000,
                "{what}: {diff} sign bits differ"
            );
            let _ = config;
        }
        _ => panic!("{what}: payload kinds differ"),
    }
}

fn configs() -> Vec<(String, Config)> {
    let mut out = Vec::new();
    let methods = [
        (
            "rtopk",
            Method::RTopK {
                r: Count::Ratio(0.05),
                k: Count::Ratio(0.01),
            },
        ),
        (
            "topk",
            Method::TopK {
                k: Count::Ratio(0.01),
            },
        ),
        (
            "randomk",
            Method::RandomK {
                k: Count::Ratio(0.01),
            },
        ),
        (
            "rtopk_exact",
            Method::RTopK {
                r: Count::Exact(300),
                k: Count::Exact(7),
            },
        ),
        (
            "all",
            Method::TopK {
                k: Count::Ratio(1.0),
            },
        ),
        ("sign", Method::Sign),
    ];
    for (name, m) in methods {
        for mode in [Mode::Global, Mode::PerLayer] {
            let mut c = Config::new(m);
            c.mode = mode;
            c.seed = 0x1234_5678_9abc_def0;
            c.worker = 3;
            out.push((format!("{name}/{mode:?}"), c.clone()));
            if name == "rtopk" {
                let mut c2 = c.clone();
                c2.momentum = 0.9;
                c2.scale = Scale::Unbiased;
                c2.values = DType::F16;
                out.push((format!("{name}/{mode:?}/momentum/unbiased/f16"), c2));
                let mut c3 = c.clone();
                c3.values = DType::BF16;
                c3.scale = Scale::Unbiased;
                out.push((format!("{name}/{mode:?}/bf16"), c3));
            }
            if name == "sign" {
                let mut c2 = c.clone();
                c2.momentum = 0.5;
                out.push((format!("{name}/{mode:?}/momentum"), c2));
            }
        }
    }
    out
}

fn sizes_layouts(n: usize) -> Vec<Layout> {
    let mut v = vec![Layout::single(n).unwrap()];
    if n >= 3 {
        v.push(Layout::new(&[n / 3, 0, n - n / 3]).unwrap());
    }
    v
}

fn run_all_configs<T: Element + cudarc::driver::DeviceRepr>(cx: &cuda::Context, sizes: &[usize]) {
    for &n in sizes {
        for layout in sizes_layouts(n) {
            let grads: Vec<Vec<T>> = (0..3).map(|s| gaussian::<T>(n, 17 + s, 1.0)).collect();
            for (name, config) in configs() {
                compare_steps(
                    cx,
                    &layout,
                    &config,
                    &grads,
                    &format!(
                        "{}/n={n}/L={}/{name}",
                        std::any::type_name::<T>(),
                        layout.num_layers()
                    ),
                );
            }
        }
    }
}

/// Around the thread-block sizes (256, 512, 1024) and the global block/grid threshold (2^15).
const EDGE_SIZES: [usize; 14] = [
    0, 1, 2, 255, 256, 257, 511, 512, 513, 1023, 1025, 32767, 32768, 32769,
];

#[test]
fn compressor_matches_cpu_f32() {
    let Some(cx) = ctx() else { return };
    run_all_configs::<f32>(&cx, &EDGE_SIZES);
    run_all_configs::<f32>(&cx, &[(1 << 20) + 3]);
}

#[test]
fn compressor_matches_cpu_f16() {
    let Some(cx) = ctx() else { return };
    run_all_configs::<f16>(&cx, &EDGE_SIZES);
    run_all_configs::<f16>(&cx, &[(1 << 20) + 3]);
}

#[test]
fn compressor_matches_cpu_bf16() {
    let Some(cx) = ctx() else { return };
    run_all_configs::<bf16>(&cx, &EDGE_SIZES);
    run_all_configs::<bf16>(&cx, &[(1 << 20) + 3]);
}

#[test]
fn compressor_matches_cpu_2_pow_26() {
    let Some(cx) = ctx() else { return };
    let n = 1 << 26;
    let layout = Layout::single(n).unwrap();
    let grads: Vec<Vec<f32>> = (0..2).map(|s| gaussian::<f32>(n, 5 + s, 1.0)).collect();
    for config in [
        Config::rtopk(0.01, 0.001),
        Config::topk(0.001),
        Config::randomk(0.001),
    ] {
        compare_steps(
            &cx,
            &layout,
            &config,
            &grads,
            &format!("2^26/{:?}", config.method),
        );
    }
    // 32 layers of 2^20 take the block path, two of 2^24 the grid path.
    let mut sizes: Vec<usize> = (0..32).map(|_| 1 << 20).collect();
    sizes.extend([1 << 24, 1 << 24]);
    let layout = Layout::new(&sizes).unwrap();
    let mut c = Config::rtopk(0.01, 0.001);
    c.mode = Mode::PerLayer;
    compare_steps(&cx, &layout, &c, &grads, "2^26/per-layer");
}

#[test]
fn thousand_mixed_layers() {
    let Some(cx) = ctx() else { return };
    let mut r = Rng(99);
    let mut sizes: Vec<usize> = (0..1000)
        .map(|i| match i % 10 {
            0 => 0,
            1..=6 => 1 + r.below(3000) as usize,
            7 | 8 => 20_000 + r.below(20_000) as usize,
            _ => 1 + r.below(40) as usize,
        })
        .collect();
    // Around the per-layer block/grid threshold (2^20).
    sizes[500] = 1 << 20;
    sizes[501] = (1 << 20) + 1;
    sizes[999] = 300_001;
    let layout = Layout::new(&sizes).unwrap();
    let n = layout.n();
    let grads: Vec<Vec<f32>> = (0..3).map(|s| gaussian::<f32>(n, 40 + s, 1.0)).collect();
    for (name, mut config) in configs() {
        config.mode = Mode::PerLayer;
        compare_steps(
            &cx,
            &layout,
            &config,
            &grads,
            &format!("1000 layers/{name}"),
        );
    }
}

#[test]
fn adversarial_ties() {
    let Some(cx) = ctx() else { return };
    for n in [1000usize, 32769, (1 << 20) + 3] {
        let grads: Vec<Vec<f32>> = (0..3).map(|s| adversarial::<f32>(n, 7 + s)).collect();
        let zeros = vec![vec![0.0f32; n]; 2];
        let equal = vec![vec![1.5f32; n]; 2];
        for layout in sizes_layouts(n) {
            for (name, config) in configs() {
                let tag = format!("ties/n={n}/{name}");
                compare_steps(&cx, &layout, &config, &grads, &tag);
                compare_steps(&cx, &layout, &config, &zeros, &format!("{tag}/zeros"));
                compare_steps(&cx, &layout, &config, &equal, &format!("{tag}/equal"));
            }
        }
        let grads16: Vec<Vec<bf16>> = (0..2).map(|s| adversarial::<bf16>(n, 70 + s)).collect();
        compare_steps(
            &cx,
            &Layout::single(n).unwrap(),
            &Config::rtopk(0.3, 0.1),
            &grads16,
            "ties/bf16",
        );
    }
}

#[test]
fn nan_steps_are_rejected_and_leave_state_untouched() {
    let Some(cx) = ctx() else { return };
    for n in [100usize, 40_000, (1 << 20) + 3] {
        for (name, mut config) in configs() {
            config.momentum = if name.contains("momentum") { 0.9 } else { 0.0 };
            let layout = Layout::new(&[n / 2, n - n / 2]).unwrap();
            let mut bad = gaussian::<f32>(n, 3, 1.0);
            bad[n / 3] = f32::NAN;
            bad[n - 1] = f32::INFINITY;
            let mut huge = gaussian::<f32>(n, 4, 1.0);
            huge[7] = f32::MAX;
            let grads = vec![
                gaussian::<f32>(n, 1, 1.0),
                bad,
                gaussian::<f32>(n, 2, 1.0),
                huge.clone(),
                huge,
            ];
            compare_steps(&cx, &layout, &config, &grads, &format!("nan/n={n}/{name}"));
        }
    }
}

/// SPEC §5: a sent value that only `Scale::Unbiased` makes non-finite (`|p| * scale >
/// f32::MAX`) fails the step like a non-finite `p`: the same `Error::NonFinite` (count and
/// first index of those values) as the CPU, residual and momentum untouched. Block-sized and
/// grid-wide groups, f32 and f16 values, all or some of the sent values overflowing.
#[test]
fn unbiased_scale_overflow_is_rejected() {
    let Some(cx) = ctx() else { return };
    for n in [3000usize, 40_000, (1 << 20) + 3] {
        let layout = Layout::new(&[n / 2, n - n / 2]).unwrap();
        for mode in [Mode::Global, Mode::PerLayer] {
            for (values, momentum) in [(DType::F32, 0.0), (DType::F16, 0.9)] {
                for every in [5usize, 97] {
                    let mut config = Config::rtopk(0.05, 0.01);
                    config.scale = Scale::Unbiased;
                    config.mode = mode;
                    config.values = values;
                    config.momentum = momentum;
                    let mut planted = gaussian::<f32>(n, 5, 1.0);
                    for i in (0..n).step_by(every) {
                        planted[i] = if i % 2 == 0 { 1e38 } else { -1e38 };
                    }
                    let grads = vec![gaussian::<f32>(n, 1, 1.0), planted, gaussian(n, 2, 1.0)];
                    let what = format!("scaled overflow n={n} {mode:?} {values:?} 1/{every}");
                    // The reference rejects the planted step (compare_steps uses t = 1, 2, ..).
                    let mut c = cpu::Compressor::new(&layout, &config).unwrap();
                    c.step(&grads[0], 1).unwrap();
                    let r = c.step(&grads[1], 2).map(|_| ());
                    assert!(matches!(r, Err(Error::NonFinite { .. })), "{what}: {r:?}");
                    compare_steps(&cx, &layout, &config, &grads, &what);
                }
            }
        }
    }
}

#[test]
fn bad_input_is_an_error() {
    let Some(cx) = ctx() else { return };
    let layout = Layout::single(100).unwrap();
    let mut g = cuda::Compressor::new(&cx, &layout, &Config::topk(0.1)).unwrap();
    let short = cx.stream().clone_htod(&[1.0f32; 99]).unwrap();
    assert!(matches!(
        g.step(&short, 1),
        Err(Error::LengthMismatch { .. })
    ));
    let mut p = Payload::Sparse(SparsePayload::default());
    assert!(g.read_payload(&mut p).is_err(), "no step yet");
    assert!(cuda::Compressor::new(&cx, &layout, &Config::rtopk(0.1, 0.2)).is_err());
}

// ---- statistics -----------------------------------------------------------------------------

fn stats_case<T: Element + cudarc::driver::DeviceRepr>(
    cx: &cuda::Context,
    layout: &Layout,
    x: &[T],
    what: &str,
) {
    let mut want = Vec::new();
    cpu::layer_stats(x, layout, &mut want).unwrap();
    let mut plan = cuda::Stats::new(cx, layout, 4).unwrap();
    let mut got = Vec::new();
    if x.is_empty() {
        // SAFETY: nothing is read from a zero-length buffer.
        unsafe { plan.layer_stats_raw(0, 0, T::DTYPE, &mut got) }.unwrap();
        // Debug strings: empty layers have NaN moments (SPEC §8), and NaN != NaN.
        assert_eq!(format!("{want:?}"), format!("{got:?}"));
        return;
    }
    let dev = upload(cx, x);
    plan.layer_stats(&dev, &mut got).unwrap();
    assert_eq!(want.len(), got.len());
    for (l, (w, g)) in want.iter().zip(&got).enumerate() {
        common::assert_stats_close(w, g, &format!("{what}: layer {l}"));
    }
    // Reuse: a second call on the same plan gives the same result.
    let mut again = Vec::new();
    plan.layer_stats(&dev, &mut again).unwrap();
    assert_eq!(
        format!("{got:?}"),
        format!("{again:?}"),
        "{what}: deterministic"
    );
}

#[test]
fn layer_stats_match_cpu() {
    let Some(cx) = ctx() else { return };
    for n in [0usize, 1, 255, 4095, 4096, 4097, (1 << 20) + 3] {
        for layout in sizes_layouts(n) {
            let mut x = gaussian::<f32>(n, 8, 3.0);
            stats_case(&cx, &layout, &x, &format!("f32 n={n}"));
            // An offset mean: the centred second pass must keep the variance.
            let off: Vec<f32> = x.iter().map(|v| v + 1000.0).collect();
            stats_case(&cx, &layout, &off, &format!("f32+1000 n={n}"));
            if n > 10 {
                x[3] = f32::NAN;
                x[n - 1] = f32::NEG_INFINITY;
                stats_case(&cx, &layout, &x, &format!("f32 nan n={n}"));
                // A layer with nothing finite: NaN moments (SPEC §8).
                let mut y = x.clone();
                for (j, i) in layout.layer(0).enumerate() {
                    y[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][j % 3];
                }
                stats_case(&cx, &layout, &y, &format!("f32 all-bad layer 0 n={n}"));
            }
            stats_case(
                &cx,
                &layout,
                &gaussian::<f16>(n, 9, 2.0),
                &format!("f16 n={n}"),
            );
            stats_case(
                &cx,
                &layout,
                &gaussian::<bf16>(n, 10, 2.0),
                &format!("bf16 n={n}"),
            );
        }
    }
    let mut r = Rng(5);
    let sizes: Vec<usize> = (0..1000)
        .map(|i| {
            if i % 7 == 0 {
                0
            } else {
                r.below(9000) as usize
            }
        })
        .collect();
    let layout = Layout::new(&sizes).unwrap();
    stats_case(
        &cx,
        &layout,
        &gaussian::<f32>(layout.n(), 11, 1.0),
        "1000 layers",
    );
    let big = Layout::new(&[1 << 26]).unwrap();
    stats_case(&cx, &big, &gaussian::<f32>(1 << 26, 12, 1.0), "2^26");
}

fn close_var(w: &VarianceEstimate, g: &VarianceEstimate, what: &str) {
    for (a, b, name) in [
        (w.sigma_n2, g.sigma_n2, "sigma_n2"),
        (w.sigma_x2, g.sigma_x2, "sigma_x2"),
    ] {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs() + 1e-12,
            "{what}: {name} {a} vs {b}"
        );
    }
}

fn var_case<T: Element + cudarc::driver::DeviceRepr>(
    cx: &cuda::Context,
    layout: &Layout,
    k: usize,
    what: &str,
) {
    let n = layout.n();
    let x = gaussian::<f32>(n, 100, 2.0);
    let ys: Vec<Vec<T>> = (0..k)
        .map(|w| {
            let noise = gaussian::<f32>(n, 200 + w as u64, 0.5);
            x.iter()
                .zip(&noise)
                .map(|(a, b)| T::from_f32(a + b))
                .collect()
        })
        .collect();
    let refs: Vec<&[T]> = ys.iter().map(|v| v.as_slice()).collect();
    let mut want = Vec::new();
    cpu::estimate_variance(&refs, layout, &mut want).unwrap();
    let devs: Vec<_> = ys.iter().map(|v| upload(cx, v)).collect();
    let drefs: Vec<_> = devs.iter().collect();
    let mut got = Vec::new();
    cuda::estimate_variance(cx, &drefs, layout, &mut got).unwrap();
    for (l, (w, g)) in want.iter().zip(&got).enumerate() {
        close_var(w, g, &format!("{what}: layer {l}"));
    }
}

#[test]
fn variance_matches_cpu() {
    let Some(cx) = ctx() else { return };
    for n in [1usize, 4097, (1 << 20) + 3] {
        for layout in sizes_layouts(n) {
            for k in [2, 3, 8] {
                var_case::<f32>(&cx, &layout, k, &format!("f32 n={n} K={k}"));
                var_case::<f16>(&cx, &layout, k, &format!("f16 n={n} K={k}"));
                var_case::<bf16>(&cx, &layout, k, &format!("bf16 n={n} K={k}"));
            }
        }
    }
    // Non-finite input: the same error as the CPU.
    let layout = Layout::single(1000).unwrap();
    let a = gaussian::<f32>(1000, 1, 1.0);
    let mut b = gaussian::<f32>(1000, 2, 1.0);
    b[10] = f32::NAN;
    b[500] = f32::INFINITY;
    let want = cpu::estimate_variance(&[&a[..], &b[..]], &layout, &mut Vec::new());
    let (da, db) = (upload(&cx, &a), upload(&cx, &b));
    let got = cuda::estimate_variance(&cx, &[&da, &db], &layout, &mut Vec::new());
    assert_eq!(want, got);
    assert!(matches!(
        cuda::estimate_variance(&cx, &[&da], &layout, &mut Vec::new()),
        Err(Error::InvalidConfig(_))
    ));
}

// ---- aggregation ----------------------------------------------------------------------------

fn payloads_for(layout: &Layout, config: &Config, k: usize, step: u64) -> Vec<Payload> {
    (0..k)
        .map(|w| {
            let mut c = config.clone();
            c.worker = w as u32;
            let mut comp = cpu::Compressor::new(layout, &c).unwrap();
            comp.step(&gaussian::<f32>(layout.n(), 1000 + w as u64, 1.0), step)
                .unwrap()
                .clone()
        })
        .collect()
}

#[test]
fn aggregation_matches_cpu_bit_for_bit() {
    let Some(cx) = ctx() else { return };
    for n in [1usize, 257, 4097, (1 << 20) + 3] {
        for layout in sizes_layouts(n) {
            for (name, config) in configs() {
                for rule in [cpu::Average::OverWorkers, cpu::Average::OverSenders] {
                    for k in [1usize, 3, 8] {
                        let ps = payloads_for(&layout, &config, k, 1);
                        let mut want = vec![0.0f32; n];
                        cpu::Aggregator::new(&layout, config.mode, rule, k)
                            .unwrap()
                            .aggregate(&ps, &mut want)
                            .unwrap();
                        let mut agg =
                            cuda::Aggregator::new(&cx, &layout, config.mode, rule, k).unwrap();
                        let mut got = vec![f32::NAN; n];
                        agg.aggregate(&ps, &mut got).unwrap();
                        assert_eq!(
                            same_bits(&want, &got),
                            None,
                            "agg n={n} {name} {rule:?} K={k}"
                        );
                        let mut dev = cx.stream().alloc_zeros::<f32>(n).unwrap();
                        agg.aggregate_device(&ps, &mut dev).unwrap();
                        let back = cx.stream().clone_dtoh(&dev).unwrap();
                        assert_eq!(same_bits(&want, &back), None, "agg device n={n} {name}");
                    }
                }
            }
        }
    }
}

#[test]
fn bad_payloads_are_rejected_and_out_untouched() {
    let Some(cx) = ctx() else { return };
    let n = 5000;
    let layout = Layout::single(n).unwrap();
    let good = payloads_for(&layout, &Config::topk(0.01), 3, 1);
    let mut cases: Vec<(String, Vec<Payload>)> = Vec::new();
    let mutate = |f: &dyn Fn(&mut SparsePayload)| {
        let mut ps = good.clone();
        if let Payload::Sparse(p) = &mut ps[1] {
            f(p);
        }
        ps
    };
    cases.push((
        "out of range".into(),
        mutate(&|p| *p.indices.last_mut().unwrap() = n as u32),
    ));
    cases.push(("duplicate".into(), mutate(&|p| p.indices[1] = p.indices[0])));
    cases.push(("unsorted".into(), mutate(&|p| p.indices.swap(0, 1))));
    cases.push(("nan value".into(), mutate(&|p| p.values[2] = f32::NAN)));
    cases.push((
        "length".into(),
        mutate(&|p| {
            p.values.pop();
        }),
    ));
    cases.push(("wrong n".into(), mutate(&|p| p.n = 4999)));
    let mut both = mutate(&|p| p.values[0] = f32::INFINITY);
    if let Payload::Sparse(p) = &mut both[2] {
        p.indices[0] = u32::MAX;
    }
    cases.push(("first bad worker wins".into(), both));
    for rule in [cpu::Average::OverWorkers, cpu::Average::OverSenders] {
        let mut cpu_agg = cpu::Aggregator::new(&layout, Mode::Global, rule, 3).unwrap();
        let mut gpu_agg = cuda::Aggregator::new(&cx, &layout, Mode::Global, rule, 3).unwrap();
        for (name, ps) in &cases {
            let mut a = vec![7.0f32; n];
            let mut b = vec![7.0f32; n];
            let want = cpu_agg.aggregate(ps, &mut a);
            let got = gpu_agg.aggregate(ps, &mut b);
            assert!(want.is_err(), "{name}: the reference accepts it");
            assert_eq!(want, got, "{name}");
            assert!(b.iter().all(|&v| v == 7.0), "{name}: out was written");
            let mut dev = cx.stream().clone_htod(&vec![7.0f32; n]).unwrap();
            assert!(gpu_agg.aggregate_device(ps, &mut dev).is_err());
            let back = cx.stream().clone_dtoh(&dev).unwrap();
            assert!(
                back.iter().all(|&v| v == 7.0),
                "{name}: device out was written"
            );
        }
        assert!(gpu_agg.aggregate(&good[..2], &mut vec![0.0; n]).is_err());
        assert!(gpu_agg.aggregate(&good, &mut vec![0.0; n - 1]).is_err());
    }
    assert!(
        cuda::Aggregator::new(&cx, &layout, Mode::Global, cpu::Average::OverWorkers, 0).is_err()
    );
}

/// The GPU's own payloads feed the GPU aggregator: the end-to-end path of a training step.
#[test]
fn gpu_payloads_round_trip() {
    let Some(cx) = ctx() else { return };
    let layout = Layout::new(&[1000, 70_000, 3]).unwrap();
    let n = layout.n();
    let mut config = Config::rtopk(0.1, 0.02);
    config.mode = Mode::PerLayer;
    config.scale = Scale::Unbiased;
    let mut ps = Vec::new();
    for w in 0..4u32 {
        let mut c = config.clone();
        c.worker = w;
        let mut g = cuda::Compressor::new(&cx, &layout, &c).unwrap();
        gpu_step(&cx, &mut g, &gaussian::<f32>(n, 60 + u64::from(w), 1.0), 9).unwrap();
        let mut p = Payload::Sparse(SparsePayload::default());
        g.read_payload(&mut p).unwrap();
        ps.push(p);
    }
    let mut want = vec![0.0; n];
    cpu::Aggregator::new(&layout, Mode::PerLayer, cpu::Average::OverWorkers, 4)
        .unwrap()
        .aggregate(&ps, &mut want)
        .unwrap();
    let mut got = vec![0.0; n];
    cuda::Aggregator::new(&cx, &layout, Mode::PerLayer, cpu::Average::OverWorkers, 4)
        .unwrap()
        .aggregate(&ps, &mut got)
        .unwrap();
    assert_eq!(same_bits(&want, &got), None);
}

/// Philox through random-k with `r = n`: identical indices on every backend (SPEC §3).
#[test]
fn random_k_uses_the_spec_keys() {
    let Some(cx) = ctx() else { return };
    for n in [10usize, 5000, 100_000] {
        let layout = Layout::single(n).unwrap();
        let x = gaussian::<f32>(n, 1, 1.0);
        let mut c = Config::randomk(0.05);
        c.seed = u64::MAX;
        c.worker = u32::MAX;
        let want = cpu::rtopk(
            &x,
            n,
            Count::Ratio(0.05).resolve(n),
            c.worker,
            u64::MAX,
            c.seed,
        )
        .unwrap();
        let mut g = cuda::Compressor::new(&cx, &layout, &c).unwrap();
        gpu_step(&cx, &mut g, &x, u64::MAX).unwrap();
        let mut p = Payload::Sparse(SparsePayload::default());
        g.read_payload(&mut p).unwrap();
        let Payload::Sparse(p) = p else { panic!() };
        assert_eq!(p.indices, want, "n={n}");
    }
}

#[test]
fn top_r_alone_matches_cpu() {
    let Some(cx) = ctx() else { return };
    for n in [1usize, 257, 32769, (1 << 20) + 3] {
        let inputs = [
            gaussian::<f32>(n, 31, 1.0),
            adversarial::<f32>(n, 32),
            vec![0.25f32; n],
        ];
        for x in &inputs {
            let dev = upload(&cx, x);
            for r in [0, 1, n / 1000 + 1, n / 2, n.saturating_sub(1), n] {
                let want = cpu::top_r(x, r).unwrap();
                let mut plan = cuda::TopR::new(&cx, n, r).unwrap();
                plan.select(&dev).unwrap();
                let mut got = Vec::new();
                plan.read(&mut got).unwrap();
                assert_eq!(got, want, "top_r n={n} r={r}");
            }
        }
    }
}
