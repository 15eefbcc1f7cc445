//! Per-layer statistics and the variance estimator (SPEC §8) within their tolerances.

use super::*;

pub(crate) fn layer_statistics_within_spec_tolerance<H: Harness>(h: &H) {
    let layout = mixed_layout(1000, 5);
    let n = layout.n();
    let mut x: Vec<f32> = data(n, 3)
        .iter()
        .enumerate()
        .map(|(i, v)| v * 3.0 + (i % 17) as f32)
        .collect();
    x[5] = f32::NAN;
    x[n / 2] = f32::INFINITY;
    // A layer with nothing finite: NaN moments (SPEC §8); layers l % 10 == 0 are empty.
    for (j, i) in layout.layer(2).enumerate() {
        x[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][j % 3];
    }
    stats_case(h, &layout, &x, "mixed f32");
    stats_case::<H, f16>(h, &layout, &to(&x), "mixed f16");
    stats_case::<H, bf16>(h, &layout, &to(&x), "mixed bf16");
    let big = Layout::new(&[BIG, 0, 1]).unwrap();
    stats_case(
        h,
        &big,
        &data(big.n(), 8)
            .iter()
            .map(|v| v + 100.0)
            .collect::<Vec<_>>(),
        "2^20+3 offset",
    );
}
/// `k` workers' gradients `signal + amp * noise_w`, worker `w`'s noise from seed `seed + w`
/// (SPEC §8's model `Y_k = X + N_k`).
fn noisy_workers(signal: &[f32], k: usize, seed: u64, amp: f32) -> Vec<Vec<f32>> {
    (0..k)
        .map(|w| {
            let noise = data(signal.len(), seed + w as u64);
            signal.iter().zip(noise).map(|(s, e)| s + amp * e).collect()
        })
        .collect()
}

pub(crate) fn variance_estimator_within_spec_tolerance<H: Harness>(h: &H) {
    let layout = mixed_layout(200, 9);
    let n = layout.n();
    let signal = data(n, 1);
    for k in [2usize, 3, 8] {
        let workers = noisy_workers(&signal, k, 10, 0.3);
        let refs: Vec<&[f32]> = workers.iter().map(|w| w.as_slice()).collect();
        let mut a = Vec::new();
        gradsift::cpu::estimate_variance(&refs, &layout, &mut a).unwrap();
        let mut stats = h.device().stats(&layout, k).unwrap();
        let mut b = Vec::new();
        stats.estimate_variance(&refs, &mut b).unwrap();
        let mut own = h.stats(&layout, k).unwrap();
        let mut d = Vec::new();
        h.estimate_variance_device(&mut own, &refs, &mut d).unwrap();
        assert_eq!((a.len(), a.len()), (b.len(), d.len()));
        for (l, ((a, b), d)) in a.iter().zip(&b).zip(&d).enumerate() {
            close_var(a, b, &format!("K={k} layer {l}"));
            close_var(a, d, &format!("K={k} layer {l} (device)"));
        }
        let mut bad = workers.clone();
        bad[1][7] = f32::NAN;
        bad[1][3] = f32::INFINITY;
        let refs: Vec<&[f32]> = bad.iter().map(|w| w.as_slice()).collect();
        let e1 = gradsift::cpu::estimate_variance(&refs, &layout, &mut a).unwrap_err();
        let e2 = stats.estimate_variance(&refs, &mut b).unwrap_err();
        assert_eq!(e1, e2);
        let e3 = h
            .estimate_variance_device(&mut own, &refs, &mut d)
            .unwrap_err();
        assert_eq!(e1, e3, "device");
    }
    let one = [signal.as_slice()];
    let mut stats = h.device().stats(&layout, 2).unwrap();
    assert!(stats.estimate_variance(&one, &mut Vec::new()).is_err());
}
/// Statistics of `x` on the CPU, and on the backend through the host entry point and the
/// device one, within SPEC §8's tolerance; a second call on the same plan gives the same
/// result.
pub(crate) fn stats_case<H: Harness, T: Element>(h: &H, layout: &Layout, x: &[T], what: &str) {
    let mut want = Vec::new();
    gradsift::cpu::layer_stats(x, layout, &mut want).unwrap();
    let mut host = h.device().stats(layout, 4).unwrap();
    let mut got = Vec::new();
    host.layer_stats(x, &mut got)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut plan = h.stats(layout, 4).unwrap();
    let mut dev = Vec::new();
    h.layer_stats_device(&mut plan, x, &mut dev)
        .unwrap_or_else(|e| panic!("{what} (device): {e}"));
    assert_eq!(want.len(), got.len(), "{what}: layers");
    assert_eq!(want.len(), dev.len(), "{what}: layers (device)");
    for (l, ((w, g), d)) in want.iter().zip(&got).zip(&dev).enumerate() {
        common::assert_stats_close(w, g, &format!("{what}: layer {l}"));
        common::assert_stats_close(w, d, &format!("{what}: layer {l} (device)"));
    }
    // Reuse: a second call on the same plan gives the same result.
    let mut again = Vec::new();
    h.layer_stats_device(&mut plan, x, &mut again).unwrap();
    // Debug strings: layers without a finite element have NaN moments (SPEC §8), NaN != NaN.
    assert_eq!(
        format!("{dev:?}"),
        format!("{again:?}"),
        "{what}: deterministic"
    );
}
pub(crate) fn layer_stats_match_cpu<H: Harness>(h: &H) {
    for n in [0usize, 1, 255, 4095, 4096, 4097, BIG] {
        for layout in sizes_layouts(n) {
            let mut x = gaussian::<f32>(n, 8, 3.0);
            stats_case(h, &layout, &x, &format!("f32 n={n}"));
            // An offset mean: the centred second pass must keep the variance.
            let off: Vec<f32> = x.iter().map(|v| v + 1000.0).collect();
            stats_case(h, &layout, &off, &format!("f32+1000 n={n}"));
            if n > 10 {
                x[3] = f32::NAN;
                x[n - 1] = f32::NEG_INFINITY;
                stats_case(h, &layout, &x, &format!("f32 nan n={n}"));
                // A layer with nothing finite: NaN moments (SPEC §8).
                let mut y = x.clone();
                for (j, i) in layout.layer(0).enumerate() {
                    y[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][j % 3];
                }
                stats_case(h, &layout, &y, &format!("f32 all-bad layer 0 n={n}"));
            }
            stats_case(
                h,
                &layout,
                &gaussian::<f16>(n, 9, 2.0),
                &format!("f16 n={n}"),
            );
            stats_case(
                h,
                &layout,
                &gaussian::<bf16>(n, 10, 2.0),
                &format!("bf16 n={n}"),
            );
        }
    }
    let mut r = Lcg(5);
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
        h,
        &layout,
        &gaussian::<f32>(layout.n(), 11, 1.0),
        "1000 layers",
    );
    let n = 1usize << 26;
    let big = Layout::single(n).unwrap();
    if let Some(max) = h.max_binding_bytes() {
        if (n as u64) * 4 > max {
            // Above the binding limit: the typed error that names it (zeroed pages, cheap).
            let x = vec![0f32; n];
            let e = h
                .device()
                .stats(&big, 1)
                .and_then(|mut s| s.layer_stats(&x, &mut Vec::new()))
                .unwrap_err();
            assert!(
                matches!(&e, Error::Device { .. }) && e.to_string().contains(&max.to_string()),
                "{e:?}"
            );
            println!(
                "NOTE: {}: 2^26 statistics are above the {max}-byte binding limit: checked the error",
                h.backend()
            );
            return;
        }
    }
    if h.full() {
        stats_case(h, &big, &gaussian::<f32>(n, 12, 1.0), "2^26");
    } else {
        println!(
            "NOTE: {}: 2^26 statistics run on CUDA only (too slow here)",
            h.backend()
        );
    }
}
pub(crate) fn var_case<H: Harness, T: Element>(h: &H, layout: &Layout, k: usize, what: &str) {
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
    gradsift::cpu::estimate_variance(&refs, layout, &mut want).unwrap();
    let mut got = Vec::new();
    let mut plan = h.stats(layout, k).unwrap();
    let r = h.estimate_variance_device(&mut plan, &refs, &mut got);
    if odd_16bit_on_wgpu::<H, T>(h, n) {
        assert!(matches!(r, Err(Error::InvalidConfig(_))), "{what}: {r:?}");
        // The host entry point stacks them itself.
        Statistics::estimate_variance(&mut plan, &refs, &mut got).unwrap();
    } else {
        r.unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    assert_eq!(want.len(), got.len());
    for (l, (w, g)) in want.iter().zip(&got).enumerate() {
        close_var(w, g, &format!("{what}: layer {l}"));
    }
}
pub(crate) fn variance_matches_cpu<H: Harness>(h: &H) {
    for n in [1usize, 4097, BIG] {
        for layout in if n == BIG {
            layouts_for(h, n)
        } else {
            sizes_layouts(n)
        } {
            let ks: &[usize] = if n == BIG && !h.full() {
                &[3]
            } else {
                &[2, 3, 8]
            };
            for &k in ks {
                var_case::<H, f32>(h, &layout, k, &format!("f32 n={n} K={k}"));
                var_case::<H, f16>(h, &layout, k, &format!("f16 n={n} K={k}"));
                var_case::<H, bf16>(h, &layout, k, &format!("bf16 n={n} K={k}"));
            }
        }
    }
    // Even n: the wgpu device path stacks 16-bit buffers too.
    let layout = Layout::new(&[1000, 3000]).unwrap();
    var_case::<H, f16>(h, &layout, 3, "f16 n=4000 K=3");
    var_case::<H, bf16>(h, &layout, 2, "bf16 n=4000 K=2");
    // Non-finite input: the same error as the CPU.
    let layout = Layout::single(1000).unwrap();
    let a = gaussian::<f32>(1000, 1, 1.0);
    let mut b = gaussian::<f32>(1000, 2, 1.0);
    b[10] = f32::NAN;
    b[500] = f32::INFINITY;
    let want = gradsift::cpu::estimate_variance(&[&a[..], &b[..]], &layout, &mut Vec::new());
    let mut plan = h.stats(&layout, 2).unwrap();
    let got = h.estimate_variance_device(&mut plan, &[&a[..], &b[..]], &mut Vec::new());
    assert_eq!(want, got);
    assert!(matches!(
        h.estimate_variance_device(&mut plan, &[&a[..]], &mut Vec::new()),
        Err(Error::InvalidConfig(_))
    ));
}

/// Workers whose stacked gradients exceed one wgpu storage binding of lavapipe (128 MiB: 3 x
/// 12 M f32): the host entry point estimates per run of layers, within SPEC §8's tolerances of
/// the CPU, and a non-finite value in two runs is one error with the whole worker's count and
/// first index, as the CPU gives it.
pub(crate) fn variance_beyond_one_binding<H: Harness>(h: &H) {
    let sizes = [1_500_000usize; 8];
    let layout = Layout::new(&sizes).unwrap();
    let (n, k) = (layout.n(), 3);
    let signal = data(n, 4);
    let mut workers = noisy_workers(&signal, k, 20, 0.5);
    let mut want = Vec::new();
    let refs: Vec<&[f32]> = workers.iter().map(|w| w.as_slice()).collect();
    gradsift::cpu::estimate_variance(&refs, &layout, &mut want).unwrap();
    let mut stats = h.device().stats(&layout, k).unwrap();
    let mut got = Vec::new();
    stats.estimate_variance(&refs, &mut got).unwrap();
    assert_eq!(got.len(), want.len());
    for (l, (a, b)) in want.iter().zip(&got).enumerate() {
        close_var(a, b, &format!("layer {l} of 12 M x 3"));
    }
    // worker 1: non-finite values in the last layer and in the first (other runs)
    workers[1][n - 7] = f32::INFINITY;
    workers[1][11] = f32::NAN;
    let refs: Vec<&[f32]> = workers.iter().map(|w| w.as_slice()).collect();
    let cpu = gradsift::cpu::estimate_variance(&refs, &layout, &mut want).unwrap_err();
    let mut kept = got.clone();
    let dev = stats.estimate_variance(&refs, &mut kept).unwrap_err();
    assert_eq!(dev, cpu);
    assert!(
        matches!(
            dev,
            Error::NonFinite {
                count: 2,
                first_index: 11
            }
        ),
        "{dev:?}"
    );
    assert_eq!(kept, got, "a failed estimate leaves the output as it was");
}
