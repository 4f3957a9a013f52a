//! The local HTTP API on raw request bytes: one member runs in the process,
//! and each input is a connection whose bytes are the request(s). Every
//! answer must be a complete HTTP response; nothing may panic or hang.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sessionmesh_sidecar::core::CoreConfig;
use sessionmesh_sidecar::node::{self, Handle, MembershipSource, NodeConfig};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

struct Member {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

fn member() -> &'static Member {
    static M: OnceLock<Member> = OnceLock::new();
    M.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let dir =
            std::env::temp_dir().join(format!("sessionmesh-fuzz-http-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("members.yaml");
        std::fs::write(
            &file,
            "cluster: fuzz\nmembers:\n  - name: a\n    address: 127.0.0.1:1\n    jvmRoute: a\n",
        )
        .expect("member file");
        let cfg = NodeConfig {
            core: CoreConfig::default(),
            member: "a".into(),
            members: MembershipSource::File(file),
            secret: b"0123456789abcdef0123456789abcdef".to_vec(),
            listen: Some("127.0.0.1:0".parse().expect("addr")),
            reload_interval: Duration::from_secs(3600),
            leave_timeout: Duration::from_millis(100),
            connect_timeout: Duration::from_millis(100),
            tick: Duration::from_millis(10),
            test_hooks: false,
        };
        let started = rt
            .block_on(node::start(cfg, CancellationToken::new()))
            .expect("member starts");
        let handle = started.handle;
        rt.block_on(async {
            while !handle.ready.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Member { rt, handle }
    })
}

#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The server closed the connection.
    Closed,
    /// A change stream began (`GET /v1/changes`): it never ends by itself.
    Stream,
}

async fn read_answers(client: &mut tokio::io::DuplexStream, out: &mut Vec<u8>) -> Ended {
    let mut buf = [0u8; 8192];
    loop {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return Ended::Closed,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        if out.windows(6).any(|w| w == b"ready ") && out.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ended::Stream;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let m = member();
    let handle = m.handle.clone();
    m.rt.block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let conn = tokio::spawn(sessionmesh_sidecar::front::http::connection(
            server,
            handle,
            None,
            Duration::from_millis(200),
            false,
            CancellationToken::new(),
        ));
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), read_answers(&mut client, &mut out)).await;
        assert!(read.is_ok(), "the connection did not finish within 5 s");
        if read == Ok(Ended::Stream) {
            // GET /v1/changes: a stream that lasts as long as the connection.
            conn.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        if !out.is_empty() {
            // HTTP/1.0 requests are answered in HTTP/1.0.
            assert!(
                out.starts_with(b"HTTP/1.1 ") || out.starts_with(b"HTTP/1.0 "),
                "not an HTTP response"
            );
        }
    });
});
