//! Floods before and after authentication, and a peer that does not read:
//! memory, descriptors and queues stay bounded.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

mod common;

use common::*;
use sessionmesh_sidecar::core::hlc::Hlc;
use sessionmesh_sidecar::core::message::PeerMsg;
use sessionmesh_sidecar::demo::client::Client;
use sessionmesh_sidecar::demo::localcluster::{metric, rss_bytes, wait_for, LocalCluster};
use sessionmesh_sidecar::net::transport::{self};
use sessionmesh_sidecar::node::now_ms;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Connections that never authenticate, and a peer's flood of probe requests,
/// hold a bounded number of descriptors; the member keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_before_and_after_authentication_stay_bounded() {
    let mut cl = LocalCluster::new(&bin(), 3, &[]).expect("cluster");
    cl.start(0).expect("start");
    cl.start(1).expect("start");
    ready(&cl, 0).await;
    ready(&cl, 1).await;
    let pid = cl.pid(0).expect("pid");
    let before = fds(pid);
    let mut held = Vec::new();
    for _ in 0..600 {
        if let Ok(s) = tokio::net::TcpStream::connect(cl.nodes[0].replication).await {
            held.push(s);
        }
    }
    let mut peak = 0;
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_millis(800) {
        peak = peak.max(fds(pid));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c0 = cl.client(0);
    let t = std::time::Instant::now();
    assert_eq!(c0.get("/readyz").await.expect("readyz").status, 200);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "the API answered in {:?} under a connection flood",
        t.elapsed()
    );
    assert!(
        peak < before + 100,
        "600 unauthenticated connections held {peak} descriptors (from {before})"
    );
    assert!(metric(&mut c0, "sessionmesh_replication_pending_refused_total").await > 0.0);
    drop(held);
    // 3,000 probe requests from an authenticated peer: a bounded number of probes.
    let mut s = impersonate(&cl, 0, "node3").await;
    for _ in 0..3 {
        let mut batch = bytes::BytesMut::new();
        for _ in 0..1000 {
            s.keys
                .send
                .seal(
                    &PeerMsg::PingReq {
                        target: "node2".into(),
                    },
                    &mut batch,
                )
                .expect("seal");
        }
        s.stream.write_all(&batch).await.expect("write");
    }
    let dropped = wait_for(Duration::from_secs(5), || {
        let mut c = Client::new(http(&cl, 0));
        async move { metric(&mut c, "sessionmesh_probes_dropped_total").await > 0.0 }
    })
    .await;
    assert!(dropped, "probe requests were not bounded");
    let mut peak = 0;
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_millis(500) {
        peak = peak.max(fds(pid));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        peak < before + 60,
        "a probe-request flood held {peak} descriptors (from {before})"
    );
}

/// A peer that authenticates and then reads nothing: the queue toward it stays
/// bounded, whatever is written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_read_cannot_grow_the_send_queue() {
    let mut cl = LocalCluster::new(
        &bin(),
        2,
        &["--max-queue-bytes", "4194304", "--write-timeout-ms", "100"],
    )
    .expect("cluster");
    // node2 is the test: it listens where node2 should, authenticates, and never reads.
    let listener = tokio::net::TcpListener::bind(cl.nodes[1].replication)
        .await
        .expect("bind node2's address");
    let sec = member_security(&cl, "node2");
    let server_sec = sec.clone();
    tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            if let Ok((_, probe, _, _)) =
                transport::server_handshake(&mut s, &server_sec, false, |_| true).await
            {
                if !probe {
                    kept.push(s);
                }
            }
        }
    });
    cl.start(0).expect("start");
    // It also speaks to node1 (not ready: no state to transfer), so node1 keeps it alive.
    let mut s = impersonate(&cl, 0, "node2").await;
    tokio::spawn(async move {
        loop {
            let hlc = Hlc {
                wall_ms: now_ms(),
                logical: 0,
                node: 9,
            };
            let mut b = bytes::BytesMut::new();
            s.keys
                .send
                .seal(&PeerMsg::Heartbeat { ready: false }, &mut b)
                .expect("seal");
            s.keys
                .send
                .seal(&PeerMsg::Clock { hlc }, &mut b)
                .expect("seal");
            if s.stream.write_all(&b).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    ready(&cl, 0).await;
    let pid = cl.pid(0).expect("pid");
    let mut c0 = cl.client(0);
    assert_eq!(
        c0.post("/v1/sessions", r#"{"id":"SLOW"}"#)
            .await
            .expect("create")
            .status,
        201
    );
    let base = rss_bytes(pid) / (1 << 20);
    let value = vec![b'x'; 512 * 1024];
    let mut peak = base;
    for _ in 0..300 {
        let _ = c0
            .put("/v1/sessions/SLOW/attributes/a?send=async", value.clone())
            .await;
        peak = peak.max(rss_bytes(pid) / (1 << 20));
    }
    // 150 MiB written toward a peer that reads nothing.
    eprintln!("RSS {base} MiB -> peak {peak} MiB");
    assert!(peak < base + 64, "RSS grew from {base} MiB to {peak} MiB");
    assert_eq!(c0.get("/readyz").await.expect("readyz").status, 200);
}
