//! The NCCL path (feature `nccl`): a missing libnccl is a typed error, never cudarc's panic;
//! and on a GPU (staged by scripts/gpu-stage.sh), a world-size-1 NCCL all-gather of a
//! compressor's device payload, aggregated on the device, equals the CPU reference bit for
//! bit. Without a GPU or NCCL the device test says SKIPPED, or fails with
//! GRADSIFT_REQUIRE_CUDA=1 (the staged run).

#![cfg(feature = "nccl")]

use gradsift::dist::nccl::{self, Nccl};
use gradsift::{Aggregate, Average, Compress, Config, Error, Layout, Mode, cpu, cuda};

fn required() -> bool {
    std::env::var("GRADSIFT_REQUIRE_CUDA").as_deref() == Ok("1")
}

#[test]
fn a_missing_library_is_a_typed_error() {
    // Whatever this machine has, probing never panics; without NCCL it names what it tried.
    match nccl::probe() {
        Ok(()) => eprintln!("NCCL loads here"),
        Err(Error::BackendUnavailable { backend, reason }) => {
            assert_eq!(backend, "nccl");
            assert!(reason.contains("libnccl.so"), "{reason}");
            assert!(!required(), "GRADSIFT_REQUIRE_CUDA=1 but {reason}");
            // Everything that would load NCCL returns the same error instead of panicking.
            assert!(matches!(
                nccl::unique_id(),
                Err(Error::BackendUnavailable { .. })
            ));
        }
        Err(e) => panic!("unexpected error {e}"),
    }
    assert!(
        nccl::cudarc_names().iter().all(|n| n != "libnccl.so.2"),
        "cudarc now tries libnccl.so.2: the link in gpu-stage.sh can go"
    );
}

#[test]
fn one_gpu_all_gather_and_device_aggregation_match_the_cpu() {
    let cx = match cuda::Context::new(0) {
        Ok(cx) => cx,
        Err(e) if !required() => return eprintln!("SKIPPED: no CUDA device: {e}"),
        Err(e) => panic!("GRADSIFT_REQUIRE_CUDA=1 but {e}"),
    };
    let mut comm = match Nccl::single(&cx) {
        Ok(c) => c,
        Err(e) if !required() => return eprintln!("SKIPPED: {e}"),
        Err(e) => panic!("GRADSIFT_REQUIRE_CUDA=1 but {e}"),
    };
    assert_eq!((comm.rank(), comm.world_size()), (0, 1));
    let layout = Layout::new(&[3000, 17, 5000]).unwrap();
    let mut config = Config::rtopk(0.05, 0.01);
    config.mode = Mode::PerLayer;
    config.momentum = 0.9;
    let mut gpu = cuda::Compressor::new(&cx, &layout, &config).unwrap();
    let mut cpu_plan = cpu::Compressor::new(&layout, &config).unwrap();
    let mut gpu_agg =
        cuda::Aggregator::new(&cx, &layout, config.mode, Average::OverWorkers, 1).unwrap();
    let mut cpu_agg = cpu::Aggregator::new(&layout, config.mode, Average::OverWorkers, 1).unwrap();
    let mut out = cx.stream().alloc_zeros::<f32>(layout.n()).unwrap();
    let mut want = vec![0f32; layout.n()];
    for step in 0..4u64 {
        let grad: Vec<f32> = (0..layout.n())
            .map(|i| (i as f32 * 0.37 + step as f32).sin() * (1.0 + (i % 7) as f32))
            .collect();
        let dev_grad = cx.stream().clone_htod(&grad).unwrap();
        gpu.step_device(&dev_grad, step).unwrap();
        let sent = comm.all_gather_payload(&gpu).unwrap();
        comm.aggregate(&mut gpu_agg, &mut out).unwrap();
        let p = cpu_plan.step(&grad, step).unwrap();
        assert_eq!(
            sent,
            p.as_sparse().unwrap().indices.len(),
            "step {step}: sent"
        );
        cpu_agg
            .aggregate(std::slice::from_ref(p), &mut want)
            .unwrap();
        let got = cx.stream().clone_dtoh(&out).unwrap();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "step {step}: device aggregate differs from the CPU reference"
        );
    }
}
