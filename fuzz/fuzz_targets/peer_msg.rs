//! Bytes after authentication: decoded as peer messages and, when they
//! decode, handled by a ready member whose peer sent them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sessionmesh_sidecar::core::message::PeerMsg;

fuzz_target!(|data: &[u8]| {
    let mut msgs = Vec::new();
    let mut rest = data;
    while !rest.is_empty() && msgs.len() < 16 {
        match postcard::take_from_bytes::<PeerMsg>(rest) {
            Ok((m, r)) => {
                msgs.push(Some(m));
                rest = r;
            }
            Err(_) => break,
        }
    }
    sessionmesh_fuzz::run_peer_msgs(msgs, &[]);
});
