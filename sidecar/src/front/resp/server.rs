//! The Redis-protocol endpoint (RESP2 and RESP3) for the local app: connection
//! handling, the handshake commands (HELLO, AUTH, SELECT, CLIENT, INFO,
//! COMMAND, PING, ECHO, QUIT), limits, and pipelining. Data commands go to the
//! core task in batches (one batch per read from the socket), so a pipeline
//! costs one round trip to the core.

use crate::front::resp::commands::{self, is_data_command};
use crate::front::resp::protocol::{self, Value};
use crate::node::Handle;
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
    /// How this endpoint's writes replicate (`--redis-send`).
    pub send: crate::core::SendMode,
    /// `--allow-flush`.
    pub allow_flush: bool,
}

/// Replies are written out whenever this much is encoded, so a client that
/// does not read holds back its own connection, not the member's memory.
const OUT_CHUNK: usize = 1 << 20;
/// A client that reads none of its replies for this long is disconnected.
const WRITE_STALL: std::time::Duration = std::time::Duration::from_secs(30);
/// Most keys one MGET, DEL, UNLINK, EXISTS or TOUCH may name.
pub const MAX_KEYS_PER_COMMAND: usize = 10_000;
/// Most commands one MULTI may queue.
pub const MAX_QUEUED: usize = 100_000;
/// Most bytes of arguments one MULTI may queue.
pub const MAX_QUEUED_BYTES: usize = 64 << 20;

/// A transaction being queued.
#[derive(Default)]
pub(super) struct Multi {
    queued: Vec<Vec<Bytes>>,
    bytes: usize,
    /// A command was refused: EXEC answers EXECABORT and runs nothing, so
    /// what comes after is answered QUEUED but not kept.
    failed: bool,
}

pub(super) struct Conn {
    pub(super) proto: u8,
    pub(super) authed: bool,
    pub(super) auth_failures: u32,
    pub(super) name: Option<String>,
    pub(super) id: u64,
    /// Inside MULTI: the queued commands, and whether one was refused
    /// (EXEC then answers EXECABORT and runs nothing).
    pub(super) multi: Option<Multi>,
    /// WATCHed keys and their versions when watched.
    pub(super) watched: Vec<(u8, Bytes, u64)>,
    /// The database SELECT chose (0-15).
    pub(super) db: u8,
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
    let scans = Scans::new(std::sync::Mutex::new(commands::RedisState::new(
        cfg.allow_flush,
        Some(cfg.send),
    )));
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

/// One client connection: what it parsed, batched and has still to write.
struct Client<'a> {
    stream: TcpStream,
    h: &'a Handle,
    cfg: &'a RespConfig,
    scans: &'a Scans,
    conn: Conn,
    batch: Vec<Queued>,
    out: BytesMut,
}

/// Whether a connection goes on after what it just did.
enum Flow {
    Continue,
    Close,
}

impl Client<'_> {
    /// Runs the batched data commands and encodes their replies.
    async fn flush(&mut self) -> std::io::Result<()> {
        flush(
            &mut self.stream,
            self.h,
            self.scans,
            &mut self.batch,
            (self.conn.proto, self.conn.db),
            &mut self.out,
        )
        .await
    }

    /// Every complete command in `buf`, in order.
    async fn drain(&mut self, buf: &mut BytesMut) -> std::io::Result<Flow> {
        loop {
            match protocol::parse(buf, &self.cfg.limits) {
                Ok(Some(cmd)) if cmd.is_empty() => {}
                Ok(Some(cmd)) => {
                    if let Flow::Close = self.command(cmd).await? {
                        return Ok(Flow::Close);
                    }
                }
                Ok(None) => return Ok(Flow::Continue),
                Err(e) => {
                    debug!(error = %e, "redis endpoint: protocol error; closing the connection");
                    self.flush().await?;
                    protocol::encode(
                        &Value::err(format!("ERR {e}")),
                        self.conn.proto,
                        &mut self.out,
                    );
                    return Ok(Flow::Close);
                }
            }
        }
    }

    /// Data commands join the batch for the core; any other command runs here,
    /// after the batch before it, so replies stay in order.
    async fn command(&mut self, cmd: Vec<Bytes>) -> std::io::Result<Flow> {
        let name = String::from_utf8_lossy(&cmd[0]).to_ascii_uppercase();
        if self.conn.authed {
            if let Some(v) = self.transaction(&name, &cmd).await? {
                protocol::encode(&v, self.conn.proto, &mut self.out);
                return Ok(Flow::Continue);
            }
        }
        if is_data_command(&name) && self.conn.authed {
            let many_keys = matches!(
                name.as_str(),
                "MGET" | "DEL" | "UNLINK" | "EXISTS" | "TOUCH"
            );
            if many_keys && cmd.len() > MAX_KEYS_PER_COMMAND + 1 {
                self.flush().await?;
                let e = format!(
                    "ERR too many keys for '{}' (at most {MAX_KEYS_PER_COMMAND})",
                    name.to_ascii_lowercase()
                );
                protocol::encode(&Value::err(e), self.conn.proto, &mut self.out);
                return Ok(Flow::Continue);
            }
            self.batch.push(take_scan_match(cmd));
            return Ok(Flow::Continue);
        }
        self.flush().await?;
        let (v, quit) = super::local::local(&mut self.conn, self.h, self.cfg, &name, &cmd).await;
        protocol::encode(&v, self.conn.proto, &mut self.out);
        Ok(if quit { Flow::Close } else { Flow::Continue })
    }
}

impl Client<'_> {
    /// MULTI, EXEC, DISCARD, WATCH, UNWATCH, and queueing inside MULTI.
    /// `None`: not a transaction matter; the command runs as usual.
    async fn transaction(&mut self, name: &str, cmd: &[Bytes]) -> std::io::Result<Option<Value>> {
        let in_multi = self.conn.multi.is_some();
        let v = match name {
            "MULTI" if cmd.len() != 1 => commands::arity_error(name),
            "MULTI" if in_multi => Value::err("ERR MULTI calls can not be nested"),
            "MULTI" => {
                self.flush().await?;
                self.conn.multi = Some(Multi::default());
                Value::ok()
            }
            "EXEC" | "DISCARD" if cmd.len() != 1 => commands::arity_error(name),
            "EXEC" | "DISCARD" if !in_multi => Value::err(format!("ERR {name} without MULTI")),
            "DISCARD" => {
                self.conn.multi = None;
                self.conn.watched.clear();
                Value::ok()
            }
            "EXEC" => self.exec().await?,
            "WATCH" if cmd.len() < 2 => commands::arity_error(name),
            "WATCH" if in_multi => Value::err("ERR WATCH inside MULTI is not allowed"),
            "WATCH" => self.watch(&cmd[1..]).await?,
            "UNWATCH" if !in_multi => {
                self.conn.watched.clear();
                Value::ok()
            }
            // QUIT runs at once, as in Redis.
            "QUIT" => return Ok(None),
            _ if in_multi => self.queue(name, cmd),
            _ => return Ok(None),
        };
        Ok(Some(v))
    }

    /// A command inside MULTI: queued when it is one EXEC can run, refused
    /// (and the transaction with it) otherwise, as Redis does for an unknown
    /// command or a wrong number of arguments.
    fn queue(&mut self, name: &str, cmd: &[Bytes]) -> Value {
        let Some(m) = self.conn.multi.as_mut() else {
            return Value::err("ERR not in MULTI");
        };
        let size: usize = cmd.iter().map(Bytes::len).sum();
        let refuse = if commands::arity(name).is_none() {
            if super::local::is_local(name) {
                Some(Value::err(format!(
                    "ERR '{}' inside MULTI is not supported by sessionmesh",
                    name.to_ascii_lowercase()
                )))
            } else {
                Some(commands::unknown_command(cmd))
            }
        } else if !commands::arity_ok(name, cmd.len()) {
            Some(commands::arity_error(name))
        } else if m.queued.len() >= MAX_QUEUED || m.bytes + size > MAX_QUEUED_BYTES {
            Some(Value::err(format!(
                "ERR a transaction holds at most {MAX_QUEUED} commands and {} MiB",
                MAX_QUEUED_BYTES >> 20
            )))
        } else {
            None
        };
        match refuse {
            Some(e) => {
                m.failed = true;
                m.queued = Vec::new();
                e
            }
            None => {
                if !m.failed {
                    m.queued.push(cmd.to_vec());
                    m.bytes += size;
                }
                Value::Simple("QUEUED".into())
            }
        }
    }

    /// EXEC: every queued command in one go on the core, its writes one
    /// atomic group on every peer; a null reply if a watched key changed.
    async fn exec(&mut self) -> std::io::Result<Value> {
        let Multi {
            queued: cmds,
            failed,
            ..
        } = self.conn.multi.take().unwrap_or_default();
        let watched = std::mem::take(&mut self.conn.watched);
        if failed {
            return Ok(Value::err(
                "EXECABORT Transaction discarded because of previous errors.",
            ));
        }
        self.flush().await?;
        let scans = self.scans.clone();
        let db = self.conn.db;
        let mut keys = commands::keys_of(db, &cmds);
        for (d, k, _) in &watched {
            keys.extend(commands::key_ids(*d, std::slice::from_ref(k)));
        }
        let r = self
            .h
            .txn_on(keys, move |tx| {
                let mut st = scans.lock().unwrap_or_else(|p| p.into_inner());
                commands::exec_multi(tx, &mut st, db, &cmds, &watched)
            })
            .await;
        match r {
            Some(Some(values)) if values.iter().any(commands::is_leaving) => Err(shutting_down()),
            Some(Some(values)) => Ok(Value::Array(values)),
            Some(None) => Ok(Value::NullArray),
            None => Err(shutting_down()),
        }
    }

    /// WATCH: remembers each key's version now.
    async fn watch(&mut self, keys: &[Bytes]) -> std::io::Result<Value> {
        self.flush().await?;
        let keys = keys.to_vec();
        let db = self.conn.db;
        let ids = commands::key_ids(db, &keys);
        let r = self
            .h
            .txn_on(ids, move |tx| {
                let v: Vec<(u8, Bytes, u64)> = keys
                    .into_iter()
                    .map(|k| {
                        let f = commands::fingerprint(tx, db, &k);
                        (db, k, f)
                    })
                    .collect();
                crate::node::Step::Ready(v)
            })
            .await
            .ok_or_else(shutting_down)?;
        self.conn.watched.extend(r);
        Ok(Value::ok())
    }
}

/// The member is stopping: the connection closes, as Redis closes its
/// clients on shutdown, and the client retries elsewhere.
fn shutting_down() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "member shutting down",
    )
}

async fn connection(stream: TcpStream, h: &Handle, cfg: &RespConfig, scans: &Scans) {
    let mut c = Client {
        stream,
        h,
        cfg,
        scans,
        conn: Conn {
            proto: 2,
            authed: cfg.password.is_none(),
            auth_failures: 0,
            name: None,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            multi: None,
            watched: Vec::new(),
            db: 0,
        },
        batch: Vec::new(),
        out: BytesMut::with_capacity(16 * 1024),
    };
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        match c.stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let Ok(flow) = c.drain(&mut buf).await else {
            return;
        };
        if c.flush().await.is_err() || write_out(&mut c.stream, h, &mut c.out).await.is_err() {
            return;
        }
        if let Flow::Close = flow {
            let _ = c.stream.shutdown().await;
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
    (proto, db): (u8, u8),
    out: &mut BytesMut,
) -> std::io::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let (cmds, post): (Vec<Vec<Bytes>>, Vec<Option<Bytes>>) =
        std::mem::take(batch).into_iter().unzip();
    let n = cmds.len();
    let scans = scans.clone();
    let keys = commands::keys_of(db, &cmds);
    let r = h
        .txn_on(keys, move |tx| {
            // Only ever locked on the core task: never contended.
            let mut st = scans.lock().unwrap_or_else(|p| p.into_inner());
            commands::exec(tx, &mut st, db, &cmds)
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
                if commands::is_leaving(v) {
                    // The member is leaving: like Redis on shutdown, answer
                    // what ran and close, so the client retries elsewhere.
                    write_out(stream, h, out).await?;
                    return Err(shutting_down());
                }
                protocol::encode(v, proto, out);
                if out.len() >= OUT_CHUNK {
                    write_out(stream, h, out).await?;
                }
            }
        }
        None => {
            // The member is stopping: what was answered goes out, the
            // commands in flight get no reply and the connection closes, as
            // Redis does on shutdown, so clients retry instead of taking an
            // error for an answer.
            let _ = n;
            write_out(stream, h, out).await?;
            return Err(shutting_down());
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
