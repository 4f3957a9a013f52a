//! Clocks that cannot be trusted, with real processes: a member whose wall
//! clock is ten minutes ahead (libfaketime), one restarted after its clock
//! stepped back, and a peer that forges timestamps. In every case no
//! acknowledged write is lost and every member with a good clock stays ready.

use sessionmesh_sidecar::core::hlc::Hlc;
use sessionmesh_sidecar::core::identity::{Generation, NodeId, SessionId};
use sessionmesh_sidecar::core::message::PeerMsg;
use sessionmesh_sidecar::core::store::{Delta, Op};
use sessionmesh_sidecar::demo::client::Client;
use sessionmesh_sidecar::demo::localcluster::{
    faketime_env, metric, rss_bytes, wait_for, LocalCluster,
};
use sessionmesh_sidecar::net::transport::{self, IoStats, Security};
use sessionmesh_sidecar::node::now_ms;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

fn bin() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_sessionmesh-sidecar").into()
}

fn http(cl: &LocalCluster, i: usize) -> std::net::SocketAddr {
    cl.nodes[i].http.expect("started")
}

async fn ready(cl: &LocalCluster, i: usize) {
    assert!(
        cl.wait_ready(i, Duration::from_secs(15)).await,
        "node{} not ready:\n{}",
        i + 1,
        cl.log_tail(i, 30)
    );
}

async fn value(c: &mut Client, id: &str, name: &str) -> Option<String> {
    let r = c
        .get(&format!("/v1/sessions/{id}/attributes/{name}?touch=false"))
        .await
        .ok()?;
    (r.status == 200).then(|| r.text())
}

async fn put(c: &mut Client, id: &str, name: &str, v: &str) -> u16 {
    c.put(
        &format!("/v1/sessions/{id}/attributes/{name}?send=sync"),
        v.to_owned(),
    )
    .await
    .map_or(0, |r| r.status)
}

/// Writes `rounds` values alternately on the members in `on`, each read back
/// from every member in `check`: a later acknowledged write must always win.
async fn later_writes_win(
    cl: &LocalCluster,
    on: &[usize],
    check: &[usize],
    id: &str,
    rounds: usize,
) {
    for r in 0..rounds {
        let i = on[r % on.len()];
        let v = format!("v{r}");
        assert_eq!(
            put(&mut cl.client(i), id, "a", &v).await,
            204,
            "write {r} on node{}",
            i + 1
        );
        for &j in check {
            let mut c = cl.client(j);
            let addr = http(cl, j);
            let ok = wait_for(Duration::from_secs(5), || {
                let mut c = Client::new(addr);
                let v = v.clone();
                async move { value(&mut c, id, "a").await.as_deref() == Some(v.as_str()) }
            })
            .await;
            assert!(
                ok,
                "node{} lost acknowledged write {v}: has {:?}",
                j + 1,
                value(&mut c, id, "a").await
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_ten_minutes_ahead_is_reported_and_loses_no_write_of_the_others() {
    let mut cl = LocalCluster::new(&bin(), 3, &["--send", "sync"]).expect("cluster");
    cl.start(0).expect("start");
    cl.start(1).expect("start");
    ready(&cl, 0).await;
    ready(&cl, 1).await;
    let mut c0 = cl.client(0);
    assert_eq!(
        c0.post("/v1/sessions", r#"{"id":"SKEW"}"#)
            .await
            .expect("create")
            .status,
        201
    );
    let env = faketime_env("+10m");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    cl.start_with_env(2, &[], &env).expect("start ahead");
    let mut c2 = cl.client(2);
    // The fast member learns from its peers that its clock is off, and says so.
    let reported = wait_for(Duration::from_secs(10), || {
        let mut c = Client::new(http(&cl, 2));
        async move {
            c.get("/v1/cluster")
                .await
                .is_ok_and(|r| r.json()["me"]["clockSkewMs"].as_i64().unwrap_or(0) > 500_000)
        }
    })
    .await;
    assert!(
        reported,
        "node3 never reported its clock skew: {}",
        c2.get("/v1/cluster")
            .await
            .map(|r| r.text())
            .unwrap_or_default()
    );
    assert_eq!(
        c2.get("/readyz").await.expect("readyz").status,
        503,
        "a member with a wrong clock must not take traffic"
    );
    assert_eq!(metric(&mut c2, "sessionmesh_clock_skewed").await, 1.0);
    // A write there is refused with a reason, not stamped 10 minutes ahead.
    let r = c2
        .put(
            "/v1/sessions/SKEW/attributes/a?send=sync",
            "from-the-future",
        )
        .await
        .expect("put");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("clock_skew"), "{}", r.text());
    // A touch from its reads is stamped ahead and refused by the others.
    let _ = c2.get("/v1/sessions/SKEW").await;
    // The others keep serving: every later write wins everywhere.
    assert_eq!(c0.get("/readyz").await.expect("readyz").status, 200);
    later_writes_win(&cl, &[0, 1], &[0, 1], "SKEW", 10).await;
    let shown = wait_for(Duration::from_secs(5), || {
        let mut c = Client::new(http(&cl, 1));
        async move {
            c.get("/v1/cluster").await.is_ok_and(|r| {
                r.json()["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| {
                        m["name"] == "node3" && m["clockOffsetMs"].as_i64().unwrap_or(0) > 500_000
                    })
            })
        }
    })
    .await;
    assert!(shown, "node2 does not show node3's clock offset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_after_its_clock_stepped_back_rejoins() {
    let mut cl = LocalCluster::new(&bin(), 3, &["--send", "sync"]).expect("cluster");
    cl.start(0).expect("start");
    cl.start(1).expect("start");
    ready(&cl, 0).await;
    ready(&cl, 1).await;
    // It starts an hour ahead, is seen by its peers, then dies; its clock is
    // corrected and it starts again, an hour "earlier" than its last start.
    let env = faketime_env("+1h");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    cl.start_with_env(2, &[], &env).expect("start ahead");
    let seen = wait_for(Duration::from_secs(10), || {
        let mut c = Client::new(http(&cl, 0));
        async move {
            c.get("/v1/cluster").await.is_ok_and(|r| {
                r.json()["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| {
                        m["name"] == "node3" && m["state"] == "alive" && m["connected"] == true
                    })
            })
        }
    })
    .await;
    assert!(seen, "node1 never saw node3");
    cl.kill(2);
    let mut c0 = cl.client(0);
    assert_eq!(
        c0.post(
            "/v1/sessions?send=sync",
            r#"{"id":"BACK","attributes":{"a":"MQ=="}}"#
        )
        .await
        .expect("create")
        .status,
        201
    );
    cl.start(2).expect("restart");
    ready(&cl, 2).await;
    let mut c2 = cl.client(2);
    assert_eq!(
        value(&mut c2, "BACK", "a").await.as_deref(),
        Some("1"),
        "the restarted member lacks what was written meanwhile"
    );
    later_writes_win(&cl, &[0, 1, 2], &[0, 1, 2], "BACK", 6).await;
}

/// What member `name` of `cl` would present: the cluster's secret, a new life.
fn member_security(cl: &LocalCluster, name: &str) -> Security {
    let secret = std::fs::read(&cl.secret_file).expect("secret");
    Security {
        cluster: cl.cluster.clone(),
        me: NodeId {
            name: name.into(),
            generation: Generation::random(),
        },
        secret: Arc::new(secret.trim_ascii().to_vec()),
        max_frame: 64 << 20,
        handshake_timeout: Duration::from_secs(2),
        stats: Arc::new(IoStats::default()),
    }
}

/// An authenticated connection the test speaks on as a member.
struct Fake {
    stream: tokio::net::TcpStream,
    keys: transport::Keys,
}

/// Dials `cl`'s node `to` as member `as_name` with the cluster secret and
/// returns the authenticated connection.
async fn impersonate(cl: &LocalCluster, to: usize, as_name: &str) -> Fake {
    let sec = member_security(cl, as_name);
    let d = transport::dial(
        cl.nodes[to].replication,
        &sec,
        &cl.nodes[to].name,
        false,
        Duration::from_secs(2),
    )
    .await
    .expect("dial");
    Fake {
        stream: d.stream,
        keys: d.keys,
    }
}

async fn send(s: &mut Fake, msg: &PeerMsg) {
    let mut out = bytes::BytesMut::new();
    s.keys.send.seal(msg, &mut out).expect("seal");
    s.stream.write_all(&out).await.expect("write");
}

/// A delta a forging peer sends: `ops` on session `id`, stamped `hlc`.
fn delta(id: &str, hlc: Hlc, ops: Vec<Op>) -> Arc<Delta> {
    Arc::new(Delta {
        id: SessionId::key(id.as_bytes()).expect("id"),
        hlc,
        created_ms: now_ms(),
        last_accessed_ms: now_ms(),
        max_inactive_ms: 600_000,
        ops,
    })
}

fn set(name: &str, value: Vec<u8>) -> Op {
    Op::Set {
        name: name.into(),
        value: bytes::Bytes::from(value),
    }
}

fn forged(id: &str, hlc: Hlc, value: &str) -> Arc<Delta> {
    delta(id, hlc, vec![set("a", value.as_bytes().to_vec())])
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

async fn count(c: &mut Client) -> u64 {
    c.get("/v1/sessions?limit=1")
        .await
        .map(|r| r.json()["count"].as_u64().unwrap_or(0))
        .unwrap_or(0)
}

fn create(id: &str, attrs: Vec<(&str, Vec<u8>)>) -> Arc<Delta> {
    let mut ops = vec![Op::Create];
    ops.extend(attrs.into_iter().map(|(n, v)| set(n, v)));
    delta(
        id,
        Hlc {
            wall_ms: now_ms(),
            logical: 0,
            node: 7,
        },
        ops,
    )
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

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

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
