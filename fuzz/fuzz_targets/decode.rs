//! Decodes arbitrary bytes. A panic anywhere (the decoder, or an invariant below) is a crash.
//! On success the payload must be valid and the bytes must be its one canonical encoding.

#![no_main]

use gradsift::{Payload, wire};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = wire::decode(data) else {
        return;
    };
    match &p {
        Payload::Sparse(s) => {
            assert_eq!(s.indices.len(), s.values.len());
            assert!(
                s.indices.windows(2).all(|w| w[0] < w[1]),
                "indices not ascending"
            );
            assert!(s.indices.iter().all(|&i| i < s.n), "index out of range");
            for &v in &s.values {
                assert!(v.is_finite(), "non-finite value");
                assert_eq!(
                    s.values_dtype.quantize(v).to_bits(),
                    v.to_bits(),
                    "value not representable in its dtype"
                );
            }
        }
        Payload::Sign(s) => {
            assert_eq!(s.negative.len(), (s.n as usize).div_ceil(64));
            if s.n % 64 != 0 {
                assert_eq!(s.negative.last().unwrap() >> (s.n % 64), 0, "bits beyond n");
            }
            assert!(s.scales.iter().all(|v| v.is_finite()), "non-finite scale");
        }
    }
    let mut out = Vec::new();
    let bits = wire::encode(&p, &mut out).expect("a decoded payload must encode");
    assert_eq!(out, data, "accepted a non-canonical encoding");
    assert_eq!(bits.total(), 8 * data.len() as u64);

    // `decode_into` a reused payload of either kind gives the same result.
    let mut reused = Payload::Sign(Default::default());
    wire::decode_into(data, &mut reused).expect("decode_into disagrees with decode");
    assert_eq!(format!("{reused:?}"), format!("{p:?}"));
    let mut reused = Payload::Sparse(Default::default());
    wire::decode_into(data, &mut reused).expect("decode_into disagrees with decode");
    assert_eq!(format!("{reused:?}"), format!("{p:?}"));
});
