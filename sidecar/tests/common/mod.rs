//! Helpers the sidecar's process-level tests share: starting members,
//! reading their state, and speaking the peer protocol as a member would.
#![allow(dead_code)]

use sessionmesh_sidecar::core::hlc::Hlc;
use sessionmesh_sidecar::core::identity::{Generation, NodeId, SessionId};
use sessionmesh_sidecar::core::message::PeerMsg;
use sessionmesh_sidecar::core::store::{Delta, Op};
use sessionmesh_sidecar::demo::client::Client;
use sessionmesh_sidecar::demo::localcluster::{wait_for, LocalCluster};
use sessionmesh_sidecar::net::transport::{self, IoStats, Security};
use sessionmesh_sidecar::node::now_ms;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

pub fn bin() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_sessionmesh-sidecar").into()
}

pub async fn started(n: usize, args: &[&str]) -> LocalCluster {
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

pub async fn member_state(c: &mut Client, name: &str) -> Option<String> {
    let v = c.get("/v1/cluster").await.ok()?.json();
    v["members"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name)
        .and_then(|m| m["state"].as_str().map(str::to_owned))
}

pub async fn wait_state(c: &mut Client, name: &str, want: &str, within: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < within {
        if member_state(c, name).await.as_deref() == Some(want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

pub async fn count(c: &mut Client) -> u64 {
    c.get("/v1/sessions?limit=1")
        .await
        .map(|r| r.json()["count"].as_u64().unwrap_or(0))
        .unwrap_or(0)
}

pub fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Sends one raw HTTP/1.1 request and returns the status code.
pub fn raw_status(addr: std::net::SocketAddr, request: &str) -> u16 {
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

pub fn http(cl: &LocalCluster, i: usize) -> std::net::SocketAddr {
    cl.nodes[i].http.expect("started")
}

pub async fn ready(cl: &LocalCluster, i: usize) {
    assert!(
        cl.wait_ready(i, Duration::from_secs(15)).await,
        "node{} not ready:\n{}",
        i + 1,
        cl.log_tail(i, 30)
    );
}

pub async fn value(c: &mut Client, id: &str, name: &str) -> Option<String> {
    let r = c
        .get(&format!("/v1/sessions/{id}/attributes/{name}?touch=false"))
        .await
        .ok()?;
    (r.status == 200).then(|| r.text())
}

pub async fn put(c: &mut Client, id: &str, name: &str, v: &str) -> u16 {
    c.put(
        &format!("/v1/sessions/{id}/attributes/{name}?send=sync"),
        v.to_owned(),
    )
    .await
    .map_or(0, |r| r.status)
}

/// Writes `rounds` values alternately on the members in `on`, each read back
/// from every member in `check`: a later acknowledged write must always win.
pub async fn later_writes_win(
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

/// What member `name` of `cl` would present: the cluster's secret, a new life.
pub fn member_security(cl: &LocalCluster, name: &str) -> Security {
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
pub struct Fake {
    pub stream: tokio::net::TcpStream,
    pub keys: transport::Keys,
}

/// Dials `cl`'s node `to` as member `as_name` with the cluster secret and
/// returns the authenticated connection.
pub async fn impersonate(cl: &LocalCluster, to: usize, as_name: &str) -> Fake {
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

pub async fn send(s: &mut Fake, msg: &PeerMsg) {
    let mut out = bytes::BytesMut::new();
    s.keys.send.seal(msg, &mut out).expect("seal");
    s.stream.write_all(&out).await.expect("write");
}

/// A delta a forging peer sends: `ops` on session `id`, stamped `hlc`.
pub fn delta(id: &str, hlc: Hlc, ops: Vec<Op>) -> Arc<Delta> {
    Arc::new(Delta {
        id: SessionId::key(id.as_bytes()).expect("id"),
        hlc,
        created_ms: now_ms(),
        last_accessed_ms: now_ms(),
        max_inactive_ms: 600_000,
        ops,
    })
}

pub fn set(name: &str, value: Vec<u8>) -> Op {
    Op::Set {
        name: name.into(),
        value: bytes::Bytes::from(value),
    }
}

pub fn forged(id: &str, hlc: Hlc, value: &str) -> Arc<Delta> {
    delta(id, hlc, vec![set("a", value.as_bytes().to_vec())])
}

pub fn create(id: &str, attrs: Vec<(&str, Vec<u8>)>) -> Arc<Delta> {
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

pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}
