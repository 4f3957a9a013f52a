//! The wire frame decoder on arbitrary bytes: frames are split with a limit,
//! and every payload is decoded as a handshake and as a peer message.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sessionmesh_sidecar::core::message::PeerMsg;
use sessionmesh_sidecar::net::frame::{decode, split_frame, FrameType, Handshake};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    for _ in 0..64 {
        match split_frame(&mut buf, 1 << 16) {
            Ok(Some((ty, payload))) => {
                assert!(payload.len() <= 1 << 16, "a frame past the limit");
                let _ = decode::<Handshake>(FrameType::Handshake, ty, &payload);
                let _ = decode::<PeerMsg>(FrameType::Peer, ty, &payload);
            }
            Ok(None) | Err(_) => break,
        }
    }
});
