//! The Redis-protocol endpoint (RESP2 and RESP3) for the local app: connection
//! handling, the handshake commands (HELLO, AUTH, SELECT, CLIENT, INFO,
//! COMMAND, PING, ECHO, QUIT), limits, and pipelining. Data commands go to the
//! core task in batches (one batch per read from the socket), so a pipeline
//! costs one round trip to the core.

use crate::front::resp::commands::{
    self, arity_error, is_data_command, unknown_command, COMMAND_COUNT,
};
use crate::front::resp::protocol::{self, Value};
use crate::node::{Command, Handle};
use bytes::{Bytes, BytesMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

#[derive(Debug, Clone)]
pub struct RespConfig {
    /// Required by AUTH/HELLO when set (user `default`).
    pub password: Option<String>,
    pub max_clients: usize,
    pub limits: protocol::Limits,
}

/// Replies are written out whenever this much is encoded, so a client that
/// does not read holds back its own connection, not the member's memory.
const OUT_CHUNK: usize = 1 << 20;
/// A client that reads none of its replies for this long is disconnected.
const WRITE_STALL: std::time::Duration = std::time::Duration::from_secs(30);
/// Most keys one MGET, DEL, UNLINK, EXISTS or TOUCH may name.
pub const MAX_KEYS_PER_COMMAND: usize = 10_000;
/// Failed AUTH attempts on one connection before each further one is slowed.
const AUTH_FREE_FAILURES: u32 = 3;
const AUTH_PENALTY: std::time::Duration = std::time::Duration::from_millis(200);

struct Conn {
    proto: u8,
    authed: bool,
    auth_failures: u32,
    name: Option<String>,
    id: u64,
}

/// The SCAN cursors of this endpoint, used inside transactions.
type Scans = Arc<std::sync::Mutex<commands::RedisState>>;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub async fn serve(
    listener: TcpListener,
    handle: Handle,
    cfg: RespConfig,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let cfg = Arc::new(cfg);
    let scans = Scans::default();
    let mut acceptor = crate::net::accept::Acceptor::new("redis");
    loop {
        let (mut stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            x = acceptor.accept(&listener) => x,
        };
        let clients = &handle.io.redis_clients;
        if clients.load(Ordering::Relaxed) >= cfg.max_clients as u64 {
            warn!(%remote, max = cfg.max_clients, "redis endpoint: connection refused, client limit reached");
            let _ = stream
                .write_all(b"-ERR max number of clients reached\r\n")
                .await;
            continue;
        }
        let _ = stream.set_nodelay(true);
        clients.fetch_add(1, Ordering::Relaxed);
        let (handle, cfg, shutdown) = (handle.clone(), cfg.clone(), shutdown.clone());
        let scans = scans.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = connection(stream, &handle, &cfg, &scans) => {}
            }
            handle.io.redis_clients.fetch_sub(1, Ordering::Relaxed);
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn connection(mut stream: TcpStream, h: &Handle, cfg: &RespConfig, scans: &Scans) {
    let mut conn = Conn {
        proto: 2,
        authed: cfg.password.is_none(),
        auth_failures: 0,
        name: None,
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
    };
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut out = BytesMut::with_capacity(16 * 1024);
    loop {
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut batch: Vec<Queued> = Vec::new();
        let mut close = false;
        loop {
            match protocol::parse(&mut buf, &cfg.limits) {
                Ok(Some(cmd)) if cmd.is_empty() => {}
                Ok(Some(cmd)) => {
                    let name = String::from_utf8_lossy(&cmd[0]).to_ascii_uppercase();
                    if is_data_command(&name) && conn.authed {
                        if cmd.len() > MAX_KEYS_PER_COMMAND + 1
                            && matches!(
                                name.as_str(),
                                "MGET" | "DEL" | "UNLINK" | "EXISTS" | "TOUCH"
                            )
                        {
                            if flush(&mut stream, h, scans, &mut batch, conn.proto, &mut out)
                                .await
                                .is_err()
                            {
                                return;
                            }
                            let e = format!(
                                "ERR too many keys for '{}' (at most {MAX_KEYS_PER_COMMAND})",
                                name.to_ascii_lowercase()
                            );
                            protocol::encode(&Value::err(e), conn.proto, &mut out);
                            continue;
                        }
                        batch.push(take_scan_match(cmd));
                        continue;
                    }
                    if flush(&mut stream, h, scans, &mut batch, conn.proto, &mut out)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let (v, quit) = local(&mut conn, h, cfg, &name, &cmd).await;
                    protocol::encode(&v, conn.proto, &mut out);
                    if quit {
                        close = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(error = %e, "redis endpoint: protocol error; closing the connection");
                    if flush(&mut stream, h, scans, &mut batch, conn.proto, &mut out)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    protocol::encode(&Value::err(format!("ERR {e}")), conn.proto, &mut out);
                    close = true;
                    break;
                }
            }
        }
        if flush(&mut stream, h, scans, &mut batch, conn.proto, &mut out)
            .await
            .is_err()
            || write_out(&mut stream, h, &mut out).await.is_err()
        {
            return;
        }
        if close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// A data command on its way to the core, with what is done to its reply here.
type Queued = (Vec<Bytes>, Option<Bytes>);

/// Takes `MATCH pattern` out of a `SCAN`: the pattern is matched against the
/// returned keys in this connection's task, not on the core task that every
/// client and peer shares.
fn take_scan_match(cmd: Vec<Bytes>) -> Queued {
    if !cmd[0].eq_ignore_ascii_case(b"SCAN") {
        return (cmd, None);
    }
    let mut kept = vec![cmd[0].clone()];
    let mut pattern = None;
    let mut i = 1;
    while i < cmd.len() {
        // Options come in pairs after the cursor; a malformed tail is left for
        // the core to refuse with Redis's message.
        if i >= 2 && cmd[i].eq_ignore_ascii_case(b"MATCH") && i + 1 < cmd.len() {
            pattern = Some(cmd[i + 1].clone());
            i += 2;
            continue;
        }
        kept.push(cmd[i].clone());
        i += 1;
    }
    (kept, pattern)
}

/// Keeps the keys of a SCAN reply that match `pattern`.
fn filter_scan(v: &mut Value, pattern: &[u8]) {
    if let Value::Array(parts) = v {
        if let Some(Value::Array(keys)) = parts.get_mut(1) {
            keys.retain(|k| match k {
                Value::Bulk(b) => crate::front::resp::commands::glob(pattern, b),
                Value::Simple(s) | Value::Verbatim(s) => {
                    crate::front::resp::commands::glob(pattern, s.as_bytes())
                }
                _ => true,
            });
        }
    }
}

/// Runs the batched data commands and encodes their replies, writing them out
/// a chunk at a time: the values themselves are shared with the store, so
/// what a client that does not read holds is one chunk, not every reply.
async fn flush(
    stream: &mut TcpStream,
    h: &Handle,
    scans: &Scans,
    batch: &mut Vec<Queued>,
    proto: u8,
    out: &mut BytesMut,
) -> std::io::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let (cmds, post): (Vec<Vec<Bytes>>, Vec<Option<Bytes>>) =
        std::mem::take(batch).into_iter().unzip();
    let n = cmds.len();
    let scans = scans.clone();
    let r = h
        .txn(move |tx| {
            // Only ever locked on the core task: never contended.
            let mut st = scans.lock().unwrap_or_else(|p| p.into_inner());
            commands::exec(tx, &mut st, &cmds)
        })
        .await;
    match r {
        Some(mut values) => {
            for (v, pattern) in values.iter_mut().zip(&post) {
                if let Some(p) = pattern {
                    filter_scan(v, p);
                }
            }
            for v in &values {
                protocol::encode(v, proto, out);
                if out.len() >= OUT_CHUNK {
                    write_out(stream, h, out).await?;
                }
            }
        }
        None => {
            for _ in 0..n {
                protocol::encode(&Value::err("ERR this member is shutting down"), proto, out);
            }
        }
    }
    Ok(())
}

/// Writes what is encoded; a client that reads nothing for `WRITE_STALL` is
/// disconnected and counted.
async fn write_out(stream: &mut TcpStream, h: &Handle, out: &mut BytesMut) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    match tokio::time::timeout(WRITE_STALL, stream.write_all(out)).await {
        Ok(r) => r?,
        Err(_) => {
            h.io.redis_output_stalls.fetch_add(1, Ordering::Relaxed);
            warn!("redis endpoint: a client read none of its replies for 30 s; disconnected");
            return Err(std::io::ErrorKind::TimedOut.into());
        }
    }
    out.clear();
    Ok(())
}

/// Compares a password in constant time (digests of both, so the length
/// leaks nothing either). A failure is counted, logged at most every 10 s,
/// and, past a few on one connection, slowed down.
async fn auth_ok(conn: &mut Conn, h: &Handle, expected: &str, user: &[u8], pass: &[u8]) -> bool {
    if crate::core::identity::ct_eq(expected.as_bytes(), pass) && user == b"default" {
        return true;
    }
    conn.auth_failures += 1;
    h.io.redis_auth_failures.fetch_add(1, Ordering::Relaxed);
    static LAST_LOG_MS: AtomicU64 = AtomicU64::new(0);
    let now = crate::node::mono_ms() + 10_000;
    let last = LAST_LOG_MS.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 10_000
        && LAST_LOG_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        warn!(
            total = h.io.redis_auth_failures.load(Ordering::Relaxed),
            "redis endpoint: failed AUTH (logged at most every 10 s)"
        );
    }
    if conn.auth_failures > AUTH_FREE_FAILURES {
        tokio::time::sleep(AUTH_PENALTY).await;
    }
    false
}

fn lower(b: &Bytes) -> String {
    String::from_utf8_lossy(b).to_ascii_lowercase()
}

/// Commands answered by the connection itself. Returns the reply and whether to close.
async fn local(
    conn: &mut Conn,
    h: &Handle,
    cfg: &RespConfig,
    name: &str,
    cmd: &[Bytes],
) -> (Value, bool) {
    let a = &cmd[1..];
    if !conn.authed && !matches!(name, "AUTH" | "HELLO" | "QUIT") {
        return (Value::err("NOAUTH Authentication required."), false);
    }
    let v = match name {
        "PING" => match a.len() {
            0 => Value::Simple("PONG".into()),
            1 => Value::Bulk(a[0].clone()),
            _ => arity_error(name),
        },
        "ECHO" if a.len() == 1 => Value::Bulk(a[0].clone()),
        "QUIT" => return (Value::ok(), true),
        "SELECT" if a.len() == 1 => {
            if &a[0][..] == b"0" {
                Value::ok()
            } else {
                Value::err("ERR DB index is out of range")
            }
        }
        "AUTH" if a.len() == 1 || a.len() == 2 => {
            let (user, pass): (&[u8], &Bytes) = if a.len() == 1 {
                (b"default", &a[0])
            } else {
                (&a[0][..], &a[1])
            };
            match &cfg.password {
                None => Value::err(
                    "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
                ),
                Some(p) => {
                    if auth_ok(conn, h, p, user, pass).await {
                        conn.authed = true;
                        Value::ok()
                    } else {
                        Value::err("WRONGPASS invalid username-password pair or user is disabled.")
                    }
                }
            }
        }
        "HELLO" => {
            let mut i = 0;
            let mut proto = conn.proto;
            if let Some(v) = a.first() {
                match std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<u8>().ok())
                {
                    Some(p @ 2..=3) => proto = p,
                    Some(_) => return (Value::err("NOPROTO unsupported protocol version"), false),
                    None => {
                        return (
                            Value::err("ERR Protocol version is not an integer or out of range"),
                            false,
                        )
                    }
                }
                i = 1;
            }
            while i < a.len() {
                match lower(&a[i]).as_str() {
                    "auth" if i + 2 < a.len() => {
                        if let Some(p) = &cfg.password {
                            if auth_ok(conn, h, p, &a[i + 1], &a[i + 2]).await {
                                conn.authed = true;
                            } else {
                                return (Value::err("WRONGPASS invalid username-password pair or user is disabled."), false);
                            }
                        }
                        i += 3;
                    }
                    "setname" if i + 1 < a.len() => {
                        conn.name = Some(String::from_utf8_lossy(&a[i + 1]).into_owned());
                        i += 2;
                    }
                    _ => return (Value::err("ERR Syntax error in HELLO option"), false),
                }
            }
            if !conn.authed {
                return (Value::err("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time"), false);
            }
            conn.proto = proto;
            Value::Map(vec![
                (Value::str("server"), Value::str("redis")),
                (Value::str("version"), Value::str("7.0.15")),
                (Value::str("proto"), Value::Int(proto as i64)),
                (Value::str("id"), Value::Int(conn.id as i64)),
                (Value::str("mode"), Value::str("standalone")),
                (Value::str("role"), Value::str("master")),
                (Value::str("modules"), Value::Array(vec![])),
            ])
        }
        "CLIENT" if !a.is_empty() => match lower(&a[0]).as_str() {
            "setname" if a.len() == 2 => {
                conn.name = Some(String::from_utf8_lossy(&a[1]).into_owned());
                Value::ok()
            }
            "getname" => conn.name.as_deref().map_or(Value::Null, Value::str),
            "id" => Value::Int(conn.id as i64),
            "setinfo" if a.len() == 3 => Value::ok(),
            "info" => Value::Verbatim(format!(
                "id={} name={} db=0 resp={}\n",
                conn.id,
                conn.name.as_deref().unwrap_or(""),
                conn.proto
            )),
            "no-evict" | "no-touch" => Value::ok(),
            other => Value::err(format!(
                "ERR unknown subcommand '{other}'. Try CLIENT HELP."
            )),
        },
        "INFO" => {
            let keys = match h.call(|reply| Command::Status { reply }).await {
                Some(st) => st.sessions,
                None => 0,
            };
            let ready = h.ready.load(Ordering::Relaxed);
            Value::Verbatim(format!(
                "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\nsessionmesh_member:{}\r\nsessionmesh_jvm_route:{}\r\n\
                 # Replication\r\nrole:master\r\n# Persistence\r\nloading:{}\r\n# Keyspace\r\ndb0:keys={keys},expires=0,avg_ttl=0\r\n",
                h.me.name,
                h.jvm_route,
                u8::from(!ready)
            ))
        }
        // redis-benchmark and some clients read the server's config; there is nothing to tune here.
        "CONFIG" => match a.first().map(lower).as_deref() {
            Some("get") => Value::Map(
                a[1..]
                    .iter()
                    .map(|k| {
                        let v = if lower(k) == "appendonly" { "no" } else { "" };
                        (Value::Bulk(k.clone()), Value::str(v))
                    })
                    .collect(),
            ),
            _ => Value::err("ERR CONFIG is limited to GET on sessionmesh"),
        },
        "COMMAND" => match a.first().map(lower).as_deref() {
            None => Value::Array(vec![]),
            Some("count") => Value::Int(COMMAND_COUNT),
            Some("docs") => Value::Map(vec![]),
            Some("info") => Value::Array(a[1..].iter().map(|_| Value::NullArray).collect()),
            Some(other) => Value::err(format!(
                "ERR unknown subcommand '{other}'. Try COMMAND HELP."
            )),
        },
        "ECHO" | "SELECT" | "AUTH" | "CLIENT" => arity_error(name),
        _ if is_data_command(name) => Value::err("NOAUTH Authentication required."),
        _ => unknown_command(cmd),
    };
    (v, false)
}
