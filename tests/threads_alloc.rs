//! The threaded CPU backend allocates nothing per step: every per-chunk scratch lives in the
//! plan. A counting global allocator (this file holds one test, so nothing else allocates
//! meanwhile) sees no allocation during steps and aggregations after the first, in pools of
//! 1, 2 and 7 threads.

use gradsift::{Aggregate, Average, Compress, Config, Layout, Mode, Payload, cpu};
use std::alloc::{GlobalAlloc, Layout as Alloc, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Alloc) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Alloc) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Alloc, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Alloc) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn steps_and_aggregation_allocate_nothing_at_1_2_and_7_threads() {
    let layout = Layout::new(&[(1 << 19) + 7, 1000, (1 << 18) + 3]).unwrap();
    let n = layout.n();
    let g: Vec<f32> = (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 8) as f32 - 8e6)
        .collect();
    let mut configs = vec![
        Config::topk(0.01),
        Config::topk(0.3),
        Config::rtopk(0.05, 0.01),
        Config::randomk(0.01),
        Config::sign(),
        Config::qsgd(7),
    ];
    let mut c = Config::rtopk(0.04, 0.01);
    c.momentum = 0.9;
    configs.push(c);
    for threads in [1, 2, 7] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for config in &configs {
            for mode in [Mode::Global, Mode::PerLayer] {
                let mut config = config.clone();
                config.mode = mode;
                let mut plan = cpu::Compressor::new(&layout, &config).unwrap();
                let mut server =
                    cpu::Aggregator::new(&layout, mode, Average::OverSenders, 1).unwrap();
                let mut out = vec![0f32; n];
                let mut payloads = vec![Payload::default()];
                pool.install(|| {
                    payloads[0] = plan.step(&g, 0).unwrap().clone();
                    server.aggregate(&payloads, &mut out).unwrap();
                    let before = ALLOCATIONS.load(Ordering::SeqCst);
                    for t in 1..3 {
                        plan.step(&g, t).unwrap();
                        server.aggregate(&payloads, &mut out).unwrap();
                    }
                    let after = ALLOCATIONS.load(Ordering::SeqCst);
                    assert_eq!(after - before, 0, "{threads} threads, {config:?}");
                });
            }
        }
    }
    // The counter is live: building the plans above allocated.
    assert!(ALLOCATIONS.load(Ordering::SeqCst) > 0);
}
