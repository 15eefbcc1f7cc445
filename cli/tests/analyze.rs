//! `gradsift analyze` end to end on the NumPy fixtures of tests/data (made by
//! scripts/make_npz_fixture.py), its messages for bad files, and the built-in MNIST default.

use gradsift::{Average, Backend};
use gradsift_cli::analyze::{
    AnalyzeArgs, EMBEDDED_PLOT, EMBEDDED_STEPS, analyze, analyze_steps, discover,
    embedded_default_at, methods, parse_file_name, plot_path, render_table, write_json,
};
use gradsift_cli::plot;
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};

fn data(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data")
        .join(p)
}

fn args(inputs: &[&str]) -> AnalyzeArgs {
    AnalyzeArgs {
        inputs: inputs.iter().map(|p| data(p)).collect(),
        ratios: vec![0.05, 0.25],
        ..AnalyzeArgs::default()
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs())
}

#[test]
fn fixture_report_matches_numpy_statistics_and_counts_every_method() {
    let report = analyze(&args(&["good"])).unwrap();
    assert_eq!(report.workers, 3);
    assert_eq!(report.n, 16 * 8 + 16 + 4 * 16);
    let names: Vec<&str> = report.layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["arr_0", "arr_1", "arr_2"]);
    assert_eq!(report.layers[2].shape, vec![4, 16]);

    // sigma_X^2 and sigma_N^2 against NumPy's (float16, float64, Fortran-order and
    // compressed members included: any misread element would move them).
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data("good/expected.json")).unwrap())
            .unwrap();
    let steps = expected["steps"].as_array().unwrap();
    assert_eq!(report.statistics.len(), steps.len());
    for (s, e) in report.statistics.iter().zip(steps) {
        assert_eq!(s.step, e["step"].as_u64().unwrap());
        for ((sx, sn), el) in s.layers.iter().zip(e["layers"].as_array().unwrap()) {
            let (ex, en) = (
                el["sigma_x2"].as_f64().unwrap(),
                el["sigma_n2"].as_f64().unwrap(),
            );
            assert!(
                close(*sx, ex, 1e-9),
                "step {}: sigma_x2 {sx} vs {ex}",
                s.step
            );
            assert!(
                close(*sn, en, 1e-9),
                "step {}: sigma_n2 {sn} vs {en}",
                s.step
            );
        }
    }

    // Three methods per ratio plus sign, each measured at both steps.
    let methods: Vec<&str> = report.methods.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        methods,
        [
            "rtopk r=20% k=5%",
            "topk 5%",
            "randomk 5%",
            "rtopk r=100% k=25%",
            "topk 25%",
            "randomk 25%",
            "sign"
        ]
    );
    for m in &report.methods {
        assert_eq!(m.steps.len(), 2, "{}", m.name);
        for s in &m.steps {
            assert!(s.bits > 0 && s.d > s.sigma_n2 / 3.0 * 0.999, "{}", m.name);
            assert!(s.efficiency > 0.0 && s.efficiency.is_finite(), "{}", m.name);
            assert!(close(
                s.bits_per_element,
                s.bits as f64 / (3.0 * report.n as f64),
                1e-15
            ));
        }
    }
    // Sending 25% costs more than 5% and distorts less, at the first step (no residual yet).
    let first = |name: &str| {
        &report
            .methods
            .iter()
            .find(|m| m.name == name)
            .unwrap()
            .steps[0]
    };
    assert!(first("topk 25%").bits > first("topk 5%").bits);
    assert!(first("topk 25%").d < first("topk 5%").d);
    // Sign: per worker an 8-byte header, the group count, three f32 scales and one bit per
    // element (208 bits, byte-aligned).
    let sign = first("sign");
    assert_eq!(sign.bits, 3 * (64 + 32 + 3 * 32 + 208));
}

#[test]
fn table_json_and_plot_are_written() {
    let report = analyze(&args(&["good"])).unwrap();
    let table = render_table(&report, true);
    for needle in [
        "K = 3 workers, 2 steps (0..1), 3 layers, n = 208",
        "bits/elem",
        "R_sum(D)",
        "R_in(D)",
        "efficiency",
        "rtopk r=20% k=5%",
        "randomk 25%",
        "sign",
    ] {
        assert!(table.contains(needle), "table lacks {needle:?}:\n{table}");
    }
    let dir = std::env::temp_dir().join(format!("gradsift-analyze-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let json = dir.join("report.json");
    write_json(&report, &json).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["workers"], 3);
    assert_eq!(v["methods"].as_array().unwrap().len(), 7);
    let step = &v["methods"][0]["steps"][1];
    for key in [
        "bits",
        "bits_per_element",
        "d",
        "d_c",
        "rho",
        "r_sum_bits",
        "efficiency",
    ] {
        assert!(step[key].is_number(), "{key} missing: {step}");
    }
    assert_eq!(step["layers"].as_array().unwrap().len(), 3);

    let png = dir.join("fig7.png");
    plot::draw(&report, &png).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        bytes.len() > 20_000,
        "suspiciously small plot: {} bytes",
        bytes.len()
    );
    std::fs::remove_dir_all(&dir).ok();
}

fn error_of(dir: &str) -> String {
    match analyze(&args(&[dir])) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("{dir} was accepted"),
    }
}

#[test]
fn mismatched_shape_names_the_file_and_array() {
    let e = error_of("bad_shape");
    assert!(
        e.contains("grads_w1_s0.npz") && e.contains("'arr_1'"),
        "{e}"
    );
    assert!(e.contains("shape (4,) differs from (3,)"), "{e}");
}

#[test]
fn nan_names_the_file_array_and_index() {
    let e = error_of("bad_nan");
    assert!(
        e.contains("grads_w1_s0.npz") && e.contains("'arr_1'"),
        "{e}"
    );
    assert!(
        e.contains("1 non-finite") && e.contains("flat index 1"),
        "{e}"
    );
}

#[test]
fn wrong_dtype_names_the_file_array_and_dtype() {
    let e = error_of("bad_dtype");
    assert!(
        e.contains("grads_w1_s0.npz") && e.contains("'arr_0'"),
        "{e}"
    );
    assert!(e.contains("'<i8'") && e.contains("float32"), "{e}");
}

#[test]
fn missing_layer_names_both_files() {
    let e = error_of("bad_count");
    assert!(
        e.contains("grads_w1_s0.npz") && e.contains("1 arrays"),
        "{e}"
    );
    assert!(e.contains("grads_w0_s0.npz has 2"), "{e}");
}

#[test]
fn file_discovery_rules() {
    assert_eq!(parse_file_name("grads_w12_s300.npz"), Some((12, 300)));
    assert_eq!(parse_file_name("w0_s1.NPY"), Some((0, 1)));
    assert_eq!(parse_file_name("run-a_w3_s4.npz"), Some((3, 4)));
    assert_eq!(parse_file_name("grads_w1_s.npz"), None);
    assert_eq!(parse_file_name("grads_w1_s2.txt"), None);
    assert_eq!(parse_file_name("grads_new1_s2.npz"), None);

    let files = discover(&[data("good")]).unwrap();
    assert_eq!(files.steps.len(), 2);
    assert!(files.steps.iter().all(|(_, f)| f.len() == 3));

    // Files named otherwise are the workers of one step, in the order given.
    let dir = std::env::temp_dir().join(format!("gradsift-discover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("first.npz"), dir.join("second.npz"));
    std::fs::copy(data("good/grads_w0_s0.npz"), &a).unwrap();
    std::fs::copy(data("good/grads_w1_s0.npz"), &b).unwrap();
    let f = discover(&[a.clone(), b.clone()]).unwrap();
    assert_eq!(f.steps, vec![(0, vec![a.clone(), b])]);
    let e = discover(std::slice::from_ref(&a)).unwrap_err().to_string();
    assert!(e.contains("only 1 worker"), "{e}");
    let e = discover(&[a, data("good/grads_w0_s0.npz")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot mix"), "{e}");
    // A step that lacks a worker.
    let e = discover(&[
        data("good/grads_w0_s0.npz"),
        data("good/grads_w1_s0.npz"),
        data("good/grads_w0_s1.npz"),
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("step 1 has no file for worker 1"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Opens `backend` the way the CLI does; `None` (with a SKIPPED line) when it cannot run on
/// this machine, unless CI requires it (GRADSIFT_REQUIRE_WGPU / GRADSIFT_REQUIRE_CUDA).
fn run_on(backend: Backend, base: &AnalyzeArgs) -> Option<gradsift_cli::analyze::Report> {
    let mut a = base.clone();
    a.backend = backend;
    match analyze(&a) {
        Ok(r) => Some(r),
        Err(e) => {
            let e = e.to_string();
            assert!(
                e.contains(&format!("{backend} backend unavailable")),
                "an unavailable backend is a typed error naming it: {e}"
            );
            let var = format!("GRADSIFT_REQUIRE_{}", backend.name().to_uppercase());
            assert!(
                std::env::var(&var).is_err(),
                "{var} is set but the {backend} backend did not open: {e}"
            );
            println!("SKIPPED: gradsift analyze --backend {backend}: {e}");
            None
        }
    }
}

#[test]
fn every_backend_gives_the_cpu_analysis() {
    let base = args(&["good"]);
    let cpu = analyze(&base).unwrap();
    assert_eq!(cpu.backend, "cpu");
    for backend in [Backend::Wgpu, Backend::Cuda] {
        let Some(r) = run_on(backend, &base) else {
            continue;
        };
        assert_eq!(r.backend, backend.name());
        assert!(
            r.notes.iter().any(|n| n.contains("uploaded once per step")),
            "the report says where the gradients come from: {:?}",
            r.notes
        );
        assert_eq!(r.methods.len(), cpu.methods.len());
        for (g, c) in r.methods.iter().zip(&cpu.methods) {
            // Payloads are bit-identical without momentum (docs/SPEC.md §11), so the wire
            // bits are equal; the statistics are reductions, within the §8 tolerance.
            for (gs, cs) in g.steps.iter().zip(&c.steps) {
                assert_eq!(gs.bits, cs.bits, "{backend} {}: bits", g.name);
                assert!(
                    close(gs.sigma_n2, cs.sigma_n2, 1e-4),
                    "{backend} {}",
                    g.name
                );
                assert!(close(gs.d_c, cs.d_c, 1e-4), "{backend} {}: D_c", g.name);
            }
        }
    }
}

#[test]
fn auto_says_what_it_skipped() {
    let mut a = args(&["good"]);
    a.backend = Backend::Auto;
    let r = analyze(&a).unwrap();
    // Auto takes CUDA, then wgpu, then the CPU, and names every backend it passed over.
    let order = ["cuda", "wgpu", "cpu"];
    let at = order.iter().position(|b| *b == r.backend).unwrap();
    for skipped in &order[..at] {
        assert!(
            r.notes
                .iter()
                .any(|n| n.contains(&format!("skipped {skipped}"))),
            "{:?}",
            r.notes
        );
    }
}

// The embedded default trains the built-in MNIST MLP in-process; the test asks for early steps
// only, so that it stays a few seconds long on a loaded machine.
#[test]
fn embedded_default_is_the_mnist_workers_gradients() {
    let steps = [0, 5, 20];
    let (layers, workers, data) = embedded_default_at(&steps).unwrap();
    assert_eq!(workers, 5);
    let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "fc1.weight",
            "fc1.bias",
            "fc2.weight",
            "fc2.bias",
            "fc3.weight",
            "fc3.bias"
        ]
    );
    let shapes: Vec<Vec<u64>> = layers.iter().map(|l| l.shape.clone()).collect();
    assert_eq!(
        shapes,
        [
            vec![784, 128],
            vec![128],
            vec![128, 64],
            vec![64],
            vec![64, 10],
            vec![10]
        ]
    );
    let n: usize = layers.iter().map(|l| l.n).sum();
    assert_eq!(n, 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10);
    assert_eq!(data.iter().map(|d| d.step).collect::<Vec<_>>(), [0, 5, 20]);
    for d in &data {
        assert_eq!(d.grads.len(), 5);
        for g in &d.grads {
            assert_eq!(g.len(), n);
            assert!(g.iter().all(|v| v.is_finite()));
        }
        // Each worker has its own batch, so their gradients differ.
        assert_ne!(d.grads[0], d.grads[1]);
    }
    // Training moves the model: a later step's gradients are not the first step's.
    assert_ne!(data[0].grads[0], data[2].grads[0]);

    // Deterministic, and a step's gradients do not depend on which others are asked for.
    let (_, _, again) = embedded_default_at(&[5]).unwrap();
    assert_eq!(again[0].grads, data[1].grads);
    assert!(embedded_default_at(&[5, 5]).is_err());
    assert!(embedded_default_at(&[500]).is_err());

    // Every method runs on them and the statistics are those of real gradients.
    let methods = methods(&AnalyzeArgs::default()).unwrap();
    let report = analyze_steps(
        layers,
        workers,
        data.into_iter().map(Ok),
        &methods,
        Average::OverWorkers,
        &gradsift::Device::cpu(),
        &ProgressBar::hidden(),
    )
    .unwrap();
    assert_eq!(report.workers, 5);
    assert_eq!(report.methods.len(), methods.len());
    assert_eq!(
        methods.len(),
        10,
        "three ratios x three sparsifiers, and sign"
    );
    assert_eq!(report.statistics.len(), 3);
    for s in &report.statistics {
        assert!(s.sigma_x2.is_finite() && s.sigma_x2 > 0.0, "{s:?}");
        assert!(s.sigma_n2.is_finite() && s.sigma_n2 > 0.0, "{s:?}");
        for &(x, nn) in &s.layers {
            assert!(
                x.is_finite() && x >= 0.0 && nn.is_finite() && nn > 0.0,
                "{s:?}"
            );
        }
    }
    let table = render_table(&report, false);
    for m in &report.methods {
        assert_eq!(m.steps.len(), 3, "{}", m.name);
        assert!(m.summary.bits_per_element > 0.0, "{}", m.name);
        assert!(m.summary.efficiency.is_finite(), "{}", m.name);
        assert!(
            table.lines().any(|l| l.starts_with(m.name.as_str())),
            "no row for {}:\n{table}",
            m.name
        );
    }
}

#[test]
fn bare_analyze_uses_the_embedded_default_and_draws_the_plot() {
    assert_eq!(EMBEDDED_STEPS.first(), Some(&0));
    assert!(EMBEDDED_STEPS.len() >= 4);
    let bare = AnalyzeArgs::default();
    assert_eq!(plot_path(&bare), Some(PathBuf::from(EMBEDDED_PLOT)));
    let chosen = AnalyzeArgs {
        plot: Some("elsewhere.png".into()),
        ..AnalyzeArgs::default()
    };
    assert_eq!(plot_path(&chosen), Some(PathBuf::from("elsewhere.png")));
    assert_eq!(plot_path(&args(&["good"])), None);
}

/// Writes a little-endian float32 `.npy` file of `shape` holding `data`.
fn write_npy(path: &Path, shape: &[usize], data: &[f32]) {
    let dims = match shape {
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gradsift-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `gradsift analyze worker0.npy worker1.npy`: a .npy file's one array is matched by
/// position (named arr_0), not by the file's name, so differently named workers' files are
/// the workers of one step, as --help says.
#[test]
fn npy_files_of_any_name_are_the_workers_of_one_step() {
    let dir = temp_dir("npy-names");
    let (a, b) = (dir.join("worker0.npy"), dir.join("worker1.npy"));
    let g0: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    let g1: Vec<f32> = (0..64)
        .map(|i| (i as f32 * 0.37).sin() + 0.1 * (i as f32).cos())
        .collect();
    write_npy(&a, &[8, 8], &g0);
    write_npy(&b, &[8, 8], &g1);
    let report = analyze(&AnalyzeArgs {
        inputs: vec![a, b],
        ratios: vec![0.25],
        ..AnalyzeArgs::default()
    })
    .unwrap();
    assert_eq!(report.workers, 2);
    assert_eq!(report.n, 64);
    assert_eq!(report.layers.len(), 1);
    assert_eq!(report.layers[0].name, "arr_0");
    assert_eq!(report.layers[0].shape, vec![8, 8]);
    assert!(report.statistics[0].sigma_n2 > 0.0);
    std::fs::remove_dir_all(&dir).ok();
}

/// n = 0: every per-coordinate figure is +0.0 (never -0.0), and the sign-model figures are
/// all 0 together (r_in_sign used to be K/2 log2(1 + pi/(pi-2)) next to r_sum_sign = 0).
#[test]
fn empty_gradients_report_zeros_consistently() {
    let dir = temp_dir("empty");
    let (a, b) = (dir.join("grads_w0_s0.npy"), dir.join("grads_w1_s0.npy"));
    write_npy(&a, &[0], &[]);
    write_npy(&b, &[0], &[]);
    let report = analyze(&AnalyzeArgs {
        inputs: vec![dir.clone()],
        ratios: vec![0.25],
        ..AnalyzeArgs::default()
    })
    .unwrap();
    assert_eq!(report.n, 0);
    let s = &report.statistics[0];
    for (name, v) in [
        ("sigma_x2", s.sigma_x2),
        ("sigma_n2", s.sigma_n2),
        ("d_sign", s.d_sign),
        ("r_sum_sign", s.r_sum_sign),
        ("r_in_sign", s.r_in_sign),
    ] {
        assert_eq!(v.to_bits(), 0, "{name} = {v:?}, expected +0.0");
    }
    assert_eq!(s.layers, vec![(0.0, 0.0)]);
    for m in &report.methods {
        for st in &m.steps {
            for (name, v) in [
                ("sigma_x2", st.sigma_x2),
                ("sigma_n2", st.sigma_n2),
                ("d", st.d),
                ("d_c", st.d_c),
                ("rho", st.rho),
                ("bits_per_element", st.bits_per_element),
                ("r_sum_bits", st.r_sum_bits),
                ("r_in_bits", st.r_in_bits),
                ("r_sum_p1_bits", st.r_sum_p1_bits),
                ("efficiency", st.efficiency),
                ("sent/coord", st.sent_per_coordinate()),
            ] {
                assert_eq!(v.to_bits(), 0, "{}: {name} = {v:?}, expected +0.0", m.name);
            }
        }
    }
    let json = dir.join("report.json");
    write_json(&report, &json).unwrap();
    let text = std::fs::read_to_string(&json).unwrap();
    assert!(!text.contains("-0.0"), "{text}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Every numeric option of analyze has a documented range; outside it, a usage error.
#[test]
fn analyze_options_out_of_range_are_usage_errors() {
    use gradsift_cli::error::CliError;
    let base = args(&["good"]);
    let cases = [
        AnalyzeArgs {
            r_over_k: f64::INFINITY,
            ..base.clone()
        },
        AnalyzeArgs {
            r_over_k: f64::NAN,
            ..base.clone()
        },
        AnalyzeArgs {
            r_over_k: 1e7,
            ..base.clone()
        },
        AnalyzeArgs {
            momentum: 1.0,
            ..base.clone()
        },
        AnalyzeArgs {
            momentum: f32::NAN,
            ..base.clone()
        },
        AnalyzeArgs {
            ratios: vec![0.01; 33],
            ..base.clone()
        },
        AnalyzeArgs {
            ratios: vec![f64::INFINITY],
            ..base.clone()
        },
    ];
    for a in cases {
        match analyze(&a) {
            Err(CliError::Usage(m)) => assert!(m.contains("--"), "{m}"),
            other => panic!("{a:?}: {other:?}"),
        }
    }
}

/// The memory plan: all methods together when they fit, fewer per pass when not, and an
/// up-front usage error when even one method cannot fit.
#[test]
fn memory_plan_groups_methods_and_refuses_what_cannot_fit() {
    use gradsift_cli::analyze::{memory_estimate, memory_plan};
    use gradsift_cli::error::CliError;
    // Small: everything together.
    let p = memory_plan(1000, 3, 10, None, None).unwrap();
    assert_eq!(p.group, 10);
    // 5 workers x 4 M elements under the default 512 MiB: one method at a time.
    let p = memory_plan(4_000_000, 5, 10, None, Some(64 << 30)).unwrap();
    assert_eq!(p.group, 1);
    assert!(p.peak <= 600_000_000, "{p:?}");
    let p = memory_plan(4_000_000, 5, 10, Some(1024), None).unwrap();
    assert!(p.group >= 2 && memory_estimate(4_000_000, 5, p.group) <= 1024 << 20);
    assert!(memory_estimate(4_000_000, 5, p.group + 1) > 1024 << 20);
    for (max, avail) in [(Some(100), None), (None, Some(100 << 20)), (Some(10), None)] {
        match memory_plan(4_000_000, 5, 10, max, avail) {
            Err(CliError::Usage(m)) => assert!(m.contains("MiB"), "{m}"),
            other => panic!("{max:?} {avail:?}: {other:?}"),
        }
    }
    // Through analyze: an explicit limit that one method cannot fit fails before reading.
    let e = analyze(&AnalyzeArgs {
        max_memory: Some(10),
        ..args(&["good"])
    })
    .unwrap_err();
    assert!(matches!(e, CliError::Usage(_)), "{e}");
}

#[test]
fn qsgd_is_analysed_beside_the_sparsifiers_on_every_backend() {
    let mut base = args(&["good"]);
    base.qsgd = vec![1, 7];
    let cpu = analyze(&base).unwrap();
    let names: Vec<&str> = cpu.methods.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names[names.len() - 3..], ["sign", "qsgd s=1", "qsgd s=7"]);
    let q = |r: &gradsift_cli::analyze::Report, s: u8| {
        r.methods
            .iter()
            .find(|m| m.name == format!("qsgd s={s}"))
            .unwrap()
            .clone()
    };
    for s in [1u8, 7] {
        let m = q(&cpu, s);
        assert_eq!((m.config.kind, m.config.levels), ("qsgd", Some(s)));
        for st in &m.steps {
            // Per worker the wire's exact length (3 per-layer scales, one code per element).
            let bytes = gradsift::wire::qsgd_len(cpu.n as u32, 3, s);
            assert_eq!(st.bits, 3 * 8 * bytes as u64, "s={s}");
            assert!(st.efficiency > 0.0 && st.efficiency.is_finite(), "s={s}");
        }
    }
    // More levels: more bits, less distortion.
    let (q1, q7) = (&q(&cpu, 1).steps[0], &q(&cpu, 7).steps[0]);
    assert!(q7.bits > q1.bits && q7.d_c < q1.d_c, "{q1:?} {q7:?}");
    // QSGD's payloads are bit-identical on every backend (SPEC §13), so the bits are too; the
    // distortion is a reduction (§8 tolerance).
    for backend in [Backend::Wgpu, Backend::Cuda] {
        let Some(r) = run_on(backend, &base) else {
            continue;
        };
        for s in [1u8, 7] {
            for (g, c) in q(&r, s).steps.iter().zip(&q(&cpu, s).steps) {
                assert_eq!(g.bits, c.bits, "{backend} s={s}");
                assert!(close(g.d_c, c.d_c, 1e-4), "{backend} s={s}: D_c");
            }
        }
    }
}
