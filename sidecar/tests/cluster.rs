//! Real sidecar processes on loopback: replication through SIGKILL, joins,
//! leaves, removal and return, and stuck cores. Every wait has a deadline.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

mod common;

use common::*;
use sessionmesh_sidecar::demo::client::Client;
use sessionmesh_sidecar::demo::localcluster::{wait_for, LocalCluster};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_sigkill_loses_no_acknowledged_write() {
    let mut cl = started(3, &["--send", "sync"]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked_so_far = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..3usize {
        let mut c = cl.client(w);
        let stop = stop.clone();
        let acked_so_far = acked_so_far.clone();
        writers.push(tokio::spawn(async move {
            let mut acked: Vec<(String, String, String)> = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 100_000 {
                let id = format!("W{w}S{}", i % 50);
                if i < 50 {
                    let r = c.post("/v1/sessions", format!(r#"{{"id":"{id}"}}"#)).await;
                    if r.is_err() {
                        break;
                    }
                } else {
                    let (attr, val) = (format!("a{i}"), format!("v{i}"));
                    match c
                        .put(
                            &format!("/v1/sessions/{id}.node{}/attributes/{attr}", w + 1),
                            val.clone(),
                        )
                        .await
                    {
                        Ok(r) if r.status == 204 => {
                            acked.push((id, attr, val));
                            acked_so_far.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                i += 1;
            }
            acked
        }));
    }
    // Kill once the writers have a good number of acknowledged writes, however
    // slow the machine is.
    let enough = acked_so_far.clone();
    assert!(
        wait_for(Duration::from_secs(30), || {
            let enough = enough.clone();
            async move { enough.load(Ordering::Relaxed) >= 300 }
        })
        .await,
        "the writers did not get 300 writes acknowledged in 30 s"
    );
    let t = Instant::now();
    cl.kill(2);
    let mut c0 = cl.client(0);
    assert!(
        wait_state(&mut c0, "node3", "dead", Duration::from_secs(3)).await,
        "node3 not declared dead"
    );
    let detect = t.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for w in writers {
        all.extend(w.await.expect("writer"));
    }
    assert!(
        all.len() > 200,
        "too few acknowledged writes to mean anything: {}",
        all.len()
    );
    for survivor in [0usize, 1] {
        let mut c = cl.client(survivor);
        let mut by_session: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        for (id, attr, val) in &all {
            if !by_session.contains_key(id) {
                let r = c
                    .get(&format!("/v1/sessions/{id}?touch=false"))
                    .await
                    .expect("get");
                assert_eq!(r.status, 200, "node{}: session {id} missing", survivor + 1);
                by_session.insert(id.clone(), r.json());
            }
            let got = by_session[id]["attributes"][attr].as_str().unwrap_or("");
            use base64::Engine;
            let got = base64::engine::general_purpose::STANDARD
                .decode(got)
                .unwrap_or_default();
            assert_eq!(
                got,
                val.as_bytes(),
                "node{}: acknowledged write {id}/{attr} lost",
                survivor + 1
            );
        }
    }
    assert!(detect < Duration::from_secs(1), "detection took {detect:?}");
    // Logs never carry session ids.
    for i in 0..3 {
        let log = cl.log_text(i);
        assert!(
            !log.contains("W0S1") && !log.contains("W1S2"),
            "a session id leaked into node{} logs",
            i + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_member_holds_every_session_before_it_is_ready() {
    let mut cl = started(3, &["--transfer-chunk-bytes", "65536"]).await;
    let mut c = cl.client(0);
    let payload = "x".repeat(1024);
    let body = format!(r#"{{"attributes":{{"p":"{}"}}}}"#, base64_of(&payload));
    for _ in 0..1500 {
        let r = c.post("/v1/sessions", body.clone()).await.expect("create");
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let before = count(&mut c).await;
    assert_eq!(before, 1500);
    // Keep writing while the new member joins.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut c = cl.client(1);
        let stop = stop.clone();
        let body = body.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 100_000 {
                if c.post("/v1/sessions", body.clone())
                    .await
                    .is_ok_and(|r| r.status == 201)
                {
                    n += 1;
                }
            }
            n
        })
    };
    let i = cl.add_node(true).expect("add");
    cl.write_members().expect("members");
    cl.start(i).expect("start node4");
    let mut c4 = cl.client(i);
    let t = Instant::now();
    let mut first_ready_count = None;
    while t.elapsed() < Duration::from_secs(20) {
        let r = c4.get("/readyz").await.expect("readyz");
        if r.status == 200 {
            first_ready_count = Some(count(&mut c4).await);
            break;
        }
        // Not ready yet: the local API refuses to serve partial state.
        let s = c4.get("/v1/sessions/anything").await.expect("get");
        if r.status != 200 {
            assert!(
                s.status == 503 || s.status == 404,
                "unexpected {}",
                s.status
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let at_ready = first_ready_count.expect("node4 never became ready");
    assert!(
        at_ready >= before,
        "node4 was ready with {at_ready} of {before} sessions"
    );
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.expect("writer");
    let want = before + written;
    let t = Instant::now();
    let mut have = 0;
    while t.elapsed() < Duration::from_secs(15) {
        have = count(&mut c4).await;
        if have == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(have, want, "node4 converged to {have} of {want}");
    let m = c4.get("/metrics").await.expect("metrics").text();
    assert!(m.contains("sessionmesh_ready 1"), "{m}");
    assert!(
        !m.contains("sessionmesh_transfer_sessions_received 0\n"),
        "transfer metric not updated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_seen_as_a_leave_at_once() {
    let mut cl = started(3, &[]).await;
    let mut c = cl.client(2);
    let r = c
        .post("/v1/sessions", r#"{"id":"LEAVER"}"#)
        .await
        .expect("create");
    assert_eq!(r.status, 201);
    let r = c
        .put("/v1/sessions/LEAVER/attributes/last", "words")
        .await
        .expect("put");
    assert_eq!(r.status, 204);
    let code = cl.terminate(2, Duration::from_secs(8));
    assert_eq!(
        code,
        Some(0),
        "node3 did not exit cleanly:\n{}",
        cl.log_tail(2, 20)
    );
    let mut c0 = cl.client(0);
    assert_eq!(
        member_state(&mut c0, "node3").await.as_deref(),
        Some("left"),
        "leave was not seen at once"
    );
    let r = c0
        .get("/v1/sessions/LEAVER/attributes/last")
        .await
        .expect("get");
    assert_eq!(r.text(), "words");
    let m = c0.get("/metrics").await.expect("metrics").text();
    assert!(
        m.contains("sessionmesh_detections_total 0"),
        "a leave counted as a failure"
    );
    assert!(cl.log_text(2).contains("left the cluster"));
}

/// A member removed from the file and added back (or a file caught halfway
/// through a rewrite) must not restart a delta stream that its receiver still
/// counts: every sync write afterwards is acknowledged and lands everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_removed_and_added_back_gets_every_sync_write() {
    let mut cl = started(3, &["--send", "sync", "--reload-interval-ms", "50"]).await;
    let mut c0 = cl.client(0);
    let mut c1 = cl.client(1);
    assert_eq!(
        c0.post("/v1/sessions", r#"{"id":"READD"}"#)
            .await
            .expect("create")
            .status,
        201
    );
    for i in 0..100 {
        let r = c0
            .put("/v1/sessions/READD/attributes/a", format!("before{i}"))
            .await
            .expect("put");
        assert_eq!(r.status, 204, "{}", r.text());
    }
    // node2 leaves the file (it keeps counting node1's stream), then comes back.
    let full = cl.members_yaml();
    cl.listed[1] = false;
    cl.write_members().expect("write");
    assert!(
        wait_for(Duration::from_secs(5), || {
            let mut c = cl.client(0);
            async move { member_state(&mut c, "node2").await.is_none() }
        })
        .await,
        "node1 kept node2"
    );
    cl.write_members_text(&full).expect("write");
    cl.listed[1] = true;
    assert!(
        wait_state(&mut c0, "node2", "alive", Duration::from_secs(5)).await,
        "node2 did not come back"
    );
    let mut failed = Vec::new();
    for i in 0..50 {
        let v = format!("after{i}");
        let r = c0
            .put("/v1/sessions/READD/attributes/a", v.clone())
            .await
            .expect("put");
        if r.status != 204 {
            failed.push((i, r.status));
            continue;
        }
        let seen = wait_for(Duration::from_secs(2), || {
            let mut c = cl.client(1);
            let v = v.clone();
            async move {
                c.get("/v1/sessions/READD/attributes/a?touch=false")
                    .await
                    .is_ok_and(|r| r.text() == v)
            }
        })
        .await;
        assert!(
            seen,
            "node2 lacks acknowledged write {v}: {:?}",
            c1.get("/v1/sessions/READD/attributes/a?touch=false")
                .await
                .map(|r| r.text())
        );
    }
    assert!(
        failed.is_empty(),
        "sync writes failed after the re-add: {failed:?}"
    );
}

/// A member whose core task is stuck (the hung JVM with an open socket that
/// Tomcat's membership keeps alive) is declared dead by its peers, sync writes
/// elsewhere go on, and its own liveness probe fails.
async fn stuck_core(threads: &str) {
    let mut cl = LocalCluster::new(&bin(), 3, &["--send", "sync"]).expect("cluster");
    cl.start(0).expect("start");
    cl.start(1).expect("start");
    cl.start_with(2, &["--worker-threads", threads, "--test-hooks"])
        .expect("start");
    for i in 0..3 {
        assert!(
            cl.wait_ready(i, Duration::from_secs(15)).await,
            "node{} not ready",
            i + 1
        );
    }
    let mut c0 = cl.client(0);
    assert_eq!(
        c0.post("/v1/sessions", r#"{"id":"STUCK"}"#)
            .await
            .expect("create")
            .status,
        201
    );
    let r = cl
        .client(2)
        .post("/v1/test/freeze-core?ms=5000", "")
        .await
        .expect("freeze");
    assert_eq!(r.status, 202);
    let t0 = Instant::now();
    assert!(
        wait_state(&mut c0, "node3", "dead", Duration::from_secs(3)).await,
        "node3's stuck core was not declared dead"
    );
    let detected = t0.elapsed();
    let r = c0
        .put("/v1/sessions/STUCK/attributes/a", "1")
        .await
        .expect("put");
    assert_eq!(
        r.status,
        204,
        "sync write while node3 is stuck: {}",
        r.text()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "detection and a sync write took {:?}",
        t0.elapsed()
    );
    // The kubelet's liveness probe fails while the core is stuck.
    let h = cl.nodes[2].http.expect("http");
    let failed = wait_for(Duration::from_millis(4500).saturating_sub(t0.elapsed()), || async move {
        let mut c = Client::new(h);
        !matches!(tokio::time::timeout(Duration::from_millis(300), c.get("/healthz")).await, Ok(Ok(r)) if r.status == 200)
    })
    .await;
    assert!(failed, "node3's /healthz stayed 200 with its core stuck");
    // The other tasks still answer, and the probe says why.
    let r = Client::new(h)
        .get("/healthz")
        .await
        .map(|r| (r.status, r.text()));
    assert!(
        matches!(&r, Ok((503, t)) if t.contains("core stalled")),
        "{r:?}"
    );
    eprintln!("stuck core ({threads} thread(s)): declared dead after {detected:?}");
    // Once the core moves again, the member comes back.
    assert!(
        wait_state(&mut c0, "node3", "alive", Duration::from_secs(10)).await,
        "node3 did not come back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_core_is_declared_dead_and_fails_healthz() {
    stuck_core("1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_core_with_more_threads_is_declared_dead() {
    stuck_core("2").await;
}

/// A member restarted while every peer is hung (SIGSTOP: the kernel still
/// accepts connections) does not turn ready with an empty store: it waits,
/// takes the sessions once the peers resume, and only after
/// --silent-peer-wait-ms serves empty, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_while_its_peers_hang_does_not_serve_empty() {
    use sessionmesh_sidecar::demo::localcluster::signal;
    let mut cl = started(3, &["--send", "sync", "--anti-entropy-interval-ms", "300"]).await;
    let mut c0 = cl.client(0);
    for i in 0..20 {
        assert_eq!(
            c0.post("/v1/sessions", format!(r#"{{"id":"H{i}"}}"#))
                .await
                .expect("create")
                .status,
            201
        );
    }
    let peers: Vec<u32> = (0..2).filter_map(|i| cl.pid(i)).collect();
    cl.kill(2);
    for &p in &peers {
        signal(p, libc::SIGSTOP);
    }
    cl.start_with(2, &["--silent-peer-wait-ms", "60000"])
        .expect("restart");
    let went_ready = cl.wait_ready(2, Duration::from_millis(2500)).await;
    for &p in &peers {
        signal(p, libc::SIGCONT);
    }
    assert!(
        !went_ready,
        "node3 turned ready while its peers were hung:\n{}",
        cl.log_tail(2, 10)
    );
    assert!(
        cl.wait_ready(2, Duration::from_secs(15)).await,
        "node3 never turned ready after its peers resumed"
    );
    assert_eq!(
        count(&mut cl.client(2)).await,
        20,
        "node3 turned ready without the sessions"
    );

    // Past the bound it serves, empty, and says so; anti-entropy repairs later.
    cl.kill(2);
    for &p in &peers {
        signal(p, libc::SIGSTOP);
    }
    cl.start_with(2, &["--silent-peer-wait-ms", "1500"])
        .expect("restart");
    let ready = cl.wait_ready(2, Duration::from_secs(10)).await;
    let log = cl.log_text(2);
    let metrics = cl
        .client(2)
        .get("/metrics")
        .await
        .map(|r| r.text())
        .unwrap_or_default();
    for &p in &peers {
        signal(p, libc::SIGCONT);
    }
    assert!(ready, "node3 never served after the bound");
    assert!(log.contains("starting with an EMPTY store"), "{log}");
    assert!(
        metrics.contains("sessionmesh_started_empty_with_silent_peers 1\n"),
        "{metrics}"
    );
    let repaired = wait_for(Duration::from_secs(15), || {
        let mut c = cl.client(2);
        async move { count(&mut c).await == 20 }
    })
    .await;
    assert!(repaired, "anti-entropy did not bring the sessions back");
}
