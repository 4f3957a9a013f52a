//! Limits of the Redis endpoint that protect the member's memory: a
//! transaction cannot queue without bound.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn send(w: &mut TcpStream, args: &[&[u8]]) {
    let mut b = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        b.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        b.extend_from_slice(a);
        b.extend_from_slice(b"\r\n");
    }
    w.write_all(&b).unwrap();
}

fn line(r: &mut BufReader<TcpStream>) -> String {
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    l
}

/// MULTI holds at most 64 MiB of arguments: past that the command is refused
/// and the transaction with it (EXECABORT, nothing applied), and what follows
/// is answered QUEUED without being kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_cannot_queue_without_bound() {
    let cl = common::started(
        1,
        &[
            "--redis",
            "127.0.0.1:0",
            "--max-attr-bytes",
            "4194304",
            "--max-session-bytes",
            "4194304",
        ],
    )
    .await;
    let port = cl.nodes[0].redis.expect("redis").port();
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    send(&mut w, &[b"MULTI"]);
    assert_eq!(line(&mut r), "+OK\r\n");
    let value = vec![b'x'; 4 << 20];
    let mut refused_at = None;
    for i in 0..20 {
        let k = format!("big{i}");
        send(&mut w, &[b"SET", k.as_bytes(), &value]);
        let l = line(&mut r);
        if l.starts_with("-ERR a transaction holds at most") {
            refused_at = Some(i);
            break;
        }
        assert_eq!(l, "+QUEUED\r\n", "command {i}");
    }
    // 64 MiB of 4 MiB values (plus the key and name): the 16th is refused.
    assert_eq!(refused_at, Some(15), "the transaction was not bounded");
    send(&mut w, &[b"SET", b"after", b"v"]);
    assert_eq!(line(&mut r), "+QUEUED\r\n");
    send(&mut w, &[b"EXEC"]);
    assert!(
        line(&mut r).starts_with("-EXECABORT"),
        "EXEC after a refused command"
    );
    send(&mut w, &[b"EXISTS", b"big0", b"after"]);
    assert_eq!(
        line(&mut r),
        ":0\r\n",
        "nothing of the transaction was applied"
    );
    // The connection still works.
    send(&mut w, &[b"PING"]);
    let mut pong = [0u8; 7];
    r.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"+PONG\r\n");
}
