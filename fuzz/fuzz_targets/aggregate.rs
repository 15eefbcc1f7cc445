//! Feeds the CPU parameter server hand-built, hostile payloads (bypassing the wire decoder's
//! checks): indices out of range, unsorted or repeated, lengths that disagree, non-finite
//! values and scales, the wrong `n`, sign payloads with the wrong number of words or scales,
//! the wrong number of payloads. A panic is a crash; so is an accepted step whose output
//! breaks what SPEC §7 promises (a coordinate nobody sent is 0 under either rule;
//! bounded finite inputs give a finite output).

#![no_main]

use gradsift::{
    Aggregate, Average, Backend, DType, Device, Layout, Mode, Payload, SignPayload,
    SparsePayload,
};
use libfuzzer_sys::fuzz_target;

/// Reads little-endian integers off the input; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
    fn f32(&mut self) -> f32 {
        // Mostly small "gradient" values, sometimes raw bits (NaN, inf, huge, subnormal).
        match self.u8() % 4 {
            0 => f32::from_bits(self.u32()),
            _ => f32::from(self.u16() as i16) / 256.0,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let layers = 1 + usize::from(b.u8() % 4);
    let sizes: Vec<usize> = (0..layers).map(|_| usize::from(b.u16() % 300)).collect();
    let Ok(layout) = Layout::new(&sizes) else {
        return;
    };
    let n = layout.n();
    let mode = if b.u8() & 1 == 0 {
        Mode::Global
    } else {
        Mode::PerLayer
    };
    let rule = if b.u8() & 1 == 0 {
        Average::OverWorkers
    } else {
        Average::OverSenders
    };
    let workers = usize::from(b.u8() % 6);
    let groups = match mode {
        Mode::Global => 1,
        Mode::PerLayer => layers,
    };
    let mut payloads = Vec::new();
    // Usually one payload per worker; sometimes one too few or too many.
    let count = match b.u8() % 8 {
        0 => workers.saturating_sub(1),
        1 => workers + 1,
        _ => workers,
    };
    for _ in 0..count {
        // The payload's n: usually right, sometimes off.
        let pn = match b.u8() % 8 {
            0 => b.u32(),
            1 => (n as u32).wrapping_add(1),
            _ => n as u32,
        };
        if b.u8() % 3 == 0 {
            let words = match b.u8() % 4 {
                0 => usize::from(b.u8()),
                _ => n.div_ceil(64),
            };
            let scales = match b.u8() % 4 {
                0 => usize::from(b.u8() % 8),
                _ => groups,
            };
            payloads.push(Payload::Sign(SignPayload {
                n: pn,
                scales: (0..scales).map(|_| b.f32()).collect(),
                negative: (0..words).map(|_| b.u64()).collect(),
            }));
        } else {
            let k = usize::from(b.u16() % 512);
            let mut indices = Vec::with_capacity(k);
            let mut next = 0u32;
            for _ in 0..k {
                // Mostly ascending in range; sometimes anything.
                let i = match b.u8() % 8 {
                    0 => b.u32(),
                    1 => next.saturating_sub(1),
                    _ => {
                        next = next.saturating_add(1 + u32::from(b.u8() % 16));
                        next - 1
                    }
                };
                indices.push(i);
            }
            let values = match b.u8() % 8 {
                0 => k + 1,
                1 => k.saturating_sub(1),
                _ => k,
            };
            payloads.push(Payload::Sparse(SparsePayload {
                n: pn,
                values_dtype: DType::F32,
                indices,
                values: (0..values).map(|_| b.f32()).collect(),
            }));
        }
    }
    let out_len = if b.u8() % 16 == 0 { n + 1 } else { n };
    let device = Device::open(Backend::Cpu).expect("the CPU backend always opens");
    let Ok(mut agg) = device.aggregator(&layout, mode, rule, workers) else {
        assert_eq!(workers, 0, "only K = 0 may be refused");
        return;
    };
    let mut out = vec![f32::NAN; out_len];
    if agg.aggregate(&payloads, &mut out).is_err() {
        return;
    }
    assert_eq!(payloads.len(), workers);
    assert_eq!(out.len(), n);
    let mut sent = vec![false; n];
    let mut bounded = true;
    for p in &payloads {
        match p {
            Payload::Sparse(s) => {
                for (&i, &v) in s.indices.iter().zip(&s.values) {
                    sent[i as usize] = true;
                    bounded &= v.abs() <= 1e30;
                }
            }
            Payload::Sign(s) => {
                sent.iter_mut().for_each(|x| *x = true);
                bounded &= s.scales.iter().all(|v| v.abs() <= 1e30);
            }
        }
    }
    for (i, &x) in out.iter().enumerate() {
        if bounded {
            assert!(x.is_finite(), "coordinate {i}: {x} from bounded finite payloads");
        }
        if !sent[i] {
            assert_eq!(x, 0.0, "coordinate {i} was sent by nobody");
        }
    }
});
