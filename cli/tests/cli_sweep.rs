//! `gradsift` as a user runs it (issue 26): every subcommand at its smallest legal values
//! (`--epochs 1`, `--workers 2`, the extreme ratios, `--local-steps 1`, one step of `analyze`,
//! `reproduce --quick --epochs 1 --seeds 1`) and every command line the README shows, each
//! through the binary. A case either exits 0, or (the cases listed as usage errors) fails
//! with a message naming the option at fault; a panic (exit code 101 or "panicked" on stderr)
//! fails every case, and no case that the user's options allow may be refused because of a
//! default. The README's long runs (the default 10-epoch `train`, the 14-minute `reproduce`)
//! run until they have printed their first result, which is past every check of their
//! options, and are then stopped.
//!
//! The wgpu cases need a Vulkan adapter (lavapipe: scripts/test.sh installs
//! mesa-vulkan-drivers) and say SKIPPED without one, unless GRADSIFT_REQUIRE_WGPU=1 (CI); the
//! `mpirun` cases need the `mpi` feature and `mpirun` on PATH and say SKIPPED otherwise,
//! unless GRADSIFT_REQUIRE_MPI=1 (CI).

use std::io::Read;
#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_gradsift");
/// Any one case, start-up included; a hang fails the case instead of the suite.
const DEADLINE: Duration = Duration::from_secs(300);

/// What a case must do.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Exit 0.
    Ok,
    /// Exit non-zero with a message that names this option.
    Usage(&'static str),
    /// Print a line of stdout containing this (its first result), then it is stopped.
    Starts(&'static str),
}

/// The first row of an epoch table: every option is checked and the training runs.
const FIRST_EPOCH: &str = "\n    1 ";

/// A scratch folder of its own per test, holding the `grads/` folder of the README's
/// `analyze` line (the fixture of tests/data/good).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gradsift-sweep-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let grads = dir.join("grads");
    std::fs::create_dir_all(&grads).unwrap();
    for e in std::fs::read_dir(fixture()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "npz") {
            std::fs::copy(&p, grads.join(p.file_name().unwrap())).unwrap();
        }
    }
    dir
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/good")
}

/// The K = 3 files of step 0 of the fixture: one step of `analyze`.
fn one_step() -> Vec<String> {
    (0..3)
        .map(|w| {
            fixture()
                .join(format!("grads_w{w}_s0.npz"))
                .display()
                .to_string()
        })
        .collect()
}

/// What a finished (or stopped) case left.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    stopped: bool,
    seconds: f64,
}

/// Reads a pipe to the end on a thread of its own, into a buffer the caller can watch.
fn drain(mut r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

/// Runs `cmd` in `dir`. With `until`, stops it (SIGTERM, which `mpirun` forwards to its
/// ranks, then SIGKILL) as soon as stdout contains that text.
fn run(mut cmd: Command, dir: &Path, until: Option<&str>) -> Outcome {
    let start = Instant::now();
    let mut child = cmd
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let text = |b: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&b.lock().unwrap()).into_owned();
    let mut stopped = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        let seen = until.is_some_and(|u| text(&out).contains(u));
        if seen || start.elapsed() > DEADLINE {
            stopped = seen;
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let t = Instant::now();
            while child.try_wait().expect("wait").is_none() && t.elapsed() < Duration::from_secs(20)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let s = child.wait().expect("wait");
            assert!(
                seen,
                "still running after {DEADLINE:?}:\nstdout:\n{}\nstderr:\n{}",
                text(&out),
                text(&err)
            );
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The pipes close with the process (and its ranks); give the readers a moment.
    let t = Instant::now();
    while Arc::strong_count(&out) + Arc::strong_count(&err) > 2 && t.elapsed().as_secs() < 10 {
        std::thread::sleep(Duration::from_millis(10));
    }
    Outcome {
        code: status.code(),
        stdout: text(&out),
        stderr: text(&err),
        stopped,
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// Checks one outcome against what its case expects; returns the failure, if any.
fn check(what: &str, expect: Expect, o: &Outcome) -> Result<(), String> {
    let show = || format!("`{what}`:\nstdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    if o.code == Some(101) || o.stderr.contains("panicked") {
        return Err(format!("panicked: {}", show()));
    }
    match expect {
        Expect::Ok if o.code != Some(0) => Err(format!("exit {:?}: {}", o.code, show())),
        Expect::Starts(_) if !o.stopped && o.code != Some(0) => Err(format!(
            "exit {:?} before its first result: {}",
            o.code,
            show()
        )),
        Expect::Usage(opt) if o.code == Some(0) => {
            Err(format!("accepted (want an error naming {opt}): {}", show()))
        }
        Expect::Usage(opt) if !o.stderr.contains(opt) => {
            Err(format!("the error does not name {opt}: {}", show()))
        }
        _ => Ok(()),
    }
}

/// Runs every case (`gradsift ARGS` in `dir`) and fails with all the failures together.
fn sweep(dir: &Path, cases: &[(Vec<String>, Expect)]) {
    let start = Instant::now();
    let mut failures = Vec::new();
    for (args, expect) in cases {
        let what = format!("gradsift {}", args.join(" "));
        let mut cmd = Command::new(BIN);
        cmd.args(args);
        let until = match expect {
            Expect::Starts(u) => Some(*u),
            _ => None,
        };
        let o = run(cmd, dir, until);
        println!("{:>6.1} s  {expect:?}  {what}", o.seconds);
        if let Err(e) = check(&what, *expect, &o) {
            failures.push(e);
        }
    }
    println!(
        "{} cases in {:.1} s",
        cases.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn argv(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

/// The smallest legal values of every subcommand, the extremes of each range, and the values
/// that cannot hold, on the CPU.
#[test]
fn every_subcommand_at_its_smallest_legal_values() {
    use Expect::{Ok, Usage};
    let dir = scratch("smallest");
    let json = dir.join("run.json").display().to_string();
    let step0 = one_step().join(" ");
    let out = dir.join("reproduce").display().to_string();
    let mut cases: Vec<(Vec<String>, Expect)> = [
        // The issue: the 2-epoch default warm-up shrinks to the 1 epoch asked for.
        ("train --epochs 1", Ok),
        ("train --epochs 1 --workers 2 --method rtopk", Ok),
        ("train --epochs 1 --local-steps 1 --method topk --warmup-epochs 0 --batch 400", Ok),
        ("train --epochs 1 --method rtopk --ratio 1 --r-over-k 1 --warmup-epochs 1 --batch 400", Ok),
        ("train --epochs 1 --method rtopk --ratio 1e-300 --r-over-k 1e6 --batch 400", Ok),
        ("train --epochs 1 --method topk --ratio 1e-300 --per-layer --batch 400", Ok),
        ("train --epochs 1 --method randomk --ratio 1 --batch 400", Ok),
        ("train --epochs 1 --method sign --momentum 0 --batch 400", Ok),
        ("train --epochs 1 --method adaptive --adapt-every 1 --batch 400", Ok),
        ("train --epochs 1 --method none --lr 1e-30 --seed 18446744073709551615 --batch 400", Ok),
        ("train --epochs 1 --method rtopk --average over-senders --unbiased --local-steps 2 --batch 100", Ok),
        // 8000 images over 300 workers: the default batch 32 shrinks to 26.
        ("train --epochs 1 --workers 300 --method topk --model cnn", Ok),
        ("train --epochs 1 --backend auto --method topk --batch 400", Ok),
        // Explicit values that cannot hold.
        ("train --epochs 1 --method topk --reduce sparse --threshold-every 100000 --per-layer --batch 400", Ok),
        ("train --epochs 1 --method randomk --reduce shared-randomk --ratio 1 --batch 400", Ok),
        ("train --epochs 1 --warmup-epochs 2", Usage("--warmup-epochs")),
        ("train --threshold-every 0", Usage("--threshold-every")),
        ("train --threshold-every 100001", Usage("--threshold-every")),
        ("train --method randomk --reduce sparse", Usage("--reduce")),
        ("train --method topk --reduce shared-randomk", Usage("--reduce")),
        ("train --reduce ring", Usage("--reduce")),
        ("train --epochs 0", Usage("--epochs")),
        ("train --epochs 1001", Usage("--epochs")),
        ("train --workers 1", Usage("--workers")),
        ("train --workers 1001", Usage("--workers")),
        ("train --workers 1000 --batch 9", Usage("--batch")),
        ("train --batch 0", Usage("--batch")),
        ("train --ratio 0", Usage("--ratio")),
        ("train --ratio 1.5", Usage("--ratio")),
        ("train --r-over-k 0.9", Usage("--r-over-k")),
        ("train --local-steps 0", Usage("--local-steps")),
        ("train --local-steps 1001", Usage("--local-steps")),
        ("train --adapt-every 0 --method adaptive", Usage("--adapt-every")),
        ("train --momentum 1", Usage("--momentum")),
        ("train --lr 0", Usage("--lr")),
        ("train --method bogus", Usage("--method")),
        ("train --epochs x", Usage("--epochs")),
        ("train --help", Ok),
        ("--version", Ok),
        // One step of analyze, K = 3, every option at an extreme.
        (&format!("analyze {step0}"), Ok),
        (
            &format!("analyze {step0} --ratios 1 --r-over-k 1 --mode global --unbiased --average over-senders --per-step --json -"),
            Ok,
        ),
        (&format!("analyze {step0} --ratios 1e-300 --r-over-k 1e6 --momentum 0.999 --max-memory 65"), Ok),
        // The least --max-memory allowed; the estimate starts at 64 MiB, so nothing fits it.
        (&format!("analyze {step0} --max-memory 64"), Usage("--max-memory")),
        (&format!("analyze {step0} --ratios 0"), Usage("--ratios")),
        (&format!("analyze {step0} --r-over-k 0.5"), Usage("--r-over-k")),
        (&format!("analyze {step0} --momentum 1"), Usage("--momentum")),
        (&format!("analyze {step0} --max-memory 63"), Usage("--max-memory")),
        ("analyze --help", Ok),
        // reproduce with one epoch of everything (its warm-up shrinks to it), one seed.
        (&format!("reproduce --quick --epochs 1 --seeds 1 --out {out}"), Ok),
        (&format!("reproduce --seeds 0 --out {out}"), Usage("--seeds")),
        (&format!("reproduce --epochs 0 --out {out}"), Usage("--epochs")),
        ("reproduce --help", Ok),
        ("demo --backend bogus", Usage("--backend")),
        ("demo --help", Ok),
    ]
    .into_iter()
    .map(|(a, e)| (argv(a), e))
    .collect();
    cases.push((
        argv(&format!(
            "train --epochs 1 --method rtopk --batch 400 --json {json}"
        )),
        Ok,
    ));
    // Without the `mpi` feature --dist mpi is an error naming it.
    if !cfg!(feature = "mpi") {
        cases.push((argv("train --dist mpi --epochs 1"), Usage("--dist mpi")));
    }
    sweep(&dir, &cases);
    let doc = std::fs::read_to_string(&json).unwrap();
    assert!(doc.contains("\"runs\""), "{doc}");
    assert!(Path::new(&out).join("report.md").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `gradsift` command lines of the README: inline code spans and `sh` blocks that run the
/// binary (`gradsift ...`, `cargo run --release [-- ...]`, `mpirun ... gradsift ...`), as
/// argument lists (`mpirun` lines prefixed with "mpirun -n N").
fn readme_command_lines() -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let mut lines = Vec::new();
    let mut prose = String::new();
    let mut fence: Option<String> = None;
    for line in readme.lines() {
        if let Some(lang) = line.trim_start().strip_prefix("```") {
            fence = match fence {
                Some(_) => None,
                None => Some(lang.trim().to_string()),
            };
            continue;
        }
        match fence.as_deref() {
            Some("sh") => lines.push(line.split('#').next().unwrap().trim().to_string()),
            Some(_) => {}
            None => {
                prose.push_str(line);
                prose.push('\n');
            }
        }
    }
    // Inline spans may wrap across lines.
    lines.extend(
        prose
            .split('`')
            .skip(1)
            .step_by(2)
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" ")),
    );
    let mut out = Vec::new();
    for l in lines {
        let words: Vec<&str> = l.split_whitespace().collect();
        let cmd = if let Some(rest) = l.strip_prefix("cargo run --release") {
            Some(rest.trim().trim_start_matches("--").trim().to_string())
        } else if let Some(i) = words
            .iter()
            .position(|w| *w == "gradsift" || w.ends_with("/gradsift"))
        {
            let args = words[i + 1..].join(" ");
            if words[0] == "mpirun" {
                let n = words
                    .iter()
                    .position(|w| *w == "-n")
                    .map(|j| words[j + 1])
                    .unwrap();
                Some(format!("mpirun -n {n} {args}"))
            } else if i == 0 {
                Some(args)
            } else {
                None
            }
        } else {
            None
        };
        if let Some(c) = cmd.filter(|c| !out.contains(c)) {
            out.push(c);
        }
    }
    out
}

/// What each README command line must do here: the CPU and `analyze`'s `grads/` in the
/// scratch folder; the wgpu and mpirun lines run in their own tests.
fn readme_expectations() -> Vec<(&'static str, Expect)> {
    use Expect::{Ok, Starts};
    vec![
        // `cargo run --release`: a bare `gradsift`, the default 10-epoch `train`.
        ("", Starts(FIRST_EPOCH)),
        ("train", Starts(FIRST_EPOCH)),
        ("train --help", Ok),
        ("analyze", Ok),
        ("analyze grads/ --plot fig7.png --json report.json", Ok),
        // 25 s in full: its first line is the first method's.
        ("demo", Starts("\nrtopk r=0.5% k=0.1% ")),
        // 14 minutes in full: its first line is section 1's first run.
        (
            "reproduce --out docs/reproduce",
            Starts("Baseline, seed 0:"),
        ),
        ("train --backend wgpu", Starts(FIRST_EPOCH)),
        ("mpirun -n 5 train --dist mpi", Starts(FIRST_EPOCH)),
        (
            "mpirun -n 3 train --dist mpi --method topk --reduce sparse",
            Starts(FIRST_EPOCH),
        ),
    ]
}

/// Every command line of the README is in the sweep (a new one must be added there), and
/// the CPU ones do what the README says.
#[test]
fn every_readme_command_line() {
    let known = readme_expectations();
    let found = readme_command_lines();
    for c in &found {
        assert!(
            known.iter().any(|(k, _)| k == c),
            "the README shows `gradsift {c}`: add it to readme_expectations"
        );
    }
    for (k, _) in &known {
        assert!(
            found.iter().any(|c| c == k),
            "`{k}` is no longer in the README: remove it"
        );
    }
    let dir = scratch("readme");
    let cases: Vec<(Vec<String>, Expect)> = known
        .into_iter()
        .filter(|(c, _)| !c.contains("wgpu") && !c.starts_with("mpirun"))
        .map(|(c, e)| (argv(c), e))
        .collect();
    sweep(&dir, &cases);
    for f in ["fig7.png", "report.json", "gradsift-analyze.png"] {
        assert!(dir.join(f).exists(), "{f} not written");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `train --epochs 1` and the README's wgpu line on the wgpu backend (lavapipe in CI).
#[test]
fn wgpu_backend() {
    let dir = scratch("wgpu");
    // One step of analyze opens the backend first and is over in a moment: the probe.
    let mut probe = Command::new(BIN);
    probe
        .arg("analyze")
        .args(one_step())
        .args(["--backend", "wgpu"]);
    let o = run(probe, &dir, None);
    if o.code != Some(0) && o.stderr.contains("wgpu backend unavailable") {
        assert!(
            std::env::var("GRADSIFT_REQUIRE_WGPU").as_deref() != Ok("1"),
            "GRADSIFT_REQUIRE_WGPU=1 but {}",
            o.stderr
        );
        println!("SKIPPED: gradsift --backend wgpu: {}", o.stderr.trim());
        return;
    }
    println!(
        "{:>6.1} s  Ok  gradsift analyze (one step) --backend wgpu",
        o.seconds
    );
    check("gradsift analyze (one step) --backend wgpu", Expect::Ok, &o).unwrap();
    let cases: Vec<(Vec<String>, Expect)> = vec![
        (argv("train --epochs 1 --backend wgpu"), Expect::Ok),
        (argv("train --backend wgpu"), Expect::Starts(FIRST_EPOCH)),
    ];
    sweep(&dir, &cases);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `train --dist mpi --epochs 1` under `mpirun` (no --workers: the ranks are the workers),
/// the README's mpirun line, and a --workers that the ranks contradict.
#[test]
fn mpirun_lines() {
    if !cfg!(feature = "mpi") {
        assert!(
            std::env::var("GRADSIFT_REQUIRE_MPI").as_deref() != Ok("1"),
            "GRADSIFT_REQUIRE_MPI=1 but this build has no `mpi` feature"
        );
        println!("SKIPPED: mpirun cases (build with --features mpi, as scripts/test.sh does)");
        return;
    }
    if !common::mpirun_found("mpirun cases") {
        return;
    }
    let dir = scratch("mpi");
    let mut failures = Vec::new();
    for (n, args, expect) in [
        ("2", "train --dist mpi --epochs 1", Expect::Ok),
        (
            "2",
            "train --dist mpi --epochs 1 --workers 3",
            Expect::Usage("--workers"),
        ),
        ("5", "train --dist mpi", Expect::Starts(FIRST_EPOCH)),
        (
            "3",
            "train --dist mpi --method topk --reduce sparse",
            Expect::Starts(FIRST_EPOCH),
        ),
    ] {
        let mut c = Command::new("mpirun");
        // Root in containers and CI; more ranks than cores on a 2-core runner.
        c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
            .args(["--oversubscribe", "--bind-to", "none", "-n", n, BIN])
            .args(argv(args));
        let until = match expect {
            Expect::Starts(u) => Some(u),
            _ => None,
        };
        let what = format!("mpirun -n {n} gradsift {args}");
        let o = run(c, &dir, until);
        println!("{:>6.1} s  {expect:?}  {what}", o.seconds);
        if let Err(e) = check(&what, expect, &o) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let _ = std::fs::remove_dir_all(&dir);
}
