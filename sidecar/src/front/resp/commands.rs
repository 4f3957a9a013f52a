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
use crate::core::WriteError;
use crate::front::resp::protocol::Value;
use crate::node::{Step, Ticket, Tx};
use bytes::Bytes;
use std::collections::HashMap;

/// The attribute holding a string key's value.
pub const STRING_ATTR: &str = "\u{0}";

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";
const SYNTAX: &str = "ERR syntax error";
const NOT_INT: &str = "ERR value is not an integer or out of range";

/// Cursors of running SCANs: a cursor number names the last key returned.
#[derive(Default)]
pub struct RedisState {
    scans: HashMap<u64, (SessionId, u64)>,
    next_scan: u64,
}

pub fn write_error(e: &WriteError) -> Value {
    match e {
        WriteError::NotReady => Value::err("LOADING sessionmesh is loading the dataset in memory"),
        WriteError::Leaving => Value::err("ERR this member is leaving the cluster"),
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
}

enum Kind<'s> {
    Str(&'s Bytes),
    Hash(&'s Session),
}

impl Ctx<'_, '_> {
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
        match self.tx.write(id, ops, Some(max_inactive_ms), None, Some(0)) {
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

fn key(b: &Bytes) -> Result<SessionId, Value> {
    SessionId::key(b).map_err(|e| Value::err(format!("ERR invalid key: {e}")))
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

/// Whether `name` is a data command this module runs.
pub fn is_data_command(name: &str) -> bool {
    matches!(
        name,
        "GET"
            | "SET"
            | "SETEX"
            | "PSETEX"
            | "GETEX"
            | "GETDEL"
            | "MGET"
            | "MSET"
            | "DEL"
            | "UNLINK"
            | "EXISTS"
            | "EXPIRE"
            | "PEXPIRE"
            | "EXPIREAT"
            | "PEXPIREAT"
            | "PERSIST"
            | "TTL"
            | "PTTL"
            | "RENAME"
            | "RENAMENX"
            | "TYPE"
            | "SCAN"
            | "DBSIZE"
            | "HSET"
            | "HMSET"
            | "HGET"
            | "HMGET"
            | "HGETALL"
            | "HDEL"
            | "HEXISTS"
            | "HLEN"
            | "HKEYS"
            | "HVALS"
            | "FLUSHDB"
            | "FLUSHALL"
    )
}

pub const COMMAND_COUNT: i64 = 52;

/// Runs data commands in order, in one transaction; the replies are ready
/// once every write they made is done (a failed write turns its command's
/// reply into an error).
pub fn exec(tx: &mut Tx<'_>, st: &mut RedisState, cmds: &[Vec<Bytes>]) -> Step<Vec<Value>> {
    let mut values = Vec::with_capacity(cmds.len());
    let mut waits: Vec<(Ticket, usize)> = Vec::new();
    for (i, args) in cmds.iter().enumerate() {
        let now = tx.now();
        let mut c = Ctx {
            tx,
            now,
            writes: Vec::new(),
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

fn run(c: &mut Ctx<'_, '_>, st: &mut RedisState, args: &[Bytes]) -> Result<Value, Value> {
    let name = args.first().map(upper).unwrap_or_default();
    let a = &args[1..];
    let need = |min: usize, exact: bool| -> Result<(), Value> {
        if a.len() < min || (exact && a.len() != min) {
            Err(arity_error(&name))
        } else {
            Ok(())
        }
    };
    if let Err(e) = c.tx.core().check_serving() {
        return Err(write_error(&e));
    }
    match name.as_str() {
        "GET" => {
            need(1, true)?;
            let id = key(&a[0])?;
            Ok(c.string(&id)?.map_or(Value::Null, Value::Bulk))
        }
        "SET" => {
            need(2, false)?;
            let id = key(&a[0])?;
            let (mut ttl, mut nx, mut xx, mut keep, mut get) =
                (None::<u64>, false, false, false, false);
            let mut i = 2;
            while i < a.len() {
                let opt = upper(&a[i]);
                match opt.as_str() {
                    "NX" => nx = true,
                    "XX" => xx = true,
                    "KEEPTTL" => keep = true,
                    "GET" => get = true,
                    "EX" | "PX" | "EXAT" | "PXAT" => {
                        if ttl.is_some() || i + 1 >= a.len() {
                            return Err(Value::err(SYNTAX));
                        }
                        let n = int(&a[i + 1])?;
                        if n <= 0 {
                            return Err(Value::err("ERR invalid expire time in 'set' command"));
                        }
                        let n = n as u64;
                        let rel = match opt.as_str() {
                            "EX" => n.saturating_mul(1000),
                            "PX" => n,
                            "EXAT" => n.saturating_mul(1000).saturating_sub(c.now),
                            _ => n.saturating_sub(c.now),
                        };
                        ttl = Some(rel.max(1));
                        i += 1;
                    }
                    _ => return Err(Value::err(SYNTAX)),
                }
                i += 1;
            }
            if (nx && xx) || (keep && ttl.is_some()) {
                return Err(Value::err(SYNTAX));
            }
            let cur = c.session(&id);
            let old = match cur.map(Ctx::kind) {
                Some(Kind::Hash(_)) if get => return Err(Value::err(WRONGTYPE)),
                Some(Kind::Str(v)) => Some(v.clone()),
                _ => None,
            };
            let exists = cur.is_some();
            if (nx && exists) || (xx && !exists) {
                return Ok(if get {
                    old.map_or(Value::Null, Value::Bulk)
                } else {
                    Value::Null
                });
            }
            let ttl = match (ttl, keep) {
                (Some(t), _) => t,
                (None, true) => c.keep_ttl(cur),
                (None, false) => 0,
            };
            c.set_string(id, a[1].clone(), ttl)?;
            Ok(if get {
                old.map_or(Value::Null, Value::Bulk)
            } else {
                Value::ok()
            })
        }
        "SETEX" | "PSETEX" => {
            need(3, true)?;
            let id = key(&a[0])?;
            let n = int(&a[1])?;
            if n <= 0 {
                return Err(Value::err(format!(
                    "ERR invalid expire time in '{}' command",
                    name.to_ascii_lowercase()
                )));
            }
            let ttl = if name == "SETEX" {
                (n as u64).saturating_mul(1000)
            } else {
                n as u64
            };
            c.set_string(id, a[2].clone(), ttl)?;
            Ok(Value::ok())
        }
        "GETEX" => {
            need(1, false)?;
            let id = key(&a[0])?;
            let Some(v) = c.string(&id)? else {
                return Ok(Value::Null);
            };
            match a.len() {
                1 => {}
                2 if upper(&a[1]) == "PERSIST" => c.write(id, vec![Op::MaxInactive], 0)?,
                3 => {
                    let n = int(&a[2])?;
                    if n <= 0 {
                        return Err(Value::err("ERR invalid expire time in 'getex' command"));
                    }
                    let n = n as u64;
                    let at = match upper(&a[1]).as_str() {
                        "EX" => c.now + n.saturating_mul(1000),
                        "PX" => c.now + n,
                        "EXAT" => n.saturating_mul(1000),
                        "PXAT" => n,
                        _ => return Err(Value::err(SYNTAX)),
                    };
                    c.expire_at(id, at)?;
                }
                _ => return Err(Value::err(SYNTAX)),
            }
            Ok(Value::Bulk(v))
        }
        "GETDEL" => {
            need(1, true)?;
            let id = key(&a[0])?;
            let Some(v) = c.string(&id)? else {
                return Ok(Value::Null);
            };
            c.delete(&id)?;
            Ok(Value::Bulk(v))
        }
        "MGET" => {
            need(1, false)?;
            let mut out = Vec::with_capacity(a.len());
            for k in a {
                let v = key(k)
                    .ok()
                    .and_then(|id| match c.session(&id).map(Ctx::kind) {
                        Some(Kind::Str(v)) => Some(Value::Bulk(v.clone())),
                        _ => None,
                    });
                out.push(v.unwrap_or(Value::Null));
            }
            Ok(Value::Array(out))
        }
        "MSET" => {
            if a.is_empty() || a.len() % 2 != 0 {
                return Err(arity_error(&name));
            }
            let pairs: Vec<(SessionId, Bytes)> = a
                .chunks(2)
                .map(|p| Ok((key(&p[0])?, p[1].clone())))
                .collect::<Result<_, Value>>()?;
            for (id, v) in pairs {
                c.set_string(id, v, 0)?;
            }
            Ok(Value::ok())
        }
        "DEL" | "UNLINK" => {
            need(1, false)?;
            let mut n = 0;
            for k in a {
                if c.delete(&key(k)?)? {
                    n += 1;
                }
            }
            Ok(Value::Int(n))
        }
        "EXISTS" => {
            need(1, false)?;
            let n = a
                .iter()
                .filter(|k| key(k).ok().is_some_and(|id| c.session(&id).is_some()))
                .count();
            Ok(Value::Int(n as i64))
        }
        "EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" => {
            need(2, false)?;
            let id = key(&a[0])?;
            let n = int(&a[1])?;
            let at: i128 = match name.as_str() {
                "EXPIRE" => c.now as i128 + n as i128 * 1000,
                "PEXPIRE" => c.now as i128 + n as i128,
                "EXPIREAT" => n as i128 * 1000,
                _ => n as i128,
            };
            let at = at.clamp(0, u64::MAX as i128 / 2) as u64;
            let Some(s) = c.session(&id) else {
                return Ok(Value::Int(0));
            };
            let cur = s.expires_at_ms();
            let mut cond = None;
            for o in &a[2..] {
                let o = upper(o);
                if !matches!(o.as_str(), "NX" | "XX" | "GT" | "LT") || cond.is_some() {
                    return Err(Value::err(SYNTAX));
                }
                cond = Some(o);
            }
            let ok = match cond.as_deref() {
                Some("NX") => cur.is_none(),
                Some("XX") => cur.is_some(),
                Some("GT") => cur.is_some_and(|t| at > t),
                Some("LT") => cur.is_none_or(|t| at < t),
                _ => true,
            };
            if !ok {
                return Ok(Value::Int(0));
            }
            c.expire_at(id, at)?;
            Ok(Value::Int(1))
        }
        "PERSIST" => {
            need(1, true)?;
            let id = key(&a[0])?;
            match c.session(&id).map(|s| s.expires_at_ms()) {
                Some(Some(_)) => {
                    c.write(id, vec![Op::MaxInactive], 0)?;
                    Ok(Value::Int(1))
                }
                _ => Ok(Value::Int(0)),
            }
        }
        "TTL" | "PTTL" => {
            need(1, true)?;
            let id = key(&a[0])?;
            Ok(Value::Int(
                match c.session(&id).map(|s| s.expires_at_ms()) {
                    None => -2,
                    Some(None) => -1,
                    Some(Some(t)) => {
                        let ms = t.saturating_sub(c.now) as i64;
                        if name == "TTL" {
                            (ms + 500) / 1000
                        } else {
                            ms
                        }
                    }
                },
            ))
        }
        "RENAME" | "RENAMENX" => {
            need(2, true)?;
            let (from, to) = (key(&a[0])?, key(&a[1])?);
            let Some(s) = c.session(&from) else {
                return Err(Value::err("ERR no such key"));
            };
            let ttl = c.keep_ttl(Some(s));
            let attrs: Vec<Op> = s
                .live_attrs()
                .map(|(k, v)| Op::Set {
                    name: k.clone(),
                    value: v.clone(),
                })
                .collect();
            if from == to {
                return Ok(if name == "RENAME" {
                    Value::ok()
                } else {
                    Value::Int(0)
                });
            }
            if c.session(&to).is_some() {
                if name == "RENAMENX" {
                    return Ok(Value::Int(0));
                }
                c.delete(&to)?;
            }
            let mut ops = vec![Op::Create];
            ops.extend(attrs);
            c.write(to, ops, ttl)?;
            c.delete(&from)?;
            Ok(if name == "RENAME" {
                Value::ok()
            } else {
                Value::Int(1)
            })
        }
        "TYPE" => {
            need(1, true)?;
            let id = key(&a[0])?;
            Ok(Value::Simple(
                match c.session(&id).map(Ctx::kind) {
                    None => "none",
                    Some(Kind::Str(_)) => "string",
                    Some(Kind::Hash(_)) => "hash",
                }
                .into(),
            ))
        }
        "SCAN" => {
            need(1, false)?;
            let cursor = std::str::from_utf8(&a[0])
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| Value::err("ERR invalid cursor"))?;
            let (mut pattern, mut count, mut ty) = (None, 10usize, None);
            let mut i = 1;
            while i < a.len() {
                let v = a.get(i + 1).ok_or_else(|| Value::err(SYNTAX))?;
                match upper(&a[i]).as_str() {
                    "MATCH" => pattern = Some(v.clone()),
                    "COUNT" => count = int(v)?.clamp(1, 100_000) as usize,
                    "TYPE" => ty = Some(String::from_utf8_lossy(v).to_ascii_lowercase()),
                    _ => return Err(Value::err(SYNTAX)),
                }
                i += 2;
            }
            let start = if cursor == 0 {
                None
            } else {
                Some(
                    st.scans
                        .remove(&cursor)
                        .map(|(k, _)| k)
                        .ok_or_else(|| Value::err("ERR invalid cursor"))?,
                )
            };
            let ids = c.tx.core().store.list(start.as_ref(), count, c.now, 0);
            let mut keys = Vec::new();
            for id in &ids {
                if pattern
                    .as_ref()
                    .is_some_and(|p| !glob(p, id.as_str().as_bytes()))
                {
                    continue;
                }
                let Some(s) = c.session(id) else { continue };
                let t = match Ctx::kind(s) {
                    Kind::Str(_) => "string",
                    Kind::Hash(_) => "hash",
                };
                if ty.as_deref().is_some_and(|want| want != t) {
                    continue;
                }
                keys.push(Value::str(id.as_str()));
            }
            let next = match ids.last() {
                Some(last) if ids.len() == count => {
                    // Forget cursors nobody came back for.
                    if st.scans.len() > 4096 {
                        let cutoff = c.now.saturating_sub(60_000);
                        st.scans.retain(|_, (_, t)| *t >= cutoff);
                    }
                    st.next_scan += 1;
                    st.scans.insert(st.next_scan, (last.clone(), c.now));
                    st.next_scan
                }
                _ => 0,
            };
            Ok(Value::Array(vec![
                Value::str(&next.to_string()),
                Value::Array(keys),
            ]))
        }
        "DBSIZE" => {
            need(0, true)?;
            Ok(Value::Int(c.tx.core().store.live_count() as i64))
        }
        "FLUSHDB" | "FLUSHALL" => Err(Value::err(
            "ERR FLUSHDB is disabled: it would delete every user's session on every member",
        )),
        "HSET" | "HMSET" => {
            if a.len() < 3 || a.len() % 2 != 1 {
                return Err(arity_error(&name));
            }
            let id = key(&a[0])?;
            let cur = c.session(&id);
            let mut added = 0;
            let mut ops = Vec::new();
            match cur.map(Ctx::kind) {
                Some(Kind::Str(_)) => return Err(Value::err(WRONGTYPE)),
                Some(Kind::Hash(_)) => {}
                None => ops.push(Op::Create),
            }
            for p in a[1..].chunks(2) {
                let f = field(&p[0])?;
                if cur
                    .and_then(|s| s.attrs.get(&f))
                    .and_then(|x| x.value.as_ref())
                    .is_none()
                    && !ops
                        .iter()
                        .any(|o| matches!(o, Op::Set { name, .. } if *name == f))
                {
                    added += 1;
                }
                ops.push(Op::Set {
                    name: f,
                    value: p[1].clone(),
                });
            }
            let ttl = c.keep_ttl(cur);
            c.write(id, ops, ttl)?;
            Ok(if name == "HSET" {
                Value::Int(added)
            } else {
                Value::ok()
            })
        }
        "HGET" => {
            need(2, true)?;
            let id = key(&a[0])?;
            match c.session(&id).map(Ctx::kind) {
                None => Ok(Value::Null),
                Some(Kind::Str(_)) => Err(Value::err(WRONGTYPE)),
                Some(Kind::Hash(s)) => {
                    let f = field(&a[1])?;
                    Ok(s.attrs
                        .get(&f)
                        .and_then(|x| x.value.clone())
                        .map_or(Value::Null, Value::Bulk))
                }
            }
        }
        "HMGET" => {
            need(2, false)?;
            let id = key(&a[0])?;
            let s = match c.session(&id).map(Ctx::kind) {
                Some(Kind::Str(_)) => return Err(Value::err(WRONGTYPE)),
                Some(Kind::Hash(s)) => Some(s),
                None => None,
            };
            Ok(Value::Array(
                a[1..]
                    .iter()
                    .map(|f| {
                        let f = String::from_utf8_lossy(f);
                        s.and_then(|s| s.attrs.get(&f))
                            .and_then(|x| x.value.clone())
                            .map_or(Value::Null, Value::Bulk)
                    })
                    .collect(),
            ))
        }
        "HGETALL" | "HKEYS" | "HVALS" | "HLEN" => {
            need(1, true)?;
            let id = key(&a[0])?;
            let s = match c.session(&id).map(Ctx::kind) {
                Some(Kind::Str(_)) => return Err(Value::err(WRONGTYPE)),
                Some(Kind::Hash(s)) => Some(s),
                None => None,
            };
            let pairs: Vec<(&String, &Bytes)> =
                s.map(|s| s.live_attrs().collect()).unwrap_or_default();
            Ok(match name.as_str() {
                "HGETALL" => Value::Map(
                    pairs
                        .into_iter()
                        .map(|(k, v)| (Value::str(k), Value::Bulk(v.clone())))
                        .collect(),
                ),
                "HKEYS" => Value::Array(pairs.into_iter().map(|(k, _)| Value::str(k)).collect()),
                "HVALS" => Value::Array(
                    pairs
                        .into_iter()
                        .map(|(_, v)| Value::Bulk(v.clone()))
                        .collect(),
                ),
                _ => Value::Int(pairs.len() as i64),
            })
        }
        "HDEL" => {
            need(2, false)?;
            let id = key(&a[0])?;
            let s = match c.session(&id).map(Ctx::kind) {
                Some(Kind::Str(_)) => return Err(Value::err(WRONGTYPE)),
                Some(Kind::Hash(s)) => s,
                None => return Ok(Value::Int(0)),
            };
            let present: Vec<String> = a[1..]
                .iter()
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .filter(|f| s.attrs.get(f).and_then(|x| x.value.as_ref()).is_some())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let remaining = s.live_attrs().count() - present.len();
            let ttl = c.keep_ttl(Some(s));
            let n = present.len() as i64;
            if n == 0 {
                return Ok(Value::Int(0));
            }
            if remaining == 0 {
                // Redis removes a hash with no fields.
                c.delete(&id)?;
            } else {
                c.write(
                    id,
                    present
                        .into_iter()
                        .map(|name| Op::Remove { name })
                        .collect(),
                    ttl,
                )?;
            }
            Ok(Value::Int(n))
        }
        "HEXISTS" => {
            need(2, true)?;
            let id = key(&a[0])?;
            match c.session(&id).map(Ctx::kind) {
                Some(Kind::Str(_)) => Err(Value::err(WRONGTYPE)),
                Some(Kind::Hash(s)) => {
                    let f = String::from_utf8_lossy(&a[1]);
                    Ok(Value::Int(
                        s.attrs.get(&f).and_then(|x| x.value.as_ref()).is_some() as i64,
                    ))
                }
                None => Ok(Value::Int(0)),
            }
        }
        _ => Err(unknown_command(args)),
    }
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

/// Redis glob matching: `*`, `?`, `[abc]`, `[^a]`, `[a-z]`, `\x`.
pub fn glob(pattern: &[u8], s: &[u8]) -> bool {
    // Iterative, with backtracking only to the last `*`: O(len(pattern) x
    // len(s)) whatever the pattern. A recursive matcher is exponential on
    // patterns like `a*a*a*a*b` (Redis had this flaw, CVE-2022-36021), and it
    // runs on the core task.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if p_at(pattern, pi) == Some(b'*') {
            while p_at(pattern, pi) == Some(b'*') {
                pi += 1;
            }
            star = Some((pi, si));
            continue;
        }
        if let Some(next) = glob_one(pattern, pi, s[si]) {
            pi = next;
            si += 1;
            continue;
        }
        match star {
            // Let the last `*` take one more byte and try again from there.
            Some((after_star, taken)) => {
                pi = after_star;
                si = taken + 1;
                star = Some((after_star, taken + 1));
            }
            None => return false,
        }
    }
    while p_at(pattern, pi) == Some(b'*') {
        pi += 1;
    }
    pi == pattern.len()
}

fn p_at(p: &[u8], i: usize) -> Option<u8> {
    p.get(i).copied()
}

/// Matches one byte against the pattern element at `pi` (not `*`): the index
/// after the element when it matches.
fn glob_one(p: &[u8], pi: usize, c: u8) -> Option<usize> {
    match p.get(pi)? {
        b'?' => Some(pi + 1),
        b'[' => {
            let mut i = pi + 1;
            let neg = p.get(i) == Some(&b'^');
            if neg {
                i += 1;
            }
            let mut hit = false;
            while i < p.len() && p[i] != b']' {
                if p[i] == b'\\' && i + 1 < p.len() {
                    hit |= p[i + 1] == c;
                    i += 2;
                } else if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
                    let (lo, hi) = (p[i].min(p[i + 2]), p[i].max(p[i + 2]));
                    hit |= (lo..=hi).contains(&c);
                    i += 3;
                } else {
                    hit |= p[i] == c;
                    i += 1;
                }
            }
            // An unterminated class matches nothing.
            (i < p.len() && hit != neg).then_some(i + 1)
        }
        b'\\' if pi + 1 < p.len() => (p[pi + 1] == c).then_some(pi + 2),
        &lit => (lit == c).then_some(pi + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::identity::{Generation, NodeId};
    use crate::core::{Core, CoreConfig, Phase};

    fn core() -> Core {
        let mut c = Core::new(
            NodeId {
                name: "a".into(),
                generation: Generation(1),
            },
            CoreConfig::default(),
            &[],
            0,
        );
        c.tick(1);
        assert_eq!(c.phase(), &Phase::Ready);
        c
    }

    fn run(c: &mut Core, st: &mut RedisState, now: u64, cmd: &[&str]) -> Value {
        let args: Vec<Bytes> = cmd
            .iter()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect();
        let mut w = 1;
        let mut tx = Tx::new(c, now, &mut w);
        match exec(&mut tx, st, &[args]) {
            Step::Ready(mut v) => v.remove(0),
            Step::After(_) => panic!("a single member never waits"),
        }
    }

    #[test]
    fn strings_ttls_and_types() {
        let (mut c, mut st) = (core(), RedisState::default());
        assert_eq!(
            run(&mut c, &mut st, 1000, &["SET", "k", "v", "PX", "2000"]),
            Value::ok()
        );
        assert_eq!(run(&mut c, &mut st, 1500, &["GET", "k"]), Value::str("v"));
        assert_eq!(run(&mut c, &mut st, 1500, &["PTTL", "k"]), Value::Int(1500));
        assert_eq!(run(&mut c, &mut st, 1500, &["TTL", "k"]), Value::Int(2));
        assert_eq!(
            run(&mut c, &mut st, 1500, &["SET", "k", "w", "KEEPTTL"]),
            Value::ok()
        );
        assert_eq!(
            run(&mut c, &mut st, 1600, &["PTTL", "k"]),
            Value::Int(1400),
            "KEEPTTL kept the absolute expiry"
        );
        assert_eq!(
            run(&mut c, &mut st, 3000, &["GET", "k"]),
            Value::Null,
            "expired exactly at its time"
        );
        assert_eq!(run(&mut c, &mut st, 3000, &["TTL", "k"]), Value::Int(-2));
        assert_eq!(
            run(&mut c, &mut st, 3000, &["SET", "k", "again", "NX"]),
            Value::ok()
        );
        assert_eq!(run(&mut c, &mut st, 3000, &["TTL", "k"]), Value::Int(-1));
        assert_eq!(
            run(&mut c, &mut st, 3000, &["SET", "k", "x", "NX"]),
            Value::Null
        );
        assert_eq!(
            run(&mut c, &mut st, 3000, &["SET", "k", "x", "XX", "GET"]),
            Value::str("again")
        );
        assert_eq!(
            run(&mut c, &mut st, 3000, &["TYPE", "k"]),
            Value::Simple("string".into())
        );
        assert_eq!(
            run(&mut c, &mut st, 3000, &["HSET", "k", "f", "v"]),
            Value::err(WRONGTYPE)
        );
        assert_eq!(
            run(&mut c, &mut st, 3000, &["DEL", "k", "nope"]),
            Value::Int(1)
        );
        assert_eq!(run(&mut c, &mut st, 3000, &["EXISTS", "k"]), Value::Int(0));
        assert_eq!(
            run(&mut c, &mut st, 3000, &["SET", "k", "reborn"]),
            Value::ok(),
            "a deleted key can be set again"
        );
        assert_eq!(
            run(&mut c, &mut st, 3000, &["GETDEL", "k"]),
            Value::str("reborn")
        );
        assert_eq!(
            run(&mut c, &mut st, 3000, &["SET", "k", "v", "EX", "0"]),
            Value::err("ERR invalid expire time in 'set' command")
        );
        assert_eq!(
            run(&mut c, &mut st, 3000, &["SET", "k", "v", "BOGUS"]),
            Value::err(SYNTAX)
        );
        assert_eq!(
            run(&mut c, &mut st, 3000, &["GET"]),
            Value::err("ERR wrong number of arguments for 'get' command")
        );
    }

    #[test]
    fn expire_family() {
        let (mut c, mut st) = (core(), RedisState::default());
        run(&mut c, &mut st, 1000, &["SET", "k", "v"]);
        assert_eq!(
            run(&mut c, &mut st, 1000, &["EXPIRE", "k", "10", "XX"]),
            Value::Int(0)
        );
        assert_eq!(
            run(&mut c, &mut st, 1000, &["EXPIRE", "k", "10"]),
            Value::Int(1)
        );
        assert_eq!(
            run(&mut c, &mut st, 1000, &["PEXPIREAT", "k", "5000"]),
            Value::Int(1)
        );
        assert_eq!(run(&mut c, &mut st, 1000, &["PTTL", "k"]), Value::Int(4000));
        assert_eq!(
            run(&mut c, &mut st, 1000, &["EXPIRE", "k", "100", "LT"]),
            Value::Int(0)
        );
        assert_eq!(run(&mut c, &mut st, 1000, &["PERSIST", "k"]), Value::Int(1));
        assert_eq!(run(&mut c, &mut st, 1000, &["TTL", "k"]), Value::Int(-1));
        assert_eq!(
            run(&mut c, &mut st, 1000, &["EXPIRE", "k", "-1"]),
            Value::Int(1)
        );
        assert_eq!(
            run(&mut c, &mut st, 1000, &["EXISTS", "k"]),
            Value::Int(0),
            "a past expiry deletes"
        );
        assert_eq!(
            run(&mut c, &mut st, 1000, &["EXPIRE", "missing", "10"]),
            Value::Int(0)
        );
    }

    #[test]
    fn hashes_like_spring_session() {
        let (mut c, mut st) = (core(), RedisState::default());
        assert_eq!(
            run(&mut c, &mut st, 1000, &["HSET", "h", "a", "1", "b", "2"]),
            Value::Int(2)
        );
        assert_eq!(
            run(&mut c, &mut st, 1000, &["HMSET", "h", "b", "3", "c", ""]),
            Value::ok()
        );
        assert_eq!(
            run(&mut c, &mut st, 1000, &["HGET", "h", "b"]),
            Value::str("3")
        );
        assert_eq!(run(&mut c, &mut st, 1000, &["HLEN", "h"]), Value::Int(3));
        assert_eq!(
            run(&mut c, &mut st, 1000, &["PEXPIREAT", "h", "61000"]),
            Value::Int(1)
        );
        assert_eq!(
            run(&mut c, &mut st, 1000, &["HGETALL", "h"]),
            Value::Map(vec![
                (Value::str("a"), Value::str("1")),
                (Value::str("b"), Value::str("3")),
                (Value::str("c"), Value::str(""))
            ])
        );
        assert_eq!(
            run(&mut c, &mut st, 1000, &["HDEL", "h", "a", "a", "zz"]),
            Value::Int(1)
        );
        assert_eq!(
            run(&mut c, &mut st, 2000, &["PTTL", "h"]),
            Value::Int(59000),
            "hash writes keep the TTL"
        );
        assert_eq!(
            run(&mut c, &mut st, 1000, &["HEXISTS", "h", "a"]),
            Value::Int(0)
        );
        assert_eq!(
            run(&mut c, &mut st, 1000, &["GET", "h"]),
            Value::err(WRONGTYPE)
        );
        assert_eq!(
            run(&mut c, &mut st, 1000, &["RENAME", "h", "h2"]),
            Value::ok()
        );
        assert_eq!(
            run(&mut c, &mut st, 1000, &["HKEYS", "h2"]),
            Value::Array(vec![Value::str("b"), Value::str("c")])
        );
        assert_eq!(run(&mut c, &mut st, 1000, &["EXISTS", "h"]), Value::Int(0));
        assert_eq!(
            run(&mut c, &mut st, 1000, &["HDEL", "h2", "b", "c"]),
            Value::Int(2)
        );
        assert_eq!(
            run(&mut c, &mut st, 1000, &["TYPE", "h2"]),
            Value::Simple("none".into())
        );
        assert_eq!(
            run(&mut c, &mut st, 1000, &["RENAME", "nope", "x"]),
            Value::err("ERR no such key")
        );
    }

    #[test]
    fn scan_walks_every_key_once() {
        let (mut c, mut st) = (core(), RedisState::default());
        for i in 0..25 {
            run(&mut c, &mut st, 1000, &["SET", &format!("sess:{i}"), "v"]);
        }
        run(&mut c, &mut st, 1000, &["HSET", "other", "f", "v"]);
        let mut cursor = "0".to_owned();
        let mut seen = Vec::new();
        loop {
            let Value::Array(r) = run(
                &mut c,
                &mut st,
                1000,
                &["SCAN", &cursor, "MATCH", "sess:*", "COUNT", "7"],
            ) else {
                panic!()
            };
            let Value::Bulk(next) = &r[0] else { panic!() };
            let Value::Array(keys) = &r[1] else { panic!() };
            seen.extend(keys.iter().cloned());
            cursor = String::from_utf8_lossy(next).into_owned();
            if cursor == "0" {
                break;
            }
        }
        assert_eq!(seen.len(), 25);
        assert_eq!(run(&mut c, &mut st, 1000, &["DBSIZE"]), Value::Int(26));
        assert_eq!(
            run(&mut c, &mut st, 1000, &["SCAN", "12345"]),
            Value::err("ERR invalid cursor")
        );
    }

    /// The former recursive matcher, as a reference for the new one.
    fn glob_reference(pattern: &[u8], s: &[u8]) -> bool {
        fn m(p: &[u8], s: &[u8]) -> bool {
            match p.first() {
                None => s.is_empty(),
                Some(b'*') => (0..=s.len()).any(|i| m(&p[1..], &s[i..])),
                Some(b'?') => !s.is_empty() && m(&p[1..], &s[1..]),
                Some(b'[') => {
                    let Some(&c) = s.first() else { return false };
                    let mut i = 1;
                    let neg = p.get(1) == Some(&b'^');
                    if neg {
                        i += 1;
                    }
                    let mut hit = false;
                    while i < p.len() && p[i] != b']' {
                        if p[i] == b'\\' && i + 1 < p.len() {
                            hit |= p[i + 1] == c;
                            i += 2;
                        } else if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
                            hit |= (p[i].min(p[i + 2])..=p[i].max(p[i + 2])).contains(&c);
                            i += 3;
                        } else {
                            hit |= p[i] == c;
                            i += 1;
                        }
                    }
                    i < p.len() && hit != neg && m(&p[i + 1..], &s[1..])
                }
                Some(b'\\') if p.len() > 1 => s.first() == Some(&p[1]) && m(&p[2..], &s[1..]),
                Some(&c) => s.first() == Some(&c) && m(&p[1..], &s[1..]),
            }
        }
        m(pattern, s)
    }

    proptest::proptest! {
        #[test]
        fn glob_agrees_with_the_recursive_reference(
            p in proptest::collection::vec(proptest::sample::select(b"ab*?[]^-\\".to_vec()), 0..10),
            s in proptest::collection::vec(proptest::sample::select(b"ab-*".to_vec()), 0..10),
        ) {
            proptest::prop_assert_eq!(glob(&p, &s), glob_reference(&p, &s), "pattern {:?} on {:?}", String::from_utf8_lossy(&p), String::from_utf8_lossy(&s));
        }
    }

    #[test]
    fn pathological_patterns_finish_at_once() {
        // Redis's CVE-2022-36021 patterns and worse: exponential for a backtracking matcher.
        let s = vec![b'a'; 4096];
        let t = std::time::Instant::now();
        for p in [
            &b"a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b"[..],
            b"*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b",
            b"[a]*[a]*[a]*[a]*[a]*[a]*[a]*[a]*c",
        ] {
            assert!(!glob(p, &s));
        }
        assert!(glob(b"a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a", &s));
        assert!(
            t.elapsed() < std::time::Duration::from_millis(500),
            "took {:?}",
            t.elapsed()
        );
    }

    #[test]
    fn globs() {
        assert!(glob(b"sess:*", b"sess:abc"));
        assert!(!glob(b"sess:*", b"session"));
        assert!(glob(b"h?llo", b"hello"));
        assert!(glob(b"h[ae]llo", b"hallo"));
        assert!(!glob(b"h[^e]llo", b"hello"));
        assert!(glob(b"h[a-c]llo", b"hbllo"));
        assert!(glob(b"a\\*b", b"a*b"));
        assert!(!glob(b"a\\*b", b"axb"));
    }

    #[test]
    fn unknown_commands_have_redis_shape() {
        let (mut c, mut st) = (core(), RedisState::default());
        assert_eq!(
            run(&mut c, &mut st, 1000, &["FOO", "a", "b"]),
            Value::err("ERR unknown command 'FOO', with args beginning with: 'a' 'b' ")
        );
    }
}
