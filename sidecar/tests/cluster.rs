//! Real sidecar processes on loopback: replication, SIGKILL, join, leave, and
//! bad input. Every wait has a deadline.

use sessionmesh_sidecar::demo::client::Client;
use sessionmesh_sidecar::demo::localcluster::{cpu_seconds, wait_for, LocalCluster};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn bin() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_sessionmesh-sidecar").into()
}

async fn started(n: usize, args: &[&str]) -> LocalCluster {
    let mut cl = LocalCluster::new(&bin(), n, args).expect("cluster");
    for i in 0..n {
        cl.start(i).expect("start");
    }
    for i in 0..n {
        assert!(
            cl.wait_ready(i, Duration::from_secs(15)).await,
            "node{} not ready:\n{}",
            i + 1,
            cl.log_tail(i, 30)
        );
    }
    cl
}

async fn member_state(c: &mut Client, name: &str) -> Option<String> {
    let v = c.get("/v1/cluster").await.ok()?.json();
    v["members"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name)
        .and_then(|m| m["state"].as_str().map(str::to_owned))
}

async fn wait_state(c: &mut Client, name: &str, want: &str, within: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < within {
        if member_state(c, name).await.as_deref() == Some(want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

async fn count(c: &mut Client) -> u64 {
    c.get("/v1/sessions?limit=1")
        .await
        .map(|r| r.json()["count"].as_u64().unwrap_or(0))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_sigkill_loses_no_acknowledged_write() {
    let mut cl = started(3, &["--send", "sync"]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3usize {
        let mut c = cl.client(w);
        let stop = stop.clone();
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
                        Ok(r) if r.status == 204 => acked.push((id, attr, val)),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                i += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
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

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

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
async fn http_bad_input_gets_clear_errors() {
    let cl = started(
        1,
        &["--max-attr-bytes", "1024", "--max-session-bytes", "3500"],
    )
    .await;
    let mut c = cl.client(0);
    let r = c.post("/v1/sessions", "{not json").await.expect("post");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "malformed_json");
    let r = c
        .post("/v1/sessions", r#"{"id":"S1","colour":"red"}"#)
        .await
        .expect("post");
    assert_eq!(r.status, 400, "unknown fields are refused");
    let r = c
        .post("/v1/sessions", r#"{"id":"S1","attributes":{"a":"***"}}"#)
        .await
        .expect("post");
    assert_eq!(r.json()["error"], "bad_base64");
    assert_eq!(
        c.get("/v1/sessions/S1").await.expect("get").status,
        404,
        "a refused create left something behind"
    );
    let r = c
        .post("/v1/sessions", r#"{"id":"S1"}"#)
        .await
        .expect("post");
    assert_eq!(r.status, 201);
    let r = c
        .post("/v1/sessions", r#"{"id":"S1"}"#)
        .await
        .expect("post");
    assert_eq!(r.status, 409);
    let r = c
        .put("/v1/sessions/S1/attributes/big", vec![b'x'; 1025])
        .await
        .expect("put");
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"], "too_large");
    for i in 0..3 {
        let r = c
            .put(
                &format!("/v1/sessions/S1/attributes/a{i}"),
                vec![b'x'; 1000],
            )
            .await
            .expect("put");
        assert_eq!(r.status, 204);
    }
    let r = c
        .put("/v1/sessions/S1/attributes/a9", vec![b'x'; 1000])
        .await
        .expect("put");
    assert_eq!(r.status, 413, "session size limit");
    let r = c.get("/v1/sessions/S1/attributes/big").await.expect("get");
    assert_eq!(r.status, 404);
    let r = c.get("/v1/sessions/a%2Fb").await.expect("get");
    assert_eq!(r.status, 400);
    let r = c.get("/v1/nothing").await.expect("get");
    assert_eq!(r.status, 404);
    let r = c
        .request(hyper::Method::PUT, "/v1/cluster", "")
        .await
        .expect("put");
    assert_eq!(r.status, 405);
    let r = c.delete("/v1/sessions/S1").await.expect("delete");
    assert_eq!(r.status, 204);
    assert_eq!(c.get("/v1/sessions/S1").await.expect("get").status, 410);
    let r = c
        .put("/v1/sessions/S1/attributes/x", "1")
        .await
        .expect("put");
    assert_eq!(r.status, 410, "writes to an invalidated id are refused");
    assert_eq!(c.get("/healthz").await.expect("healthz").status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_api_round_trip_with_route_suffix_and_rename() {
    let cl = started(2, &[]).await;
    let (mut a, mut b) = (cl.client(0), cl.client(1));
    let r = a
        .post(
            "/v1/sessions?send=sync",
            r#"{"id":"ABC","maxInactiveSeconds":60,"attributes":{"user":"YWxpY2U="}}"#,
        )
        .await
        .expect("create");
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["routedId"], "ABC.node1");
    let r = b
        .get("/v1/sessions/ABC.node1/attributes/user")
        .await
        .expect("get");
    assert_eq!(r.text(), "alice");
    let r = b
        .request(
            hyper::Method::PATCH,
            "/v1/sessions/ABC.node2?send=sync",
            r#"{"set":{"cart":"Mw=="},"remove":["user"]}"#,
        )
        .await
        .expect("patch");
    assert_eq!(r.status, 204, "{}", r.text());
    let v = a.get("/v1/sessions/ABC").await.expect("get").json();
    assert_eq!(v["attributes"]["cart"], "Mw==");
    assert!(v["attributes"].get("user").is_none());
    assert_eq!(v["maxInactiveSeconds"], 60);
    let r = a
        .post("/v1/sessions/ABC/rename?send=sync", r#"{"newId":"XYZ"}"#)
        .await
        .expect("rename");
    assert_eq!(r.status, 200);
    assert_eq!(
        b.get("/v1/sessions/XYZ/attributes/cart")
            .await
            .expect("get")
            .text(),
        "3"
    );
    assert_eq!(b.get("/v1/sessions/ABC").await.expect("get").status, 410);
    let v = b.get("/v1/sessions").await.expect("list").json();
    assert_eq!(v["count"], 1);
    assert_eq!(v["ids"][0], "XYZ");
    assert_eq!(
        b.post("/v1/sessions/XYZ/touch", "")
            .await
            .expect("touch")
            .status,
        204
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_file_reload_keeps_last_good_membership_on_error() {
    let mut cl = started(2, &["--reload-interval-ms", "100"]).await;
    let mut c = cl.client(0);
    let good = cl.members_yaml();
    cl.write_members_text(&good.replace(&cl.nodes[1].replication.to_string(), "not-an-address"))
        .expect("write");
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) && !cl.log_text(0).contains("members[1].address") {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        cl.log_text(0).contains("members[1].address"),
        "{}",
        cl.log_tail(0, 10)
    );
    assert_eq!(
        member_state(&mut c, "node2").await.as_deref(),
        Some("alive")
    );
    // A valid change is picked up: a third member appears.
    let i = cl.add_node(true).expect("add");
    cl.write_members().expect("write");
    let t = Instant::now();
    let mut seen = None;
    while t.elapsed() < Duration::from_secs(5) {
        seen = member_state(&mut c, "node3").await;
        if seen.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen.is_some(), "node3 never appeared after reload");
    cl.start(i).expect("start node3");
    assert!(cl.wait_ready(i, Duration::from_secs(10)).await);
    assert!(wait_state(&mut c, "node3", "alive", Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_receiver_port_is_a_clear_startup_error() {
    let mut cl = LocalCluster::new(&bin(), 2, &[]).expect("cluster");
    let _squatter = std::net::TcpListener::bind(cl.nodes[1].replication).expect("bind");
    cl.start(0).expect("start");
    let r = cl.start(1);
    assert!(r.is_err(), "node2 started on a taken port");
    let log = cl.log_text(1);
    assert!(log.contains("cannot bind the replication port"), "{log}");
    assert!(log.contains("own receiver port"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_answers_with_a_documented_status() {
    let spec_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
    let spec: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(spec_path).expect("openapi.yaml"))
            .expect("yaml");
    let cl = started(1, &[]).await;
    let mut c = cl.client(0);
    let paths = spec["paths"].as_mapping().expect("paths");
    let mut checked = 0;
    for (k, (path, item)) in paths.iter().enumerate() {
        let path = path.as_str().expect("path");
        for method in ["get", "post", "put", "patch", "delete"] {
            let Some(op) = item.get(method) else { continue };
            let id = format!("OAPI{k}{method}");
            let r = c
                .post(
                    "/v1/sessions",
                    format!(r#"{{"id":"{id}","attributes":{{"a":"eA=="}}}}"#),
                )
                .await
                .expect("setup");
            assert_eq!(r.status, 201);
            let url = path
                .replace("{id}", &format!("{id}.node1"))
                .replace("{name}", "a");
            let body = match (method, path) {
                ("post", "/v1/sessions") => format!(r#"{{"id":"{id}new"}}"#),
                ("patch", _) => r#"{"set":{"b":"eQ=="},"remove":["a"]}"#.to_owned(),
                ("post", p) if p.ends_with("/rename") => format!(r#"{{"newId":"{id}renamed"}}"#),
                ("put", _) => "value".to_owned(),
                _ => String::new(),
            };
            let m = hyper::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let r = c.request(m, &url, body).await.expect("request");
            let documented = op["responses"].as_mapping().expect("responses");
            assert!(
                documented
                    .keys()
                    .any(|s| s.as_str() == Some(&r.status.to_string())),
                "{method} {path} answered {} ({}), which openapi.yaml does not document",
                r.status,
                r.text()
            );
            assert!(
                r.status < 300,
                "{method} {path} failed: {} {}",
                r.status,
                r.text()
            );
            checked += 1;
        }
    }
    assert!(checked >= 14, "only {checked} operations in openapi.yaml");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_member_file_is_refused_by_name_and_the_last_good_one_kept() {
    let cl = started(2, &["--reload-interval-ms", "50"]).await;
    let mut c = cl.client(0);
    let mut text = cl.members_yaml();
    text.push_str(&format!("# {}\n", "SECRETCONTENT".repeat(200_000)));
    cl.write_members_text(&text).expect("write");
    assert!(
        wait_for(Duration::from_secs(5), || {
            let cl = &cl;
            async move { cl.log_text(0).contains("a member file may have at most") }
        })
        .await,
        "{}",
        cl.log_tail(0, 5)
    );
    assert!(
        !cl.log_text(0).contains("SECRETCONTENT"),
        "the file's content went into the log"
    );
    assert_eq!(
        member_state(&mut c, "node2").await.as_deref(),
        Some("alive")
    );
    assert_eq!(c.get("/readyz").await.expect("readyz").status, 200);
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

/// Secrets are bytes: two binary secrets that differ only in bytes that are not
/// UTF-8 are different secrets (a lossy decoding made them equal). A secret on
/// the command line is warned about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_secrets_are_compared_as_bytes_and_argv_secrets_are_warned_about() {
    let mut cl = LocalCluster::new(&bin(), 2, &["--reload-interval-ms", "50"]).expect("cluster");
    let (a, b) = (cl.dir.join("secret-a"), cl.dir.join("secret-b"));
    let mut sa = vec![0xffu8; 20];
    let mut sb = vec![0xfeu8; 20];
    sa.push(b'x');
    sb.push(b'x');
    std::fs::write(&a, &sa).expect("write");
    std::fs::write(&b, &sb).expect("write");
    cl.start_with(0, &["--secret-file", a.to_str().unwrap_or_default()])
        .expect("start");
    cl.start_with(1, &["--secret-file", b.to_str().unwrap_or_default()])
        .expect("start");
    let refused = wait_for(Duration::from_secs(5), || {
        let cl = &cl;
        async move { cl.log_text(0).contains("refused") || cl.log_text(1).contains("refused") }
    })
    .await;
    assert!(
        refused,
        "members with different binary secrets did not refuse each other:\n{}",
        cl.log_tail(1, 10)
    );
    let mut c = cl.client(0);
    assert_ne!(
        member_state(&mut c, "node2").await.as_deref(),
        Some("alive")
    );
    // The same binary secret on both: they form a cluster.
    cl.kill(1);
    cl.start_with(1, &["--secret-file", a.to_str().unwrap_or_default()])
        .expect("start");
    assert!(
        wait_state(&mut c, "node2", "alive", Duration::from_secs(5)).await,
        "{}",
        cl.log_tail(1, 10)
    );
    // A secret on the command line works, with a warning.
    let hex = std::fs::read_to_string(&cl.secret_file).expect("secret");
    let mut solo = LocalCluster::new(&bin(), 1, &[]).expect("cluster");
    solo.start_with(0, &["--secret", hex.trim()])
        .expect("start");
    assert!(solo.wait_ready(0, Duration::from_secs(10)).await);
    assert!(
        solo.log_text(0)
            .contains("visible to every user of this host"),
        "{}",
        solo.log_tail(0, 5)
    );
    assert!(
        !solo.log_text(0).contains(hex.trim()),
        "the secret went into the log"
    );
}

/// Out of file descriptors, the local listeners back off instead of spinning,
/// and the member answers again once connections close. Idle connections are
/// closed after the idle timeout; past the connection cap, new ones at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_listeners_survive_fd_exhaustion_and_bound_connections() {
    let mut cl =
        LocalCluster::new(&bin(), 1, &["--http-idle-timeout-ms", "1500"]).expect("cluster");
    let wrapper = cl.dir.join("low-fd-limit.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nulimit -n 64\nexec '{}' \"$@\"\n",
            bin().display()
        ),
    )
    .expect("wrapper");
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&wrapper)
        .status()
        .expect("chmod");
    cl.bin = wrapper;
    cl.start(0).expect("start");
    assert!(cl.wait_ready(0, Duration::from_secs(10)).await);
    let pid = cl.pid(0).expect("pid");
    let http = cl.nodes[0].http.expect("http");
    // More idle connections than the process has descriptors.
    let mut held = Vec::new();
    for _ in 0..120 {
        if let Ok(s) = tokio::net::TcpStream::connect(http).await {
            held.push(s);
        }
    }
    let t0 = cpu_seconds(pid);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let used = cpu_seconds(pid) - t0;
    assert!(
        used < 0.3,
        "the member burnt {used:.2} s of CPU in 1 s out of descriptors (spinning accept loop)"
    );
    assert!(
        cl.log_text(0).contains("accept failed; backing off"),
        "{}",
        cl.log_tail(0, 5)
    );
    drop(held);
    // The idle timeout closes what is left in the backlog; the API answers again.
    assert!(
        cl.wait_ready(0, Duration::from_secs(10)).await,
        "the API did not recover after the connections closed"
    );
    // An idle connection is closed after the idle timeout.
    let mut idle = tokio::net::TcpStream::connect(http).await.expect("connect");
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut idle, &mut b),
    )
    .await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "an idle connection was kept open: {r:?}"
    );

    // The connection cap.
    let mut capped =
        LocalCluster::new(&bin(), 1, &["--http-max-connections", "4"]).expect("cluster");
    capped.start(0).expect("start");
    assert!(capped.wait_ready(0, Duration::from_secs(10)).await);
    let http = capped.nodes[0].http.expect("http");
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(tokio::net::TcpStream::connect(http).await.expect("connect"));
    }
    let refused = wait_for(Duration::from_secs(5), || async move {
        let Ok(mut s) = tokio::net::TcpStream::connect(http).await else {
            return false;
        };
        let mut b = [0u8; 16];
        matches!(
            tokio::time::timeout(
                Duration::from_millis(500),
                tokio::io::AsyncReadExt::read(&mut s, &mut b)
            )
            .await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    })
    .await;
    assert!(refused, "a connection past the cap was kept");
    drop(open);
    let counted = wait_for(Duration::from_secs(5), || {
        let mut c = capped.client(0);
        async move {
            c.get("/metrics").await.is_ok_and(|r| {
                !r.text()
                    .contains("sessionmesh_http_refused_connections_total 0\n")
            })
        }
    })
    .await;
    assert!(counted, "refused connections not counted");
}

/// Sends one raw HTTP/1.1 request and returns the status code.
fn raw_status(addr: std::net::SocketAddr, request: &str) -> u16 {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3))).ok();
    s.write_all(request.as_bytes()).expect("write");
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// What a web page in a browser on a developer's machine can send to
/// 127.0.0.1 is refused: a text/plain or form POST, a foreign Host (DNS
/// rebinding), any Origin. With --api-token-file, a request without the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_api_refuses_requests_a_browser_can_forge() {
    let mut cl = LocalCluster::new(&bin(), 1, &[]).expect("cluster");
    let token_file = cl.dir.join("api-token");
    std::fs::write(&token_file, "0123456789abcdef0123456789abcdef\n").expect("token");
    cl.start(0).expect("start");
    assert!(cl.wait_ready(0, Duration::from_secs(10)).await);
    let a = cl.nodes[0].http.expect("http");
    let mut c = cl.client(0);
    assert_eq!(
        c.post("/v1/sessions", r#"{"id":"VICTIM"}"#)
            .await
            .expect("create")
            .status,
        201
    );
    let body = r#"{"invalidate":true}"#;
    let forged = [
        format!("POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\n{{\"id\":\"EVIL\"}}"),
        format!("POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 13\r\n\r\n{{\"id\":\"EVIL\"}}"),
        format!("POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 13\r\n\r\n{{\"id\":\"EVIL\"}}"),
        format!("DELETE /v1/sessions/VICTIM HTTP/1.1\r\nHost: attacker.example:{}\r\nContent-Length: 0\r\n\r\n", a.port()),
        format!("PATCH /v1/sessions/VICTIM HTTP/1.1\r\nHost: localhost\r\nOrigin: http://attacker.example\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
        format!("GET /v1/sessions HTTP/1.1\r\nHost: rebound.attacker.example\r\n\r\n"),
    ];
    for req in &forged {
        let st = raw_status(a, req);
        assert!(
            matches!(st, 403 | 415),
            "forgeable request answered {st}: {}",
            req.lines().take(3).collect::<Vec<_>>().join(" | ")
        );
    }
    assert_eq!(
        c.get("/v1/sessions/VICTIM").await.expect("get").status,
        200,
        "the session was touched by a forged request"
    );
    assert_eq!(c.get("/v1/sessions/EVIL").await.expect("get").status, 404);
    // The real clients' requests still pass.
    assert_eq!(
        raw_status(
            a,
            &format!(
                "GET /v1/sessions/VICTIM HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n",
                a.port()
            )
        ),
        200
    );
    assert_eq!(
        raw_status(a, "GET /v1/sessions/VICTIM HTTP/1.1\r\nHost: [::1]\r\n\r\n"),
        200
    );

    // With a token.
    let mut t = LocalCluster::new(&bin(), 1, &[]).expect("cluster");
    t.start_with(
        0,
        &["--api-token-file", token_file.to_str().unwrap_or_default()],
    )
    .expect("start");
    assert!(
        t.wait_ready(0, Duration::from_secs(10)).await,
        "probes need no token"
    );
    let a = t.nodes[0].http.expect("http");
    assert_eq!(
        raw_status(a, "GET /v1/sessions HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        401
    );
    assert_eq!(
        raw_status(
            a,
            "GET /v1/sessions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer wrong\r\n\r\n"
        ),
        401
    );
    assert_eq!(raw_status(a, "GET /v1/sessions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer 0123456789abcdef0123456789abcdef\r\n\r\n"), 200);
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
