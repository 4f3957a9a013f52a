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
}

impl Watcher {
    fn open(addr: std::net::SocketAddr) -> Watcher {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(b"GET /v1/changes HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .expect("send");
        let mut w = Watcher { s, got: Vec::new() };
        w.wait_for(b"ready\n", Duration::from_secs(10));
        let head = String::from_utf8_lossy(&w.got).to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{head}"
        );
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
/// does not wait, after every one of 200 writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_write_is_in_the_watchers_socket_before_the_write_is_answered() {
    let cl = started(3, &["--send", "sync"]).await;
    let mut w = Watcher::open(http(&cl, 1));
    let mut a = cl.client(0);
    let r = a
        .post("/v1/sessions", r#"{"id":"C1"}"#)
        .await
        .expect("post");
    assert_eq!(r.status, 201);
    w.take_available();
    let tag = r.headers["etag"].to_str().expect("etag").to_owned();
    assert!(
        w.has(&line(&tag, "C1")),
        "{:?}",
        String::from_utf8_lossy(&w.got)
    );
    for i in 0..200 {
        let body = format!(
            r#"{{"set":{{"n":"{}"}}}}"#,
            if i % 2 == 0 { "MA==" } else { "MQ==" }
        );
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
