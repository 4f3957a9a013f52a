//! `SessionCluster` specs as the API server could hand them over (JSON):
//! deserializing and `validate()` never panic, and a valid spec's durations
//! and ranges are usable.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sessionmesh_api::{parse_duration_ms, SessionClusterSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<SessionClusterSpec>(data) else {
        return;
    };
    if spec.validate().is_ok() {
        assert!(spec.receiver_ports.first <= spec.receiver_ports.last);
        for d in [
            &spec.failure_detection.heartbeat_interval,
            &spec.failure_detection.suspect_after,
            &spec.failure_detection.probe_timeout,
        ] {
            assert!(
                parse_duration_ms(d).is_some(),
                "a valid spec with a bad duration {d:?}"
            );
        }
    }
});
