//! The Redis-protocol endpoint with real clients: redis-cli, redis-benchmark,
//! redis-py, and framework session stores (Flask-Session, Django's RedisCache,
//! express-session + connect-redis) behind real HAProxy, surviving SIGKILL.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

use sessionmesh_sidecar::demo::localcluster::{
    require, require_node_modules, require_python, rss_bytes, signal, wait_for, LocalCluster,
};
use sessionmesh_sidecar::demo::stack::{AppSpec, LbChoice, Stack, User};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn bin() -> PathBuf {
    env!("CARGO_BIN_EXE_sessionmesh-sidecar").into()
}

fn e2e(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../e2e")
        .join(path)
}

async fn cluster(n: usize, args: &[&str]) -> LocalCluster {
    let mut all = vec!["--redis", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut cl = LocalCluster::new(&bin(), n, &all).expect("cluster");
    for i in 0..n {
        cl.start(i).expect("start");
    }
    for i in 0..n {
        assert!(
            cl.wait_ready(i, Duration::from_secs(15)).await,
            "node{} not ready",
            i + 1
        );
    }
    cl
}

fn port(cl: &LocalCluster, i: usize) -> String {
    cl.nodes[i]
        .redis
        .expect("redis endpoint")
        .port()
        .to_string()
}

fn cli(port: &str, args: &[&str]) -> String {
    let out = Command::new(require("redis-cli"))
        .args(["-p", port])
        .args(args)
        .output()
        .expect("redis-cli (apt-get install redis-tools)");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_resp2_and_resp3() {
    let cl = cluster(2, &["--send", "sync"]).await;
    let (p1, p2) = (port(&cl, 0), port(&cl, 1));
    assert_eq!(cli(&p1, &["PING"]), "PONG");
    assert_eq!(cli(&p1, &["SET", "k", "v", "EX", "100"]), "OK");
    assert_eq!(
        cli(&p2, &["GET", "k"]),
        "v",
        "a write on one member is readable on another"
    );
    assert_eq!(cli(&p2, &["TTL", "k"]), "100");
    assert_eq!(cli(&p1, &["-3", "HSET", "h", "a", "1"]), "1");
    assert_eq!(
        cli(&p2, &["-3", "--no-raw", "HGETALL", "h"]),
        "1# \"a\" => \"1\""
    );
    assert_eq!(cli(&p2, &["HGETALL", "h"]), "a\n1");
    assert_eq!(
        cli(&p1, &["-3", "--no-raw", "HELLO", "3"]).lines().next(),
        Some("1# \"server\" => \"redis\"")
    );
    assert_eq!(
        cli(&p1, &["FOO", "bar"]),
        "ERR unknown command 'FOO', with args beginning with: 'bar'"
    );
    assert_eq!(
        cli(&p1, &["GET", "h"]),
        "WRONGTYPE Operation against a key holding the wrong kind of value"
    );
    assert_eq!(cli(&p1, &["SELECT", "16"]), "ERR DB index is out of range");
    assert_eq!(cli(&p1, &["DBSIZE"]), "2");
    assert_eq!(
        cli(&p1, &["FLUSHALL"]).split(':').next(),
        Some("ERR FLUSHDB is disabled")
    );
    assert!(cli(&p1, &["INFO"]).contains("loading:0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_limits_and_bad_input() {
    let cl = cluster(
        1,
        &[
            "--redis-password",
            "s3cret-password",
            "--redis-max-clients",
            "3",
            "--max-attr-bytes",
            "1024",
        ],
    )
    .await;
    let p = port(&cl, 0);
    assert_eq!(cli(&p, &["GET", "k"]), "NOAUTH Authentication required.");
    assert_eq!(
        cli(&p, &["AUTH", "nope"]),
        "WRONGPASS invalid username-password pair or user is disabled."
    );
    assert_eq!(
        cli(
            &p,
            &[
                "-a",
                "s3cret-password",
                "--no-auth-warning",
                "SET",
                "k",
                "v"
            ]
        ),
        "OK"
    );
    let big = "x".repeat(2048);
    let r = cli(
        &p,
        &[
            "-a",
            "s3cret-password",
            "--no-auth-warning",
            "SET",
            "k",
            &big,
        ],
    );
    assert!(
        r.starts_with("ERR Protocol error: invalid bulk length") || r.contains("exceeds the limit"),
        "{r}"
    );
    // Garbage on the port: an error, the connection closes, the member is fine.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(cl.nodes[0].redis.expect("redis")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3))).ok();
    s.write_all(b"*1\r\n$999999999999\r\n").expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("-ERR Protocol error"), "{out}");
    // The client limit: three connections are held open, the fourth is refused.
    let mut http = cl.client(0);
    let clients = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("sessionmesh_redis_clients "))
            .and_then(|l| l.split(' ').nth(1)?.parse::<f64>().ok())
    };
    let t = Instant::now();
    while clients(&http.get("/metrics").await.expect("metrics").text()) != Some(0.0) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "earlier connections never closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let held: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(cl.nodes[0].redis.expect("redis")).expect("connect"))
        .collect();
    while clients(&http.get("/metrics").await.expect("metrics").text()) != Some(3.0) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the three connections were not accepted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut s = std::net::TcpStream::connect(cl.nodes[0].redis.expect("redis")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(3))).ok();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert_eq!(out, "-ERR max number of clients reached\r\n");
    drop(held);
    let t = Instant::now();
    loop {
        let r = cli(
            &p,
            &["-a", "s3cret-password", "--no-auth-warning", "GET", "k"],
        );
        if r == "v" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "endpoint unusable after the limit: {r}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_runs_clean_against_a_replicating_member() {
    let cl = cluster(3, &[]).await;
    let p = port(&cl, 0);
    let out = Command::new(require("redis-benchmark"))
        .args([
            "-p",
            &p,
            "-q",
            "-t",
            "set,get,hset",
            "-n",
            "5000",
            "-d",
            "1024",
            "-c",
            "20",
            "-P",
            "8",
        ])
        .output()
        .expect("redis-benchmark (apt-get install redis-tools)");
    let text = String::from_utf8_lossy(&out.stdout);
    for t in ["SET", "GET", "HSET"] {
        assert!(
            text.contains(&format!("{t}: ")),
            "no {t} result in:\n{text}"
        );
    }
    assert!(out.status.success());
    // redis-benchmark writes key:__rand_int__; it must be on the peers too.
    let t = Instant::now();
    loop {
        if cli(&port(&cl, 2), &["EXISTS", "key:__rand_int__"]) == "1" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "benchmark keys did not replicate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_resp3_client_across_members() {
    require_python(&["redis"]);
    let cl = cluster(3, &["--send", "sync"]).await;
    let out = Command::new("python3")
        .arg(e2e("python/redis_py_check.py"))
        .args([port(&cl, 0), port(&cl, 1), port(&cl, 2)])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "redis-py check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_is_not_resurrected_by_a_late_replica() {
    let cl = cluster(3, &["--anti-entropy-interval-ms", "200"]).await;
    let (p1, p3) = (port(&cl, 0), port(&cl, 2));
    assert_eq!(cli(&p1, &["SET", "short", "v", "PX", "1500"]), "OK");
    let t = Instant::now();
    while cli(&p3, &["GET", "short"]) != "v" {
        assert!(t.elapsed() < Duration::from_secs(3));
    }
    // node3 stops (a stalled replica still holding the key), the key expires, node3 resumes.
    let pid = cl.pid(2).expect("pid");
    signal(pid, libc::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    signal(pid, libc::SIGCONT);
    // Several anti-entropy rounds later, the key is gone everywhere.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..3 {
        assert_eq!(
            cli(&port(&cl, i), &["EXISTS", "short"]),
            "0",
            "node{} has the expired key",
            i + 1
        );
    }
}

async fn framework_survives_sigkill(app: AppSpec, what: &str) {
    require("haproxy");
    let mut st = Stack::start_apps(
        &bin(),
        3,
        &["--redis", "127.0.0.1:0", "--send", "sync"],
        LbChoice::Haproxy,
        "sync",
        app,
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    let mut u = User::new(st.lb_addr);
    let r = u.get("/login?user=alice").await.expect("login");
    assert_eq!(
        r.status,
        200,
        "{what}: login: {} (load balancer: {})",
        r.text(),
        st.lb_report()
    );
    let r = u.get("/whoami").await.expect("whoami");
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    assert_eq!(r.json()["user"], "alice");
    let holder = r.json()["node"].as_str().unwrap_or_default().to_owned();
    let i = st.index_of(&holder).expect("holder");
    st.kill_node(i);
    let t = Instant::now();
    let r = loop {
        match u.get("/whoami").await {
            Ok(r) if r.status == 200 || r.status == 401 => break r,
            _ => assert!(
                t.elapsed() < Duration::from_secs(10),
                "{what}: no answer after the kill"
            ),
        }
    };
    assert_eq!(
        r.status,
        200,
        "{what}: logged out after SIGKILL of {holder}: {}",
        r.text()
    );
    assert_eq!(r.json()["user"], "alice");
    assert_ne!(r.json()["node"], holder.as_str());
    let r = u.get("/whoami").await.expect("again");
    assert_eq!(r.json()["user"], "alice", "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flask_session_survives_sigkill() {
    require_python(&["redis", "flask", "flask_session"]);
    framework_survives_sigkill(
        AppSpec::External {
            program: "python3".into(),
            args: vec![e2e("python/flask_app.py").display().to_string()],
        },
        "Flask-Session",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_cache_sessions_survive_sigkill() {
    require_python(&["redis", "django"]);
    framework_survives_sigkill(
        AppSpec::External {
            program: "python3".into(),
            args: vec![e2e("python/django_app.py").display().to_string()],
        },
        "Django",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn express_session_survives_sigkill() {
    require_node_modules(&e2e("node"));
    framework_survives_sigkill(
        AppSpec::External {
            program: "node".into(),
            args: vec![e2e("node/app.js").display().to_string()],
        },
        "express-session",
    )
    .await;
}

/// `SCAN ... MATCH` with a pattern that is exponential for a backtracking
/// matcher (Redis's CVE-2022-36021) answers at once; the member is not stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pathological_scan_pattern_does_not_stall_the_member() {
    let cl = cluster(2, &[]).await;
    let p = port(&cl, 0);
    let key = "a".repeat(512);
    assert_eq!(cli(&p, &["SET", &key, "v"]), "OK");
    let pattern = format!("{}b", "*a".repeat(40));
    let t = Instant::now();
    let out = cli(&p, &["SCAN", "0", "MATCH", &pattern, "COUNT", "1000"]);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "SCAN MATCH took {:?}",
        t.elapsed()
    );
    assert_eq!(out.lines().next(), Some("0"), "{out}");
    assert_eq!(
        cli(
            &p,
            &["SCAN", "0", "MATCH", &format!("{}a", "*a".repeat(40))]
        )
        .lines()
        .nth(1),
        Some(key.as_str())
    );
    let mut c = cl.client(1);
    let v = c.get("/v1/cluster").await.expect("cluster").json();
    assert_eq!(v["members"][0]["state"], "alive", "{v}");
}

/// Wrong passwords are counted and, past a few on one connection, slowed down;
/// the right one still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_auth_is_counted_and_slowed_down() {
    let cl = cluster(1, &["--redis-password", "s3cret-pass"]).await;
    let p = port(&cl, 0);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.parse::<u16>().expect("port")))
        .await
        .expect("connect");
    let t = Instant::now();
    let mut req = Vec::new();
    for _ in 0..10 {
        req.extend_from_slice(b"*2\r\n$4\r\nAUTH\r\n$5\r\nwrong\r\n");
    }
    req.extend_from_slice(b"*2\r\n$4\r\nAUTH\r\n$11\r\ns3cret-pass\r\n*1\r\n$4\r\nPING\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut s, &req)
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("+PONG") {
        let n = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read(&mut s, &mut buf),
        )
        .await
        .expect("reply in time")
        .expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.matches("WRONGPASS").count(), 10, "{text}");
    assert!(text.contains("+OK\r\n+PONG"), "{text}");
    assert!(
        t.elapsed() >= Duration::from_millis(7 * 200),
        "10 wrong passwords took only {:?}",
        t.elapsed()
    );
    let m = cl.client(0).get("/metrics").await.expect("metrics").text();
    assert!(
        m.contains("sessionmesh_redis_auth_failures_total 10\n"),
        "{m}"
    );
    assert!(
        !cl.log_text(0).contains("wrong"),
        "a guessed password went into the log"
    );
}

/// Replies are streamed with backpressure: a client that pipelines 400 MiB of
/// replies and reads none of them does not make the member hold them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_cannot_make_the_member_hold_its_replies() {
    let cl = cluster(1, &[]).await;
    let p = port(&cl, 0);
    let pid = cl.pid(0).expect("pid");
    let mut w = tokio::net::TcpStream::connect(("127.0.0.1", p.parse::<u16>().expect("port")))
        .await
        .expect("connect");
    let value = vec![b'v'; 512 * 1024];
    let mut set = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${}\r\n", value.len()).into_bytes();
    set.extend_from_slice(&value);
    set.extend_from_slice(b"\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut w, &set)
        .await
        .expect("set");
    let mut ok = [0u8; 5];
    tokio::io::AsyncReadExt::read_exact(&mut w, &mut ok)
        .await
        .expect("+OK");
    let base = rss_bytes(pid) >> 20;
    // 800 GETs of 512 KiB in one small pipeline: 400 MiB of replies, never read.
    let gets = b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n".repeat(800);
    tokio::io::AsyncWriteExt::write_all(&mut w, &gets)
        .await
        .expect("gets");
    let grew = wait_for(Duration::from_secs(2), || async move {
        (rss_bytes(pid) >> 20) > base + 64
    })
    .await;
    assert!(
        !grew,
        "RSS grew from {base} MiB to {} MiB for replies nobody read",
        (rss_bytes(pid) >> 20)
    );
    // Too many keys in one MGET: a clear error, not a huge reply.
    let keys: Vec<String> = (0..10_001).map(|i| format!("k{i}")).collect();
    let mut args = vec!["MGET"];
    args.extend(keys.iter().map(String::as_str));
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", p.parse::<u16>().expect("port")))
        .await
        .expect("connect");
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in &args {
        req.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    tokio::io::AsyncWriteExt::write_all(&mut c, &req)
        .await
        .expect("mget");
    let mut buf = [0u8; 256];
    let n = tokio::io::AsyncReadExt::read(&mut c, &mut buf)
        .await
        .expect("read");
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("-ERR too many keys for 'mget'"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    drop(w);
}

/// SIGTERM while a client keeps sending: like Redis on shutdown, the member
/// answers what it ran and closes the connection; no command gets an error
/// reply (which a client would take as the answer instead of retrying
/// elsewhere), whether it arrives while the member leaves the cluster or
/// after its core stopped. The peer's core is frozen so that node1's leave
/// waits for it (up to --leave-timeout-ms): the client's writes meet a
/// leaving member for a good while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_redis_connections_instead_of_answering_errors() {
    let mut cl = cluster(
        2,
        &[
            "--leave-timeout-ms",
            "1000",
            "--redis-send",
            "async",
            "--test-hooks",
            "--worker-threads",
            "2",
        ],
    )
    .await;
    let p = port(&cl, 0).parse::<u16>().expect("port");
    let client = std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write};
        let s = std::net::TcpStream::connect(("127.0.0.1", p)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut w = s.try_clone().expect("clone");
        let mut r = BufReader::new(s);
        let (mut ok, mut errors) = (0u64, Vec::new());
        for i in 0.. {
            let k = format!("k{}", i % 100);
            let cmd = format!("*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n$1\r\nv\r\n", k.len());
            if w.write_all(cmd.as_bytes()).is_err() {
                break;
            }
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if line.starts_with('+') => ok += 1,
                Ok(_) => errors.push(line),
            }
        }
        (ok, errors)
    });
    // Let the client run, freeze the peer, then stop node1 under the client.
    let h = cl.nodes[0].http.expect("http");
    let _ =
        sessionmesh_sidecar::demo::localcluster::wait_for(Duration::from_secs(5), || async move {
            let mut c = sessionmesh_sidecar::demo::client::Client::new(h);
            sessionmesh_sidecar::demo::localcluster::metric(&mut c, "sessionmesh_deltas_sent_total")
                .await
                > 200.0
        })
        .await;
    let r = cl
        .client(1)
        .post("/v1/test/freeze-core?ms=3000", "")
        .await
        .expect("freeze");
    assert_eq!(r.status, 202);
    let t0 = Instant::now();
    assert!(
        cl.terminate(0, Duration::from_secs(10)).is_some(),
        "node1 did not stop on SIGTERM"
    );
    let stopped_in = t0.elapsed();
    let (ok, errors) = client.join().expect("client");
    println!("{ok} writes answered OK, then the connection closed (node1 stopped in {stopped_in:?}); error replies: {}", errors.len());
    assert!(ok > 0, "the client ran");
    assert!(
        errors.is_empty(),
        "{} error replies during shutdown, e.g. {:?}",
        errors.len(),
        errors.first()
    );
}
