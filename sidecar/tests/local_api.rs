//! The local HTTP API as the app and a hostile neighbour see it: documented
//! answers, bad input, connection limits, browser forgery and secrets.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

mod common;

use common::*;
use sessionmesh_sidecar::demo::localcluster::{cpu_seconds, wait_for, LocalCluster};
use std::time::{Duration, Instant};

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

/// The status of a streamed answer, once its first line (`ready ...`) is in.
fn stream_head(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(6).any(|w| w == b"ready ") {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got[9..12]).into_owned()
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
                ("post", "/v1/batch") => {
                    format!(r#"{{"writes":[{{"id":"{id}","set":{{"b":"eQ=="}}}}]}}"#)
                }
                ("patch", _) => r#"{"set":{"b":"eQ=="},"remove":["a"]}"#.to_owned(),
                ("post", p) if p.ends_with("/rename") => format!(r#"{{"newId":"{id}renamed"}}"#),
                ("put", _) => "value".to_owned(),
                _ => String::new(),
            };
            let documented = op["responses"].as_mapping().expect("responses");
            if path == "/v1/changes" {
                // A stream that never ends: its status line and first line.
                let status = stream_head(http(&cl, 0), path);
                assert!(documented.keys().any(|s| s.as_str() == Some(&status)));
                assert_eq!(status, "200");
                checked += 1;
                continue;
            }
            let m = hyper::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let r = c.request(m, &url, body).await.expect("request");
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
        "POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\n{\"id\":\"EVIL\"}".to_string(),
        "POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 13\r\n\r\n{\"id\":\"EVIL\"}".to_string(),
        "POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 13\r\n\r\n{\"id\":\"EVIL\"}".to_string(),
        format!("DELETE /v1/sessions/VICTIM HTTP/1.1\r\nHost: attacker.example:{}\r\nContent-Length: 0\r\n\r\n", a.port()),
        format!("PATCH /v1/sessions/VICTIM HTTP/1.1\r\nHost: localhost\r\nOrigin: http://attacker.example\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()),
        "GET /v1/sessions HTTP/1.1\r\nHost: rebound.attacker.example\r\n\r\n".to_string(),
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

/// `ETag` and `If-None-Match`: a copy at the current version is answered
/// `304` with no body; a touch keeps the version; a write, here or on a peer,
/// changes it. A `PATCH` names the version it was applied to and the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_checks_its_copy_with_etags() {
    let cl = started(2, &["--send", "sync"]).await;
    let (mut a, mut b) = (cl.client(0), cl.client(1));
    let r = a
        .post("/v1/sessions", r#"{"id":"E1"}"#)
        .await
        .expect("post");
    assert_eq!(r.status, 201);
    let created = r.headers["etag"].to_str().expect("etag").to_owned();
    let r = get(&mut a, created.clone()).await;
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(r.headers["etag"], created.as_str());
    assert_eq!(get(&mut a, "\"0\"".into()).await.status, 200);
    // A touch keeps the version.
    assert_eq!(
        a.post("/v1/sessions/E1/touch", "")
            .await
            .expect("touch")
            .status,
        204
    );
    assert_eq!(get(&mut a, created.clone()).await.status, 304);
    // A PATCH: applied to the created version, answered with the new one.
    let r = a
        .request(
            hyper::Method::PATCH,
            "/v1/sessions/E1",
            r#"{"set":{"u":"YQ=="}}"#,
        )
        .await
        .expect("patch");
    assert_eq!(r.status, 204);
    assert_eq!(r.headers["sessionmesh-prior-etag"], created.as_str());
    let patched = r.headers["etag"].to_str().expect("etag").to_owned();
    assert_ne!(patched, created);
    assert_eq!(get(&mut a, created.clone()).await.status, 200, "stale copy");
    assert_eq!(get(&mut a, patched.clone()).await.status, 304);
    // The peer holds the same version; its own write changes it for both.
    assert_eq!(get(&mut b, patched.clone()).await.status, 304);
    let r = b
        .request(
            hyper::Method::PATCH,
            "/v1/sessions/E1",
            r#"{"remove":["u"]}"#,
        )
        .await
        .expect("patch");
    assert_eq!(r.headers["sessionmesh-prior-etag"], patched.as_str());
    let r = get(&mut a, patched).await;
    assert_eq!(r.status, 200, "a peer's write is seen as a new version");
    assert_eq!(r.json()["attributes"], serde_json::json!({}));
}

async fn get(
    c: &mut sessionmesh_sidecar::demo::client::Client,
    tag: String,
) -> sessionmesh_sidecar::demo::client::Reply {
    c.request_with(
        hyper::Method::GET,
        "/v1/sessions/E1?touch=false",
        &[("if-none-match", tag)],
        "",
    )
    .await
    .expect("get")
}
