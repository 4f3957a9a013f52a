//! The handshake fed arbitrary frame sequences, on both sides: the listener
//! (`server_handshake`) and the dialer (`client_handshake`). Neither may
//! panic, and neither may accept a peer that does not hold the secret.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sessionmesh_sidecar::net::transport::{client_handshake, server_handshake, IoStats, Security};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

fn sec() -> Security {
    Security {
        cluster: "fuzz".into(),
        me: sessionmesh_fuzz::node("a"),
        secret: Arc::new(b"0123456789abcdef0123456789abcdef".to_vec()),
        max_frame: 1 << 16,
        handshake_timeout: Duration::from_millis(200),
        stats: Arc::new(IoStats::default()),
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let (dialer_side, listener_side) = data.split_at(data.len() / 2);
    rt.block_on(async {
        for (input, listen) in [(listener_side, true), (dialer_side, false)] {
            let (mut ours, mut theirs) = tokio::io::duplex(1 << 17);
            let _ = theirs.write_all(input).await;
            drop(theirs.shutdown().await);
            let s = sec();
            let accepted = if listen {
                server_handshake(&mut ours, &s, true, |_| true)
                    .await
                    .is_ok()
            } else {
                client_handshake(&mut ours, &s, "b", false).await.is_ok()
            };
            // Without the secret no byte string completes a handshake: the
            // proofs are HMACs over fresh nonces.
            assert!(!accepted, "a handshake completed without the secret");
        }
    });
});
