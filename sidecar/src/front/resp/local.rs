//! Commands a connection answers itself, without the core: PING, ECHO,
//! QUIT, SELECT, AUTH, HELLO, CLIENT, INFO, CONFIG and COMMAND.

use super::commands::{arity_error, is_data_command, unknown_command, COMMAND_COUNT};
use super::protocol::Value;
use super::server::{Conn, RespConfig};
use crate::node::Handle;
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::warn;

/// Failed AUTH attempts on one connection before each further one is slowed.
const AUTH_FREE_FAILURES: u32 = 3;
const AUTH_PENALTY: std::time::Duration = std::time::Duration::from_millis(200);

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

/// Whether the connection itself answers `name` (outside any transaction).
pub(super) fn is_local(name: &str) -> bool {
    matches!(
        name,
        "PING"
            | "ECHO"
            | "QUIT"
            | "SELECT"
            | "AUTH"
            | "HELLO"
            | "CLIENT"
            | "INFO"
            | "CONFIG"
            | "COMMAND"
            | "TIME"
    )
}

/// Commands answered by the connection itself. Returns the reply and whether to close.
pub(super) async fn local(
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
        "SELECT" if a.len() == 1 => match std::str::from_utf8(&a[0])
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
        {
            None => Value::err("ERR value is not an integer or out of range"),
            Some(db @ 0..=15) => {
                conn.db = db as u8;
                Value::ok()
            }
            Some(_) => Value::err("ERR DB index is out of range"),
        },
        "TIME" if a.is_empty() => super::commands::time_reply(),
        "AUTH" if a.len() == 1 || a.len() == 2 => auth(conn, h, cfg, a).await,
        "HELLO" => match hello(conn, h, cfg, a).await {
            Ok(v) | Err(v) => v,
        },
        "CLIENT" if !a.is_empty() => client(conn, a),
        "INFO" => info(h, a).await,
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
        "ECHO" | "SELECT" | "AUTH" | "CLIENT" | "TIME" => arity_error(name),
        _ if is_data_command(name) => Value::err("NOAUTH Authentication required."),
        _ => unknown_command(cmd),
    };
    (v, false)
}

/// AUTH [user] pass.
async fn auth(conn: &mut Conn, h: &Handle, cfg: &RespConfig, a: &[Bytes]) -> Value {
    let (user, pass): (&[u8], &Bytes) = if a.len() == 1 {
        (b"default", &a[0])
    } else {
        (&a[0][..], &a[1])
    };
    match &cfg.password {
        // Redis 7 without requirepass: the default user takes any password.
        None if a.len() == 2 && user == b"default" => Value::ok(),
        None if a.len() == 2 => {
            Value::err("WRONGPASS invalid username-password pair or user is disabled.")
        }
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

/// HELLO [protover [AUTH user pass] [SETNAME name]].
async fn hello(conn: &mut Conn, h: &Handle, cfg: &RespConfig, a: &[Bytes]) -> Result<Value, Value> {
    let mut i = 0;
    let mut proto = conn.proto;
    if let Some(v) = a.first() {
        match std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<u8>().ok())
        {
            Some(p @ 2..=3) => proto = p,
            Some(_) => return Err(Value::err("NOPROTO unsupported protocol version")),
            None => {
                return Err(Value::err(
                    "ERR Protocol version is not an integer or out of range",
                ))
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
                        return Err(Value::err(
                            "WRONGPASS invalid username-password pair or user is disabled.",
                        ));
                    }
                }
                i += 3;
            }
            "setname" if i + 1 < a.len() => {
                if !valid_client_name(&a[i + 1]) {
                    return Err(Value::err(BAD_CLIENT_NAME));
                }
                conn.name = Some(String::from_utf8_lossy(&a[i + 1]).into_owned());
                i += 2;
            }
            _ => return Err(Value::err("ERR Syntax error in HELLO option")),
        }
    }
    if !conn.authed {
        return Err(Value::err("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time"));
    }
    conn.proto = proto;
    Ok(Value::Map(vec![
        (Value::str("server"), Value::str("redis")),
        (Value::str("version"), Value::str("7.0.15")),
        (Value::str("proto"), Value::Int(proto as i64)),
        (Value::str("id"), Value::Int(conn.id as i64)),
        (Value::str("mode"), Value::str("standalone")),
        (Value::str("role"), Value::str("master")),
        (Value::str("modules"), Value::Array(vec![])),
    ]))
}

const BAD_CLIENT_NAME: &str =
    "ERR Client names cannot contain spaces, newlines or special characters.";

/// Redis's rule: printable ASCII without spaces.
fn valid_client_name(n: &[u8]) -> bool {
    n.iter().all(|b| (b'!'..=b'~').contains(b))
}

/// CLIENT SETNAME | GETNAME | ID | SETINFO | INFO | NO-EVICT | NO-TOUCH.
fn client(conn: &mut Conn, a: &[Bytes]) -> Value {
    match lower(&a[0]).as_str() {
        "setname" if a.len() == 2 => {
            if !valid_client_name(&a[1]) {
                return Value::err(BAD_CLIENT_NAME);
            }
            conn.name = Some(String::from_utf8_lossy(&a[1]).into_owned());
            Value::ok()
        }
        "getname" => conn.name.as_deref().map_or(Value::Null, Value::str),
        "id" => Value::Int(conn.id as i64),
        "setinfo" if a.len() == 3 => Value::ok(),
        "info" => Value::Verbatim(format!(
            "id={} name={} db={} resp={}\n",
            conn.id,
            conn.name.as_deref().unwrap_or(""),
            conn.db,
            conn.proto
        )),
        "no-evict" | "no-touch" => Value::ok(),
        other => Value::err(format!(
            "ERR unknown subcommand '{other}'. Try CLIENT HELP."
        )),
    }
}

/// INFO [section ...]: the server, clients, replication, persistence and
/// keyspace sections (all of them by default, or `all`/`everything`).
async fn info(h: &Handle, a: &[Bytes]) -> Value {
    let wanted: Vec<String> = a.iter().map(lower).collect();
    let all = wanted.is_empty()
        || wanted
            .iter()
            .any(|w| matches!(w.as_str(), "all" | "everything" | "default"));
    let want = |s: &str| all || wanted.iter().any(|w| w == s);
    let keyspace = if want("keyspace") {
        keyspace_counts(h).await
    } else {
        Default::default()
    };
    let ready = h.ready.load(Ordering::Relaxed);
    let mut out = String::new();
    if want("server") {
        out += &format!(
            "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\nsessionmesh_member:{}\r\nsessionmesh_jvm_route:{}\r\n\r\n",
            h.me.name, h.jvm_route
        );
    }
    if want("clients") {
        out += &format!(
            "# Clients\r\nconnected_clients:{}\r\n\r\n",
            h.io.redis_clients.load(Ordering::Relaxed)
        );
    }
    if want("replication") {
        out += "# Replication\r\nrole:master\r\n\r\n";
    }
    if want("persistence") {
        out += &format!("# Persistence\r\nloading:{}\r\n\r\n", u8::from(!ready));
    }
    if want("keyspace") {
        out += "# Keyspace\r\n";
        for (db, (keys, expires)) in keyspace {
            out += &format!("db{db}:keys={keys},expires={expires},avg_ttl=0\r\n");
        }
    }
    Value::Verbatim(out.trim_end_matches("\r\n").to_owned() + "\r\n")
}

/// Keys, and keys with a TTL, per database, as INFO's keyspace lines count them.
async fn keyspace_counts(h: &Handle) -> std::collections::BTreeMap<u8, (u64, u64)> {
    h.txn(|tx| crate::node::Step::Ready(tx.core().store.keyspace(tx.now())))
        .await
        .unwrap_or_default()
}
