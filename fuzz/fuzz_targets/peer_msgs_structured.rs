//! Structure-aware: sequences of well-formed peer messages (deltas,
//! transfer chunks, anti-entropy, acks, clocks) with time passing, so the
//! fuzzer reaches the store's merge rules and the core's streams.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sessionmesh_fuzz::FuzzMsg;

fuzz_target!(|msgs: Vec<FuzzMsg>| {
    let ticks: Vec<u16> = msgs
        .iter()
        .map(|m| match m {
            FuzzMsg::Tick { ms } => *ms,
            _ => 0,
        })
        .collect();
    sessionmesh_fuzz::run_peer_msgs(msgs.iter().map(FuzzMsg::msg), &ticks);
});
