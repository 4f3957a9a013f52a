//! Redis data commands on the session store, run inside the core task so each
//! command is atomic (SET NX, GETDEL, RENAME...).
//!
//! A key is a session. A string key holds its value in the reserved attribute
//! `STRING_ATTR`; a hash key maps fields to attributes (one delta per change).
//! TTLs become the session's absolute expiry (`last accessed + max inactive`,
//! with `last accessed` = the time of the write), replicated with every delta.
//! Reads never extend a TTL. Error replies use Redis's exact shapes.

use crate::core::identity::SessionId;
use crate::core::store::{Op, Session, StoreError};
use crate::core::{SendMode, WriteError};
use crate::front::resp::protocol::Value;
use crate::node::{Step, Ticket, Tx};
use bytes::Bytes;
use std::collections::HashMap;

/// The attribute holding a string key's value.
pub const STRING_ATTR: &str = "\u{0}";

/// The reply a command gets while the member leaves the cluster; the
/// connection layer closes the connection instead of sending it.
pub const LEAVING: &str = "ERR this member is leaving the cluster";

/// Whether `v` is that reply.
pub fn is_leaving(v: &Value) -> bool {
    matches!(v, Value::Error(e) if e == LEAVING)
}

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";
const SYNTAX: &str = "ERR syntax error";
const NOT_INT: &str = "ERR value is not an integer or out of range";

/// Cursors of running SCANs: a cursor number names the last key returned.
#[derive(Default)]
pub struct RedisState {
    scans: HashMap<u64, (SessionId, u64)>,
    next_scan: u64,
    /// `--allow-flush`: FLUSHDB and FLUSHALL delete every key.
    pub allow_flush: bool,
    /// `--redis-send`: how this endpoint's writes replicate.
    pub send: Option<SendMode>,
}

impl RedisState {
    pub fn new(allow_flush: bool, send: Option<SendMode>) -> Self {
        RedisState {
            allow_flush,
            send,
            ..Default::default()
        }
    }
}

pub fn write_error(e: &WriteError) -> Value {
    match e {
        WriteError::NotReady => Value::err("LOADING sessionmesh is loading the dataset in memory"),
        WriteError::Leaving => Value::err(LEAVING),
        WriteError::ClockSkew { .. } => Value::err(format!("ERR {e}")),
        WriteError::Timeout(ms) => {
            Value::err(format!("TIMEOUT replication not acknowledged within {ms} ms (applied locally, still replicating)"))
        }
        WriteError::Store(s) => match s {
            StoreError::AttrTooLarge { size, max } => Value::err(format!("ERR value of {size} bytes exceeds the limit of {max} bytes")),
            StoreError::SessionTooLarge { size, max } => Value::err(format!("ERR key of {size} bytes would exceed the limit of {max} bytes")),
            StoreError::Full { max } => Value::err(format!("OOM the store is full ({max} keys)")),
            StoreError::Invalidated => Value::err("ERR key was invalidated as a session and cannot be reused"),
            other => Value::err(format!("ERR {other}")),
        },
    }
}

struct Ctx<'t, 'c> {
    tx: &'t mut Tx<'c>,
    now: u64,
    writes: Vec<Ticket>,
    mode: Option<SendMode>,
    /// The connection's database (SELECT).
    db: u8,
}

enum Kind<'s> {
    Str(&'s Bytes),
    Hash(&'s Session),
}

impl Ctx<'_, '_> {
    /// A key of this connection's database as a session id.
    fn key(&self, b: &Bytes) -> Result<SessionId, Value> {
        key_in(self.db, b)
    }

    /// The ids of this database after `cursor` (its start when `None`), at
    /// most `limit`, and whether the walk reached the end of the database.
    fn list(&self, cursor: Option<&SessionId>, limit: usize) -> (Vec<SessionId>, bool) {
        let start = SessionId::db_start(self.db);
        let mut ids = self
            .tx
            .core()
            .store
            .list(Some(cursor.unwrap_or(&start)), limit, self.now, 0);
        let full = ids.len() == limit;
        let before = ids.len();
        ids.retain(|id| id.db_key().0 == self.db);
        (ids.clone(), !full || ids.len() < before)
    }

    fn session(&self, id: &SessionId) -> Option<&Session> {
        self.tx
            .core()
            .store
            .get(id, self.now, 0)
            .ok()
            .filter(|s| s.live_attrs().next().is_some())
    }

    fn kind<'s>(s: &'s Session) -> Kind<'s> {
        match s.attrs.get(STRING_ATTR).and_then(|a| a.value.as_ref()) {
            Some(v) => Kind::Str(v),
            None => Kind::Hash(s),
        }
    }

    /// A string key's value; `None` if absent, WRONGTYPE for a hash.
    fn string(&self, id: &SessionId) -> Result<Option<Bytes>, Value> {
        match self.session(id).map(Ctx::kind) {
            None => Ok(None),
            Some(Kind::Str(v)) => Ok(Some(v.clone())),
            Some(Kind::Hash(_)) => Err(Value::err(WRONGTYPE)),
        }
    }

    /// The max-inactive interval that keeps `s`'s absolute expiry for a write now.
    fn keep_ttl(&self, s: Option<&Session>) -> u64 {
        match s.and_then(|s| s.expires_at_ms()) {
            Some(t) => t.saturating_sub(self.now).max(1),
            None => 0,
        }
    }

    fn write(&mut self, id: SessionId, ops: Vec<Op>, max_inactive_ms: u64) -> Result<(), Value> {
        match self
            .tx
            .write(id, ops, Some(max_inactive_ms), self.mode, Some(0))
        {
            Ok(None) => Ok(()),
            Ok(Some(t)) => {
                self.writes.push(t);
                Ok(())
            }
            Err(e) => Err(write_error(&e)),
        }
    }

    fn delete(&mut self, id: &SessionId) -> Result<bool, Value> {
        if self.session(id).is_none() {
            return Ok(false);
        }
        self.write(id.clone(), vec![Op::Delete], 0)?;
        Ok(true)
    }

    /// Writes a string value, replacing whatever the key held.
    fn set_string(&mut self, id: SessionId, value: Bytes, ttl_ms: u64) -> Result<(), Value> {
        let mut ops = Vec::new();
        match self.session(&id) {
            Some(s) => {
                ops.extend(
                    s.live_attrs()
                        .filter(|(k, _)| k.as_str() != STRING_ATTR)
                        .map(|(k, _)| Op::Remove { name: k.clone() }),
                );
            }
            None => ops.push(Op::Create),
        }
        ops.push(Op::Set {
            name: STRING_ATTR.into(),
            value,
        });
        self.write(id, ops, ttl_ms)
    }

    /// Sets the absolute expiry of an existing key; an expiry in the past deletes it.
    fn expire_at(&mut self, id: SessionId, at_ms: u64) -> Result<(), Value> {
        if at_ms <= self.now {
            self.delete(&id)?;
            return Ok(());
        }
        self.write(id, vec![Op::MaxInactive], at_ms - self.now)
    }
}

/// The sessions a batch of commands works on, for the runtime to fetch
/// first in backup mode. Malformed keys are left to the commands to refuse.
pub fn keys_of(db: u8, cmds: &[Vec<Bytes>]) -> Vec<SessionId> {
    let mut out = Vec::new();
    for cmd in cmds {
        let Some(name) = cmd.first().map(upper) else {
            continue;
        };
        let args = cmd.get(1..).unwrap_or_default();
        let keys: Vec<&Bytes> = match name.as_str() {
            "MSET" => args.iter().step_by(2).collect(),
            "MGET" | "DEL" | "UNLINK" | "EXISTS" => args.iter().collect(),
            "RENAME" | "RENAMENX" => args.iter().take(2).collect(),
            "SCAN" | "DBSIZE" | "FLUSHDB" | "FLUSHALL" | "PING" | "ECHO" | "TIME" | "UNWATCH" => {
                Vec::new()
            }
            _ => args.iter().take(1).collect(),
        };
        out.extend(keys.into_iter().filter_map(|k| key_in(db, k).ok()));
    }
    out
}

/// The sessions of a list of keys (WATCH), malformed ones left out.
pub fn key_ids(db: u8, keys: &[Bytes]) -> Vec<SessionId> {
    keys.iter().filter_map(|k| key_in(db, k).ok()).collect()
}

fn key_in(db: u8, b: &Bytes) -> Result<SessionId, Value> {
    SessionId::key(b)
        .map(|k| SessionId::in_db(db, k))
        .map_err(|e| Value::err(format!("ERR invalid key: {e}")))
}

fn field(b: &Bytes) -> Result<String, Value> {
    match std::str::from_utf8(b) {
        Ok(s) if !s.is_empty() && s != STRING_ATTR => Ok(s.to_owned()),
        _ => Err(Value::err("ERR hash field names must be non-empty UTF-8")),
    }
}

fn int(b: &Bytes) -> Result<i64, Value> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Value::err(NOT_INT))
}

fn upper(b: &Bytes) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

pub fn arity_error(cmd: &str) -> Value {
    Value::err(format!(
        "ERR wrong number of arguments for '{}' command",
        cmd.to_ascii_lowercase()
    ))
}

/// Redis's arity of each command this module runs (the name counts; a
/// negative number is a minimum), or `None` for any other command. `PING`,
/// `ECHO` and `TIME` are answered here too so a transaction can hold them.
pub fn arity(name: &str) -> Option<i32> {
    Some(match name {
        "GET" | "GETDEL" | "PERSIST" | "TTL" | "PTTL" | "TYPE" | "HGETALL" | "HLEN" | "HKEYS"
        | "HVALS" | "INCR" | "DECR" | "EXPIRETIME" | "PEXPIRETIME" => 2,
        "SET" | "MSET" | "EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" | "HMGET" | "HDEL" => -3,
        "SETEX" | "PSETEX" | "HSETNX" | "HINCRBY" => 4,
        "GETEX" | "MGET" | "DEL" | "UNLINK" | "EXISTS" | "SCAN" | "ECHO" | "PING" => match name {
            "ECHO" => 2,
            "PING" => -1,
            _ => -2,
        },
        "RENAME" | "RENAMENX" | "HGET" | "HEXISTS" | "SETNX" | "GETSET" | "INCRBY" | "DECRBY" => 3,
        "DBSIZE" | "TIME" | "UNWATCH" => 1,
        "HSET" | "HMSET" => -4,
        "FLUSHDB" | "FLUSHALL" => -1,
        _ => return None,
    })
}

/// Whether `name` is a data command this module runs (on the core task).
pub fn is_data_command(name: &str) -> bool {
    !matches!(name, "PING" | "ECHO" | "TIME" | "UNWATCH") && arity(name).is_some()
}

/// Whether `args` fit `name`'s arity (what Redis checks when it queues a
/// command inside MULTI).
pub fn arity_ok(name: &str, argc: usize) -> bool {
    match arity(name) {
        Some(n) if n >= 0 => argc == n as usize,
        Some(n) => argc >= n.unsigned_abs() as usize,
        None => false,
    }
}

mod glob;
mod hashes;
mod keys;
mod strings;

pub use glob::glob;

/// A command's name (upper case) and arguments.
pub(super) struct Args<'a> {
    pub(super) name: &'a str,
    pub(super) a: &'a [Bytes],
}

impl Args<'_> {
    /// At least `min` arguments, or exactly `min` when `exact`.
    pub(super) fn need(&self, min: usize, exact: bool) -> Result<(), Value> {
        if self.a.len() < min || (exact && self.a.len() != min) {
            Err(arity_error(self.name))
        } else {
            Ok(())
        }
    }
}

pub const COMMAND_COUNT: i64 = 66;

/// A key's version for WATCH: it changes with every write to the key, local
/// or from a peer, and when the key expires or is deleted.
pub fn fingerprint(tx: &Tx<'_>, db: u8, raw: &Bytes) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Ok(id) = key_in(db, raw) {
        match tx.core().store.get(&id, tx.now(), 0) {
            Ok(s) => {
                (s.meta_hlc, s.cleared, s.expires_at_ms()).hash(&mut h);
                for (k, a) in s.attrs.iter() {
                    (k, a.hlc, a.value.is_some()).hash(&mut h);
                }
            }
            Err(_) => 0u8.hash(&mut h),
        }
    }
    h.finish()
}

/// EXEC: the queued commands in one go, their writes one atomic group that
/// every peer applies at once; `None` (a null reply) when a watched key
/// changed since WATCH.
pub fn exec_multi(
    tx: &mut Tx<'_>,
    st: &mut RedisState,
    db: u8,
    cmds: &[Vec<Bytes>],
    watched: &[(u8, Bytes, u64)],
) -> Step<Option<Vec<Value>>> {
    if watched.iter().any(|(d, k, v)| fingerprint(tx, *d, k) != *v) {
        return Step::Ready(None);
    }
    tx.core_mut().begin_group();
    let step = exec(tx, st, db, cmds);
    tx.core_mut().end_group();
    match step {
        Step::Ready(v) => Step::Ready(Some(v)),
        Step::After(f) => Step::after(move |r| Some(f(r))),
    }
}

/// Runs data commands in order, in one transaction; the replies are ready
/// once every write they made is done (a failed write turns its command's
/// reply into an error).
pub fn exec(tx: &mut Tx<'_>, st: &mut RedisState, db: u8, cmds: &[Vec<Bytes>]) -> Step<Vec<Value>> {
    let mut values = Vec::with_capacity(cmds.len());
    let mut waits: Vec<(Ticket, usize)> = Vec::new();
    for (i, args) in cmds.iter().enumerate() {
        let now = tx.now();
        let mut c = Ctx {
            tx,
            now,
            writes: Vec::new(),
            mode: st.send,
            db,
        };
        let value = match run(&mut c, st, args) {
            Ok(v) | Err(v) => v,
        };
        waits.extend(c.writes.into_iter().map(|t| (t, i)));
        values.push(value);
    }
    if waits.is_empty() {
        return Step::Ready(values);
    }
    Step::after(move |results| {
        for (t, i) in waits {
            if let Some(Err(e)) = results.get(t.0) {
                values[i] = write_error(e);
            }
        }
        values
    })
}

fn run(c: &mut Ctx<'_, '_>, st: &mut RedisState, raw: &[Bytes]) -> Result<Value, Value> {
    let name = raw.first().map(upper).unwrap_or_default();
    let args = Args {
        name: &name,
        a: raw.get(1..).unwrap_or_default(),
    };
    if !arity_ok(&name, raw.len()) {
        return Err(if arity(&name).is_some() {
            arity_error(&name)
        } else {
            unknown_command(raw)
        });
    }
    match name.as_str() {
        "PING" if args.a.len() > 1 => return Err(arity_error(&name)),
        "PING" => {
            return Ok(args
                .a
                .first()
                .map_or(Value::Simple("PONG".into()), |m| Value::Bulk(m.clone())))
        }
        "ECHO" => return Ok(Value::Bulk(args.a[0].clone())),
        "TIME" => return Ok(time_reply()),
        // Inside MULTI, UNWATCH is queued and answers OK (the watches end with EXEC anyway).
        "UNWATCH" => return Ok(Value::ok()),
        _ => {}
    }
    if let Err(e) = c.tx.core().check_serving() {
        return Err(write_error(&e));
    }
    match name.as_str() {
        "GET" => strings::get(c, &args),
        "SETNX" => strings::setnx(c, &args),
        "GETSET" => strings::getset(c, &args),
        "INCR" | "DECR" | "INCRBY" | "DECRBY" => strings::incr(c, &args),
        "HSETNX" => hashes::hsetnx(c, &args),
        "HINCRBY" => hashes::hincrby(c, &args),
        "EXPIRETIME" | "PEXPIRETIME" => keys::expiretime(c, &args),
        "SET" => strings::set(c, &args),
        "SETEX" | "PSETEX" => strings::setex(c, &args),
        "GETEX" => strings::getex(c, &args),
        "GETDEL" => strings::getdel(c, &args),
        "MGET" => strings::mget(c, &args),
        "MSET" => strings::mset(c, &args),
        "DEL" | "UNLINK" => keys::del(c, &args),
        "EXISTS" => keys::exists(c, &args),
        "EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" => keys::expire(c, &args),
        "PERSIST" => keys::persist(c, &args),
        "TTL" | "PTTL" => keys::ttl(c, &args),
        "RENAME" | "RENAMENX" => keys::rename(c, &args),
        "TYPE" => keys::key_type(c, &args),
        "SCAN" => keys::scan(c, st, &args),
        "DBSIZE" => keys::dbsize(c, &args),
        "FLUSHDB" | "FLUSHALL" => keys::flushdb(c, st, &args),
        "HSET" | "HMSET" => hashes::hset(c, &args),
        "HGET" => hashes::hget(c, &args),
        "HMGET" => hashes::hmget(c, &args),
        "HGETALL" | "HKEYS" | "HVALS" | "HLEN" => hashes::hgetall(c, &args),
        "HDEL" => hashes::hdel(c, &args),
        "HEXISTS" => hashes::hexists(c, &args),
        _ => Err(unknown_command(raw)),
    }
}

/// TIME: seconds and microseconds of the member's clock.
pub fn time_reply() -> Value {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Value::Array(vec![
        Value::str(&d.as_secs().to_string()),
        Value::str(&d.subsec_micros().to_string()),
    ])
}

pub fn unknown_command(args: &[Bytes]) -> Value {
    let name = args
        .first()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    let rest: String = args
        .iter()
        .skip(1)
        .take(20)
        .map(|a| format!("'{}' ", String::from_utf8_lossy(a)))
        .collect();
    Value::err(format!(
        "ERR unknown command '{name}', with args beginning with: {rest}"
    ))
}

#[cfg(test)]
mod tests;
