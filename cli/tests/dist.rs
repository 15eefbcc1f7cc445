//! `gradsift train --dist mpi` under `mpirun`: rank 0 prints what the in-process simulation
//! prints, bit for bit (stdout and the full-precision JSON with the final weights'
//! fingerprint); a set-up mismatch is an error on every rank; a rank that dies stops the
//! others within a bounded time. Needs the `mpi` feature and `mpirun` on PATH (OpenMPI;
//! scripts/test.sh installs it): without `mpirun` each test says SKIPPED, or fails when
//! GRADSIFT_REQUIRE_MPI=1 (CI).

#![cfg(feature = "mpi")]

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_gradsift");
/// The whole job, start-up included; a hang fails the test instead of the suite.
const DEADLINE: Duration = Duration::from_secs(240);

fn mpirun() -> Option<Command> {
    if !common::mpirun_found("the mpirun tests") {
        return None;
    }
    let mut c = Command::new("mpirun");
    // Root in containers and CI; 3 ranks on a 2-core runner.
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .args(["--oversubscribe", "--bind-to", "none"]);
    Some(c)
}

/// Runs `c` to completion or kills it at the deadline (then panics).
fn run(mut c: Command) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if start.elapsed() > DEADLINE {
            child.kill().ok();
            let out = child.wait_with_output().expect("output");
            panic!(
                "still running after {DEADLINE:?} (a hang):\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let elapsed = start.elapsed();
    (child.wait_with_output().expect("output"), elapsed)
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gradsift-dist-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A short run: K = 3, 2 epochs (one of sparsity warm-up), the baseline and rTop-k.
fn train_args(json: &Path) -> Vec<String> {
    [
        "train",
        "--workers",
        "3",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--seed",
        "3",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([json.display().to_string()])
    .collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn three_mpi_ranks_match_the_simulation_bit_for_bit() {
    let Some(mut mpi) = mpirun() else { return };
    let (sim_json, mpi_json) = (tmp("sim.json"), tmp("mpi.json"));
    let mut sim = Command::new(BIN);
    sim.args(train_args(&sim_json));
    let (sim_out, sim_time) = run(sim);
    assert!(
        sim_out.status.success(),
        "simulation failed: {}",
        text(&sim_out.stderr)
    );

    mpi.args(["-n", "3", BIN])
        .args(train_args(&mpi_json))
        .args(["--dist", "mpi"]);
    let (mpi_out, mpi_time) = run(mpi);
    assert!(
        mpi_out.status.success(),
        "mpirun failed ({}):\nstdout:\n{}\nstderr:\n{}",
        mpi_out.status,
        text(&mpi_out.stdout),
        text(&mpi_out.stderr)
    );
    eprintln!("simulation {sim_time:?}, mpirun -n 3 {mpi_time:?}");
    eprintln!("{}", text(&mpi_out.stdout));

    // The printed tables: identical, and printed once (rank 0 only).
    assert_eq!(text(&sim_out.stdout), text(&mpi_out.stdout));
    assert_eq!(text(&mpi_out.stdout).matches("== rtopk").count(), 1);
    // Every figure at full precision and the final weights' fingerprint of both runs.
    let (a, b) = (
        std::fs::read_to_string(&sim_json).unwrap(),
        std::fs::read_to_string(&mpi_json).unwrap(),
    );
    assert!(a.contains("weights_fnv") && a.contains("\"method\": \"rtopk\""));
    assert_eq!(a, b, "JSON reports differ");
}

#[test]
fn a_setup_mismatch_is_an_error_on_every_rank() {
    let Some(mut mpi) = mpirun() else { return };
    // Rank 0 with seed 0, ranks 1 and 2 with seed 1 (MPMD syntax).
    mpi.args(["-n", "1", BIN, "train", "--dist", "mpi", "--workers", "3"])
        .args(["--epochs", "1", "--warmup-epochs", "0", "--seed", "0", ":"])
        .args(["-n", "2", BIN, "train", "--dist", "mpi", "--workers", "3"])
        .args(["--epochs", "1", "--warmup-epochs", "0", "--seed", "1"]);
    let (out, elapsed) = run(mpi);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a mismatch must fail: {err}");
    assert_eq!(
        err.matches("set-up mismatch: rank(s) [1, 2] of 3").count(),
        3,
        "every rank reports the mismatch:\n{err}"
    );
    assert!(
        !text(&out.stdout).contains("epoch"),
        "no training step may run"
    );
    eprintln!("mismatch detected in {elapsed:?}");

    // A world size that disagrees with --workers: the same error on every rank.
    let Some(mut mpi) = mpirun() else { return };
    mpi.args(["-n", "2", BIN, "train", "--dist", "mpi", "--workers", "3"]);
    let (out, _) = run(mpi);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(
        err.matches("--workers 3 but the mpi transport connects 2 workers")
            .count(),
        2,
        "{err}"
    );
}

#[test]
fn a_rank_that_dies_stops_the_others() {
    let Some(mut mpi) = mpirun() else { return };
    // Rank 1 exits abruptly (no MPI_Finalize) at step 5; ranks 0 and 2 then wait in the
    // next all-gather until mpirun notices and kills them.
    mpi.args([
        "-x",
        "GRADSIFT_FAULT=1:5",
        "-n",
        "3",
        BIN,
        "train",
        "--dist",
        "mpi",
    ])
    .args(["--workers", "3", "--epochs", "1", "--warmup-epochs", "0"]);
    let (out, elapsed) = run(mpi);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the job must fail:\n{err}");
    assert!(
        err.contains("rank 1 exits abruptly at step 5"),
        "the fault fired:\n{err}"
    );
    // OpenMPI's report names the process that died: [[job,1],1] is rank 1.
    assert!(
        err.contains("exited with non-zero status") && err.contains(",1],1]"),
        "mpirun says which rank died:\n{err}"
    );
    assert!(
        elapsed < Duration::from_secs(60),
        "the others stopped after {elapsed:?}"
    );
    eprintln!("job stopped {elapsed:?} after start; mpirun said:\n{err}");
}

/// The reductions of docs/SPEC.md §12 under `mpirun -n 3`: rank 0 prints what the
/// simulation prints and both write the same JSON (every figure, the weights' fingerprint
/// and the bytes received per worker), for the sparse all-reduce (exact and reused
/// thresholds, global and per layer) and shared-key random-k.
#[test]
fn three_mpi_ranks_match_the_simulation_for_every_reduction() {
    let cases: [&[&str]; 3] = [
        &[
            "--method",
            "topk",
            "--reduce",
            "sparse",
            "--epochs",
            "2",
            "--warmup-epochs",
            "1",
        ],
        &[
            "--method",
            "rtopk",
            "--per-layer",
            "--average",
            "over-senders",
            "--reduce",
            "sparse",
            "--threshold-every",
            "4",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
        ],
        &[
            "--method",
            "randomk",
            "--ratio",
            "0.5",
            "--momentum",
            "0",
            "--lr",
            "0.01",
            "--reduce",
            "shared-randomk",
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
        ],
    ];
    for (i, case) in cases.iter().enumerate() {
        let Some(mut mpi) = mpirun() else { return };
        let (sim_json, mpi_json) = (
            tmp(&format!("sim-r{i}.json")),
            tmp(&format!("mpi-r{i}.json")),
        );
        let common = |c: &mut Command, json: &Path| {
            c.args(["train", "--workers", "3", "--seed", "5", "--json"])
                .arg(json)
                .args(*case);
        };
        let mut sim = Command::new(BIN);
        common(&mut sim, &sim_json);
        let (sim_out, _) = run(sim);
        assert!(
            sim_out.status.success(),
            "{case:?}: {}",
            text(&sim_out.stderr)
        );
        mpi.args(["-n", "3", BIN]);
        common(&mut mpi, &mpi_json);
        mpi.args(["--dist", "mpi"]);
        let (mpi_out, elapsed) = run(mpi);
        assert!(
            mpi_out.status.success(),
            "{case:?}: mpirun failed:\n{}\n{}",
            text(&mpi_out.stdout),
            text(&mpi_out.stderr)
        );
        eprintln!(
            "{case:?}: mpirun -n 3 in {elapsed:?}\n{}",
            text(&mpi_out.stdout)
        );
        assert_eq!(text(&sim_out.stdout), text(&mpi_out.stdout), "{case:?}");
        let (a, b) = (
            std::fs::read_to_string(&sim_json).unwrap(),
            std::fs::read_to_string(&mpi_json).unwrap(),
        );
        assert!(a.contains("received_per_worker_step") && a.contains("weights_fnv"));
        assert_eq!(a, b, "{case:?}: JSON reports differ");
    }
}

/// A rank that stops without dying (`GRADSIFT_HANG=1:5`, a test hook): the others' next
/// collective times out (`--collective-timeout 3`), rank 0 names rank 1 as the one that did
/// not arrive, and every rank exits non-zero instead of waiting for ever.
#[test]
fn a_rank_that_hangs_is_named_and_the_job_stops() {
    let Some(mut mpi) = mpirun() else { return };
    mpi.args([
        "-x",
        "GRADSIFT_HANG=1:5",
        "-n",
        "3",
        BIN,
        "train",
        "--dist",
        "mpi",
    ])
    .args(["--workers", "3", "--epochs", "1", "--warmup-epochs", "0"])
    .args(["--collective-timeout", "3"]);
    let (out, elapsed) = run(mpi);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the job must fail:\n{err}");
    assert!(
        err.contains("rank 1 stops at step 5"),
        "the hang fired:\n{err}"
    );
    assert!(
        err.contains("rank(s) [1] of 3 did not arrive"),
        "rank 0 names the rank that hangs:\n{err}"
    );
    assert!(
        elapsed < Duration::from_secs(90),
        "the job stopped after {elapsed:?}"
    );
    eprintln!("job stopped {elapsed:?} after start; stderr:\n{err}");
}
