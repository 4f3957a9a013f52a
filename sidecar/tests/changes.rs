//! `GET /v1/changes`, the stream a near cache (the Tomcat Manager) relies
//! on: every change of a session reaches the watching app, and in `sync`
//! mode it is already in the app's socket when the write elsewhere is
//! answered, so a copy is never trusted after it went stale.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A watcher on a member's API: the raw bytes of the stream so far.
struct Watcher {
    s: TcpStream,
    got: Vec<u8>,
    /// What the member calls this watcher (`ready <id>`).
    id: u32,
}

impl Watcher {
    fn open(addr: std::net::SocketAddr) -> Watcher {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(b"GET /v1/changes HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .expect("send");
        let mut w = Watcher {
            s,
            got: Vec::new(),
            id: 0,
        };
        w.wait_for(b"ready ", Duration::from_secs(10));
        w.wait_for(b"\n", Duration::from_secs(10));
        let head = String::from_utf8_lossy(&w.got).to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{head}"
        );
        let after = &head[head.find("ready ").expect("ready") + 6..];
        w.id = after[..after.find('\n').expect("line")]
            .parse()
            .expect("watcher id");
        w
    }

    /// Takes what is in the socket now, without waiting.
    fn take_available(&mut self) {
        self.s.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 65536];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("read: {e}"),
            }
        }
        self.s.set_nonblocking(false).expect("blocking");
    }

    fn has(&self, needle: &[u8]) -> bool {
        self.got.windows(needle.len()).any(|w| w == needle)
    }

    fn wait_for(&mut self, needle: &[u8], within: Duration) {
        let deadline = Instant::now() + within;
        self.s
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let mut buf = [0u8; 65536];
        while !self.has(needle) {
            assert!(
                Instant::now() < deadline,
                "no {:?} in the stream: {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&self.got)
            );
            match self.s.read(&mut buf) {
                Ok(0) => panic!("the stream ended: {:?}", String::from_utf8_lossy(&self.got)),
                Ok(n) => self.got.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Waits (bounded) for the member to end the stream.
    fn wait_end(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        self.s
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let mut buf = [0u8; 65536];
        while Instant::now() < deadline {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => self.got.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return true,
            }
        }
        false
    }
}

fn line(etag: &str, id: &str) -> Vec<u8> {
    format!("{etag} {id}\n").into_bytes()
}

/// In `sync` mode a write on one member is in the watcher's socket on
/// another member by the time the write is answered: checked with a read that
/// does not wait, after every one of 200 writes. Only sessions the watched
/// member's API has used are streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_write_is_in_the_watchers_socket_before_the_write_is_answered() {
    let cl = started(3, &["--send", "sync"]).await;
    let mut w = Watcher::open(http(&cl, 1));
    let mut a = cl.client(0);
    for id in ["C0", "C1"] {
        let r = a
            .post("/v1/sessions", format!(r#"{{"id":"{id}"}}"#))
            .await
            .expect("post");
        assert_eq!(r.status, 201);
    }
    // C1 is read on the watched member, C0 never is.
    let mut b = cl.client(1);
    let r = b.get("/v1/sessions/C1?touch=false").await.expect("get");
    assert_eq!(r.status, 200);
    for i in 0..200 {
        let body = format!(
            r#"{{"set":{{"n":"{}"}}}}"#,
            if i % 2 == 0 { "MA==" } else { "MQ==" }
        );
        for id in ["C0", "C1"] {
            let r = a
                .request(
                    hyper::Method::PATCH,
                    &format!("/v1/sessions/{id}"),
                    body.clone(),
                )
                .await
                .expect("patch");
            assert_eq!(r.status, 204);
        }
        let r = a
            .request(hyper::Method::PATCH, "/v1/sessions/C1", body)
            .await
            .expect("patch");
        assert_eq!(r.status, 204);
        let tag = r.headers["etag"].to_str().expect("etag").to_owned();
        w.take_available();
        assert!(
            w.has(&line(&tag, "C1")),
            "write {i}: {tag} not yet in the stream: {:?}",
            String::from_utf8_lossy(&w.got[w.got.len().saturating_sub(300)..])
        );
    }
    assert_eq!(
        a.delete("/v1/sessions/C1").await.expect("delete").status,
        204
    );
    w.take_available();
    assert!(w.has(b"- C1\n"), "the invalidation is in the stream");
    assert!(!w.has(b" C0\n"), "C0 was never used on the watched member");
}

/// A watcher's own writes (`Sessionmesh-Watcher`) are not echoed back to it;
/// another watcher, and writes without the header, are told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watchers_own_writes_are_not_echoed_to_it() {
    let cl = started(1, &[]).await;
    let mut c = cl.client(0);
    let mut me = Watcher::open(http(&cl, 0));
    let mut other = Watcher::open(http(&cl, 0));
    assert_ne!(me.id, other.id);
    let headers = [
        ("content-type", "application/json".to_owned()),
        ("sessionmesh-watcher", me.id.to_string()),
    ];
    let r = c
        .request_with(
            hyper::Method::POST,
            "/v1/sessions",
            &headers,
            r#"{"id":"O1"}"#,
        )
        .await
        .expect("post");
    assert_eq!(r.status, 201);
    let own = r.headers["etag"].to_str().expect("etag").to_owned();
    other.wait_for(&line(&own, "O1"), Duration::from_secs(5));
    let r = c
        .request(
            hyper::Method::PATCH,
            "/v1/sessions/O1",
            r#"{"set":{"n":"MA=="}}"#,
        )
        .await
        .expect("patch");
    assert_eq!(r.status, 204);
    let theirs = r.headers["etag"].to_str().expect("etag").to_owned();
    me.wait_for(&line(&theirs, "O1"), Duration::from_secs(5));
    assert!(!me.has(&line(&own, "O1")), "its own create was echoed");
}

/// Writes on the watched member itself, renames (the old id gone, the new one
/// there), and the stream's end when the member stops; only GET subscribes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_writes_and_renames_are_streamed_and_the_stream_ends_with_the_member() {
    let mut cl = started(1, &[]).await;
    let mut c = cl.client(0);
    let r = c
        .request(hyper::Method::DELETE, "/v1/changes", "")
        .await
        .expect("delete");
    assert_eq!(r.status, 405);
    let mut w = Watcher::open(http(&cl, 0));
    let r = c
        .post("/v1/sessions", r#"{"id":"L1"}"#)
        .await
        .expect("post");
    let tag = r.headers["etag"].to_str().expect("etag").to_owned();
    w.wait_for(&line(&tag, "L1"), Duration::from_secs(5));
    let r = c
        .post("/v1/sessions/L1/rename", r#"{"newId":"L2"}"#)
        .await
        .expect("rename");
    assert_eq!(r.status, 200);
    w.wait_for(b"- L1\n", Duration::from_secs(5));
    w.wait_for(b" L2\n", Duration::from_secs(5));
    let m = c.get("/metrics").await.expect("metrics").text();
    assert!(m.contains("sessionmesh_change_watchers 1"), "{m}");
    cl.terminate(0, Duration::from_secs(10));
    assert!(
        w.wait_end(Duration::from_secs(10)),
        "the stream ends with the member"
    );
}
