//! Peers that are not what they claim: garbage frames, no secret, forged
//! timestamps, data past the limits, and a relay between two members.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

mod common;

use common::*;
use sessionmesh_sidecar::core::hlc::Hlc;
use sessionmesh_sidecar::core::identity::SessionId;
use sessionmesh_sidecar::core::message::PeerMsg;
use sessionmesh_sidecar::core::store::Delta;
use sessionmesh_sidecar::demo::client::Client;
use sessionmesh_sidecar::demo::localcluster::{metric, wait_for, LocalCluster};
use sessionmesh_sidecar::net::transport::{self};
use sessionmesh_sidecar::node::now_ms;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_are_refused_and_the_node_stays_healthy() {
    let cl = started(2, &["--max-frame-bytes", "1048576"]).await;
    let addr = cl.nodes[0].replication;
    // Garbage: an HTTP request on the replication port.
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3))).ok();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut buf = [0u8; 64];
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "garbage got an answer");
    // A frame header announcing 4 GiB: refused before any allocation.
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3))).ok();
    let mut hdr = b"SMSH".to_vec();
    hdr.extend_from_slice(&[sessionmesh_sidecar::net::frame::VERSION, 1]);
    hdr.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&hdr).expect("write");
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
    let mut c = cl.client(0);
    let t = Instant::now();
    let mut log = String::new();
    while t.elapsed() < Duration::from_secs(3) {
        log = cl.log_text(0);
        if log.contains("bad magic") && log.contains("exceeds the limit") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(log.contains("bad magic"), "{log}");
    assert!(log.contains("exceeds the limit"), "{log}");
    assert_eq!(c.get("/healthz").await.expect("healthz").status, 200);
    assert_eq!(c.get("/readyz").await.expect("readyz").status, 200);
    let r = c
        .post("/v1/sessions", r#"{"id":"AFTER"}"#)
        .await
        .expect("create");
    assert_eq!(r.status, 201);
    let m = c.get("/metrics").await.expect("metrics").text();
    assert!(
        !m.contains("sessionmesh_frame_errors_total 0\n"),
        "frame errors not counted"
    );
    assert_eq!(
        member_state(&mut c, "node2").await.as_deref(),
        Some("alive")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_the_secret_is_refused_and_gets_no_data() {
    let mut cl = LocalCluster::new(&bin(), 3, &[]).expect("cluster");
    cl.start(0).expect("start");
    cl.start(1).expect("start");
    assert!(cl.wait_ready(0, Duration::from_secs(10)).await);
    let mut c = cl.client(0);
    for i in 0..20 {
        let r = c
            .post("/v1/sessions", format!(r#"{{"id":"SECRETDATA{i}"}}"#))
            .await
            .expect("create");
        assert_eq!(r.status, 201);
    }
    let wrong = cl.dir.join("wrong-secret");
    std::fs::write(&wrong, "this-is-not-the-cluster-secret").expect("write");
    let wrong = wrong.display().to_string();
    cl.start_with(2, &["--secret-file", &wrong])
        .expect("start intruder");
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5)
        && !cl.log_text(0).contains("does not hold the cluster secret")
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        cl.log_text(0).contains("does not hold the cluster secret"),
        "{}",
        cl.log_tail(0, 20)
    );
    assert!(
        cl.log_text(2).contains("refused the handshake"),
        "{}",
        cl.log_tail(2, 20)
    );
    let mut c3 = cl.client(2);
    assert_eq!(count(&mut c3).await, 0, "the intruder received sessions");
    let m = c.get("/metrics").await.expect("metrics").text();
    assert!(!m.contains("sessionmesh_auth_failures_total 0\n"));
    assert_ne!(
        member_state(&mut c, "node3").await.as_deref(),
        Some("alive")
    );
    assert_eq!(c.get("/healthz").await.expect("healthz").status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_timestamps_neither_win_nor_freeze_the_clock() {
    // node3 is listed but never started: the test speaks for it.
    let mut cl = LocalCluster::new(&bin(), 3, &["--send", "sync"]).expect("cluster");
    cl.start(0).expect("start");
    cl.start(1).expect("start");
    ready(&cl, 0).await;
    ready(&cl, 1).await;
    let mut c0 = cl.client(0);
    for id in ["FUTURE", "MAXLOG"] {
        assert_eq!(
            c0.post("/v1/sessions?send=sync", format!(r#"{{"id":"{id}"}}"#))
                .await
                .expect("create")
                .status,
            201
        );
    }
    let mut s = impersonate(&cl, 0, "node3").await;
    let now = now_ms();
    let deltas = vec![
        // Ten minutes ahead: would win every later write.
        forged(
            "FUTURE",
            Hlc {
                wall_ms: now + 600_000,
                logical: 0,
                node: 7,
            },
            "forged",
        ),
        // Within the time bound, but a saturated logical counter.
        forged(
            "MAXLOG",
            Hlc {
                wall_ms: now + 500,
                logical: u32::MAX,
                node: 7,
            },
            "forged",
        ),
    ];
    send(
        &mut s,
        &PeerMsg::Deltas {
            epoch: 1,
            first_seq: 1,
            deltas,
        },
    )
    .await;
    // Deltas apply in order: once the second is visible, the first was handled.
    let handled = wait_for(Duration::from_secs(5), || {
        let mut c = Client::new(http(&cl, 0));
        async move { value(&mut c, "MAXLOG", "a").await.as_deref() == Some("forged") }
    })
    .await;
    assert!(handled, "the forged frame was not handled");
    // Every later write wins, on both members, on both keys.
    later_writes_win(&cl, &[1, 0], &[0, 1], "FUTURE", 4).await;
    later_writes_win(&cl, &[0, 1], &[0, 1], "MAXLOG", 8).await;
    assert!(
        metric(&mut c0, "sessionmesh_clock_refused_total").await >= 1.0,
        "the future delta was not counted"
    );
    drop(s);
    assert_eq!(c0.get("/readyz").await.expect("readyz").status, 200);
}

/// A peer holding the secret that sends more than the limits allow: its data
/// is refused and counted, never applied; the members stay ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_cannot_push_data_past_the_limits() {
    let limits = [
        "--max-sessions",
        "100",
        "--max-attr-bytes",
        "1024",
        "--max-session-bytes",
        "4096",
    ];
    let mut cl = LocalCluster::new(&bin(), 3, &limits).expect("cluster");
    cl.start(0).expect("start");
    cl.start(1).expect("start");
    ready(&cl, 0).await;
    ready(&cl, 1).await;
    let mut c0 = cl.client(0);
    let mut s = impersonate(&cl, 0, "node3").await;
    // 150 sessions against a cap of 100, one 2 MiB attribute against 1 KiB.
    let mut deltas: Vec<Arc<Delta>> = (0..150)
        .map(|i| create(&format!("H{i}"), vec![("a", b"1".to_vec())]))
        .collect();
    deltas.push(create("HUGE", vec![("a", vec![b'x'; 2 << 20])]));
    let n = deltas.len() as u64;
    send(
        &mut s,
        &PeerMsg::Deltas {
            epoch: 1,
            first_seq: 1,
            deltas,
        },
    )
    .await;
    let refused = wait_for(Duration::from_secs(5), || {
        let mut c = Client::new(http(&cl, 0));
        async move { metric(&mut c, "sessionmesh_peer_refused_total").await >= 51.0 }
    })
    .await;
    assert!(
        refused,
        "over-limit deltas not refused: {}",
        metric(&mut c0, "sessionmesh_peer_refused_total").await
    );
    assert!(count(&mut c0).await <= 100, "the session cap was passed");
    assert_eq!(
        c0.get("/v1/sessions/HUGE").await.expect("get").status,
        404,
        "a 2 MiB attribute was stored"
    );
    // An id no client could have written: the frame is refused whole.
    let bad = Arc::new(Delta {
        id: SessionId::key(b"Z").expect("id"),
        ..(*create("Z", vec![])).clone()
    });
    let mut body = postcard::to_allocvec(&PeerMsg::Deltas {
        epoch: 1,
        first_seq: n + 1,
        deltas: vec![bad],
    })
    .expect("encode");
    // Turn the id "Z" into a newline inside the message (postcard writes it as length 1, then the byte).
    let pos = body
        .windows(2)
        .position(|w| w == [1, b'Z'])
        .expect("id in frame");
    body[pos + 1] = b'\n';
    let mut frame = bytes::BytesMut::new();
    s.keys.send.seal_payload(body, &mut frame).expect("seal");
    s.stream.write_all(&frame).await.expect("write");
    let closed = wait_for(Duration::from_secs(5), || {
        let mut c = Client::new(http(&cl, 0));
        async move { metric(&mut c, "sessionmesh_frame_errors_total").await >= 1.0 }
    })
    .await;
    assert!(closed, "a frame with a bad id was not refused");
    for i in 0..2 {
        assert_eq!(
            cl.client(i).get("/readyz").await.expect("readyz").status,
            200,
            "node{} not ready",
            i + 1
        );
    }
    // The honest member never got past the limits either (anti-entropy copies only what node1 holds).
    assert!(count(&mut cl.client(1)).await <= 100);
}

/// A relay on the path between two members, without the secret: what it
/// forwards carries no session content in clear, and a frame it injects is
/// refused (the connection closes and is redialed) and never applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_without_the_secret_can_neither_read_nor_inject() {
    use tokio::io::AsyncReadExt;
    let mut cl = LocalCluster::new(&bin(), 2, &["--send", "sync"]).expect("cluster");
    // node2 binds its real port; the member file sends node1 to the relay instead.
    let real = cl.nodes[1].replication;
    let relay = std::net::SocketAddr::from((
        [127, 0, 0, 1],
        sessionmesh_sidecar::demo::localcluster::free_port().expect("port"),
    ));
    cl.nodes[1].replication = relay;
    cl.write_members().expect("members");
    let listener = tokio::net::TcpListener::bind(relay)
        .await
        .expect("bind relay");
    let seen = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let (inject_tx, inject_rx) = tokio::sync::watch::channel(false);
    let recorded = seen.clone();
    let once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(async move {
        while let Ok((c, _)) = listener.accept().await {
            let Ok(s) = tokio::net::TcpStream::connect(real).await else {
                continue;
            };
            let (recorded, mut inject_rx, once) =
                (recorded.clone(), inject_rx.clone(), once.clone());
            tokio::spawn(async move {
                let ((mut cr, mut cw), (mut sr, mut sw)) = (c.into_split(), s.into_split());
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                // One injection in all, not one per (re)connection.
                let mut injected = once.load(std::sync::atomic::Ordering::Relaxed);
                loop {
                    tokio::select! {
                        r = cr.read(&mut buf) => {
                            let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                            if let Ok(mut v) = recorded.lock() { v.extend_from_slice(&buf[..n]); }
                            if sw.write_all(&buf[..n]).await.is_err() { return; }
                        }
                        _ = inject_rx.changed(), if !injected => {
                            injected = true;
                            if once.swap(true, std::sync::atomic::Ordering::Relaxed) { continue; }
                            // What a relay could do to the old protocol: a plain frame after the handshake.
                            let forged = delta("RELAY", Hlc { wall_ms: now_ms(), logical: 0, node: 1 }, vec![set("role", b"admin".to_vec())]);
                            let mut f = bytes::BytesMut::new();
                            transport::encode_peer(&PeerMsg::Deltas { epoch: 1, first_seq: 1, deltas: vec![forged] }, &mut f).expect("encode");
                            if sw.write_all(&f).await.is_err() { return; }
                        }
                    }
                }
            });
        }
    });
    cl.start(0).expect("start");
    cl.start_with(1, &["--listen", &real.to_string()])
        .expect("start");
    ready(&cl, 0).await;
    ready(&cl, 1).await;
    let mut c0 = cl.client(0);
    assert_eq!(
        c0.post("/v1/sessions", r#"{"id":"RELAY"}"#)
            .await
            .expect("create")
            .status,
        201
    );
    assert_eq!(put(&mut c0, "RELAY", "role", "user-MARKER-4711").await, 204);
    let mut c1 = cl.client(1);
    assert_eq!(
        value(&mut c1, "RELAY", "role").await.as_deref(),
        Some("user-MARKER-4711"),
        "replication through the relay"
    );
    let clear = seen
        .lock()
        .map(|v| v.windows(11).any(|w| w == b"MARKER-4711"))
        .unwrap_or(true);
    assert!(!clear, "the relay read session content in clear");
    let before = metric(&mut c1, "sessionmesh_frame_errors_total").await;
    inject_tx.send(true).expect("inject");
    let refused = wait_for(Duration::from_secs(5), || {
        let mut c = Client::new(http(&cl, 1));
        async move { metric(&mut c, "sessionmesh_frame_errors_total").await > before }
    })
    .await;
    assert!(refused, "the injected frame was not refused");
    assert_eq!(
        value(&mut c1, "RELAY", "role").await.as_deref(),
        Some("user-MARKER-4711"),
        "the injected frame was applied"
    );
    // The members carry on through the relay.
    later_writes_win(&cl, &[0], &[0, 1], "RELAY", 3).await;
}
