//! A model of the Redis subset without expiry, as Redis 7 answers it: the
//! differential target runs the same commands against the sidecar's store and
//! against this, and the replies must agree (errors by their first word).

use arbitrary::Arbitrary;
use bytes::Bytes;
use sessionmesh_sidecar::front::resp::protocol::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
enum Entry {
    Str(Bytes),
    Hash(BTreeMap<Bytes, Bytes>),
}

#[derive(Debug, Default)]
pub struct Model {
    keys: BTreeMap<Bytes, Entry>,
}

/// Keys and fields from small alphabets, so commands meet each other's keys.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub struct K(u8);
#[derive(Debug, Clone, Copy, Arbitrary)]
pub struct F(u8);

impl K {
    fn b(self) -> Bytes {
        Bytes::from(format!("key:{}", self.0 % 6))
    }
}
impl F {
    fn b(self) -> Bytes {
        Bytes::from(format!("f{}", self.0 % 4))
    }
}

#[derive(Debug, Clone, Arbitrary)]
pub enum Cmd {
    Set(K, Vec<u8>),
    Get(K),
    Del(Vec<K>),
    Exists(Vec<K>),
    Type(K),
    HSet(K, Vec<(F, Vec<u8>)>),
    HGet(K, F),
    HDel(K, Vec<F>),
    HLen(K),
    HExists(K, F),
    GetDel(K),
    MGet(Vec<K>),
    MSet(Vec<(K, Vec<u8>)>),
    DbSize,
    SetNx(K, Vec<u8>),
    GetSet(K, Vec<u8>),
    /// INCRBY with a small increment, so sums meet the stored numbers.
    IncrBy(K, i8),
    /// SET of a number, so INCRBY finds integers.
    SetInt(K, i64),
    HSetNx(K, F, Vec<u8>),
    HIncrBy(K, F, i8),
}

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";

fn arity(name: &str) -> Value {
    Value::Error(format!(
        "ERR wrong number of arguments for '{}' command",
        name.to_ascii_lowercase()
    ))
}

impl Cmd {
    /// The command as a client sends it.
    pub fn args(&self) -> Vec<Bytes> {
        let mut v: Vec<Bytes> = Vec::new();
        let name = |s: &'static str| Bytes::from_static(s.as_bytes());
        match self {
            Cmd::Set(k, val) => v.extend([name("SET"), k.b(), Bytes::copy_from_slice(val)]),
            Cmd::Get(k) => v.extend([name("GET"), k.b()]),
            Cmd::Del(ks) => {
                v.push(name("DEL"));
                v.extend(ks.iter().map(|k| k.b()));
            }
            Cmd::Exists(ks) => {
                v.push(name("EXISTS"));
                v.extend(ks.iter().map(|k| k.b()));
            }
            Cmd::Type(k) => v.extend([name("TYPE"), k.b()]),
            Cmd::HSet(k, fv) => {
                v.extend([name("HSET"), k.b()]);
                for (f, val) in fv {
                    v.extend([f.b(), Bytes::copy_from_slice(val)]);
                }
            }
            Cmd::HGet(k, f) => v.extend([name("HGET"), k.b(), f.b()]),
            Cmd::HDel(k, fs) => {
                v.extend([name("HDEL"), k.b()]);
                v.extend(fs.iter().map(|f| f.b()));
            }
            Cmd::HLen(k) => v.extend([name("HLEN"), k.b()]),
            Cmd::HExists(k, f) => v.extend([name("HEXISTS"), k.b(), f.b()]),
            Cmd::GetDel(k) => v.extend([name("GETDEL"), k.b()]),
            Cmd::MGet(ks) => {
                v.push(name("MGET"));
                v.extend(ks.iter().map(|k| k.b()));
            }
            Cmd::MSet(kv) => {
                v.push(name("MSET"));
                for (k, val) in kv {
                    v.extend([k.b(), Bytes::copy_from_slice(val)]);
                }
            }
            Cmd::DbSize => v.push(name("DBSIZE")),
            Cmd::SetNx(k, val) => v.extend([name("SETNX"), k.b(), Bytes::copy_from_slice(val)]),
            Cmd::GetSet(k, val) => v.extend([name("GETSET"), k.b(), Bytes::copy_from_slice(val)]),
            Cmd::IncrBy(k, n) => v.extend([name("INCRBY"), k.b(), Bytes::from(n.to_string())]),
            Cmd::SetInt(k, n) => v.extend([name("SET"), k.b(), Bytes::from(n.to_string())]),
            Cmd::HSetNx(k, f, val) => {
                v.extend([name("HSETNX"), k.b(), f.b(), Bytes::copy_from_slice(val)])
            }
            Cmd::HIncrBy(k, f, n) => {
                v.extend([name("HINCRBY"), k.b(), f.b(), Bytes::from(n.to_string())])
            }
        }
        v
    }
}

impl Model {
    fn string(&self, k: &Bytes) -> Result<Option<Bytes>, Value> {
        match self.keys.get(k) {
            None => Ok(None),
            Some(Entry::Str(v)) => Ok(Some(v.clone())),
            Some(Entry::Hash(_)) => Err(Value::Error(WRONGTYPE.into())),
        }
    }

    fn hash(&self, k: &Bytes) -> Result<Option<&BTreeMap<Bytes, Bytes>>, Value> {
        match self.keys.get(k) {
            None => Ok(None),
            Some(Entry::Hash(h)) => Ok(Some(h)),
            Some(Entry::Str(_)) => Err(Value::Error(WRONGTYPE.into())),
        }
    }

    pub fn run(&mut self, c: &Cmd) -> Value {
        match self.exec(c) {
            Ok(v) | Err(v) => v,
        }
    }

    fn exec(&mut self, c: &Cmd) -> Result<Value, Value> {
        Ok(match c {
            Cmd::Set(k, v) => {
                self.keys
                    .insert(k.b(), Entry::Str(Bytes::copy_from_slice(v)));
                Value::ok()
            }
            Cmd::Get(k) => self.string(&k.b())?.map_or(Value::Null, Value::Bulk),
            Cmd::Del(ks) if ks.is_empty() => arity("DEL"),
            Cmd::Del(ks) => Value::Int(
                ks.iter()
                    .filter(|k| self.keys.remove(&k.b()).is_some())
                    .count() as i64,
            ),
            Cmd::Exists(ks) if ks.is_empty() => arity("EXISTS"),
            Cmd::Exists(ks) => {
                Value::Int(ks.iter().filter(|k| self.keys.contains_key(&k.b())).count() as i64)
            }
            Cmd::Type(k) => Value::Simple(
                match self.keys.get(&k.b()) {
                    None => "none",
                    Some(Entry::Str(_)) => "string",
                    Some(Entry::Hash(_)) => "hash",
                }
                .into(),
            ),
            Cmd::HSet(_, fv) if fv.is_empty() => arity("HSET"),
            Cmd::HSet(k, fv) => {
                self.hash(&k.b())?;
                let Entry::Hash(h) = self
                    .keys
                    .entry(k.b())
                    .or_insert_with(|| Entry::Hash(BTreeMap::new()))
                else {
                    return Err(Value::Error(WRONGTYPE.into()));
                };
                let mut added = 0;
                for (f, v) in fv {
                    if h.insert(f.b(), Bytes::copy_from_slice(v)).is_none() {
                        added += 1;
                    }
                }
                Value::Int(added)
            }
            Cmd::HGet(k, f) => self
                .hash(&k.b())?
                .and_then(|h| h.get(&f.b()).cloned())
                .map_or(Value::Null, Value::Bulk),
            Cmd::HDel(_, fs) if fs.is_empty() => arity("HDEL"),
            Cmd::HDel(k, fs) => {
                self.hash(&k.b())?;
                let Some(Entry::Hash(h)) = self.keys.get_mut(&k.b()) else {
                    return Ok(Value::Int(0));
                };
                let n = fs.iter().filter(|f| h.remove(&f.b()).is_some()).count();
                if h.is_empty() {
                    self.keys.remove(&k.b());
                }
                Value::Int(n as i64)
            }
            Cmd::HLen(k) => Value::Int(self.hash(&k.b())?.map_or(0, |h| h.len() as i64)),
            Cmd::HExists(k, f) => {
                Value::Int(self.hash(&k.b())?.is_some_and(|h| h.contains_key(&f.b())) as i64)
            }
            Cmd::GetDel(k) => {
                let v = self.string(&k.b())?;
                if v.is_some() {
                    self.keys.remove(&k.b());
                }
                v.map_or(Value::Null, Value::Bulk)
            }
            Cmd::MGet(ks) if ks.is_empty() => arity("MGET"),
            Cmd::MGet(ks) => Value::Array(
                ks.iter()
                    .map(|k| match self.keys.get(&k.b()) {
                        Some(Entry::Str(v)) => Value::Bulk(v.clone()),
                        _ => Value::Null,
                    })
                    .collect(),
            ),
            Cmd::MSet(kv) if kv.is_empty() => arity("MSET"),
            Cmd::MSet(kv) => {
                for (k, v) in kv {
                    self.keys
                        .insert(k.b(), Entry::Str(Bytes::copy_from_slice(v)));
                }
                Value::ok()
            }
            Cmd::DbSize => Value::Int(self.keys.len() as i64),
            Cmd::SetNx(k, v) => {
                if self.keys.contains_key(&k.b()) {
                    Value::Int(0)
                } else {
                    self.keys
                        .insert(k.b(), Entry::Str(Bytes::copy_from_slice(v)));
                    Value::Int(1)
                }
            }
            Cmd::GetSet(k, v) => {
                let old = self.string(&k.b())?;
                self.keys
                    .insert(k.b(), Entry::Str(Bytes::copy_from_slice(v)));
                old.map_or(Value::Null, Value::Bulk)
            }
            Cmd::SetInt(k, n) => {
                self.keys
                    .insert(k.b(), Entry::Str(Bytes::from(n.to_string())));
                Value::ok()
            }
            Cmd::IncrBy(k, by) => {
                let old = match self.string(&k.b())? {
                    None => 0,
                    Some(v) => canonical_int(&v)
                        .ok_or_else(|| err("ERR value is not an integer or out of range"))?,
                };
                let new = old
                    .checked_add(i64::from(*by))
                    .ok_or_else(|| err("ERR increment or decrement would overflow"))?;
                self.keys
                    .insert(k.b(), Entry::Str(Bytes::from(new.to_string())));
                Value::Int(new)
            }
            Cmd::HSetNx(k, f, v) => {
                let has = self.hash(&k.b())?.is_some_and(|h| h.contains_key(&f.b()));
                if has {
                    Value::Int(0)
                } else {
                    self.hash_mut(k).insert(f.b(), Bytes::copy_from_slice(v));
                    Value::Int(1)
                }
            }
            Cmd::HIncrBy(k, f, by) => {
                let old = match self.hash(&k.b())?.and_then(|h| h.get(&f.b())) {
                    None => 0,
                    Some(v) => {
                        canonical_int(v).ok_or_else(|| err("ERR hash value is not an integer"))?
                    }
                };
                let new = old
                    .checked_add(i64::from(*by))
                    .ok_or_else(|| err("ERR increment or decrement would overflow"))?;
                self.hash_mut(k).insert(f.b(), Bytes::from(new.to_string()));
                Value::Int(new)
            }
        })
    }

    /// The hash at `k`, created empty if absent (the caller checked its type).
    fn hash_mut(&mut self, k: &K) -> &mut BTreeMap<Bytes, Bytes> {
        let e = self
            .keys
            .entry(k.b())
            .or_insert_with(|| Entry::Hash(BTreeMap::new()));
        match e {
            Entry::Hash(h) => h,
            Entry::Str(_) => unreachable!("the caller checked the type"),
        }
    }
}

fn err(s: &str) -> Value {
    Value::Error(s.into())
}

/// Redis's reading of a stored number: the canonical decimal form only.
fn canonical_int(v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?;
    let n: i64 = s.parse().ok()?;
    (n.to_string() == s).then_some(n)
}

/// Replies agree: equal, or both errors with the same first word.
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Error(x), Value::Error(y)) => x.split(' ').next() == y.split(' ').next(),
        (Value::Simple(x), Value::Simple(y)) => x == y,
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        _ => a == b,
    }
}
