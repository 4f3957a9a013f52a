//! Hash commands: a hash key is a session, each field an attribute.

use super::*;

/// HSET, HMSET.
pub(super) fn hset(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    let name = args.name;
    if a.len() < 3 || a.len() % 2 != 1 {
        return Err(arity_error(name));
    }
    let id = c.key(&a[0])?;
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

/// HGET.
pub(super) fn hget(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(2, true)?;
    let id = c.key(&a[0])?;
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

/// HMGET.
pub(super) fn hmget(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(2, false)?;
    let id = c.key(&a[0])?;
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

/// HGETALL, HKEYS, HVALS, HLEN.
pub(super) fn hgetall(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    let name = args.name;
    args.need(1, true)?;
    let id = c.key(&a[0])?;
    let s = match c.session(&id).map(Ctx::kind) {
        Some(Kind::Str(_)) => return Err(Value::err(WRONGTYPE)),
        Some(Kind::Hash(s)) => Some(s),
        None => None,
    };
    let pairs: Vec<(&String, &Bytes)> = s.map(|s| s.live_attrs().collect()).unwrap_or_default();
    Ok(match name {
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

/// HDEL.
pub(super) fn hdel(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(2, false)?;
    let id = c.key(&a[0])?;
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

/// HEXISTS.
pub(super) fn hexists(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(2, true)?;
    let id = c.key(&a[0])?;
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

/// HSETNX: sets a field only if the hash does not have it.
pub(super) fn hsetnx(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    let id = c.key(&a[0])?;
    let f = field(&a[1])?;
    let cur = c.session(&id);
    let mut ops = Vec::new();
    match cur.map(Ctx::kind) {
        Some(Kind::Str(_)) => return Err(Value::err(WRONGTYPE)),
        Some(Kind::Hash(s)) if s.attrs.get(&f).is_some_and(|x| x.value.is_some()) => {
            return Ok(Value::Int(0))
        }
        Some(Kind::Hash(_)) => {}
        None => ops.push(Op::Create),
    }
    ops.push(Op::Set {
        name: f,
        value: a[2].clone(),
    });
    let ttl = c.keep_ttl(cur);
    c.write(id, ops, ttl)?;
    Ok(Value::Int(1))
}

/// HINCRBY: adds to a field holding an integer (a missing field counts as 0).
pub(super) fn hincrby(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    let id = c.key(&a[0])?;
    let by = int(&a[2])?;
    let f = field(&a[1])?;
    let cur = c.session(&id);
    let mut ops = Vec::new();
    let old = match cur.map(Ctx::kind) {
        Some(Kind::Str(_)) => return Err(Value::err(WRONGTYPE)),
        Some(Kind::Hash(s)) => match s.attrs.get(&f).and_then(|x| x.value.as_ref()) {
            Some(v) => strings::stored_int(v)
                .ok_or_else(|| Value::err("ERR hash value is not an integer"))?,
            None => 0,
        },
        None => {
            ops.push(Op::Create);
            0
        }
    };
    let new = old
        .checked_add(by)
        .ok_or_else(|| Value::err("ERR increment or decrement would overflow"))?;
    ops.push(Op::Set {
        name: f,
        value: Bytes::from(new.to_string()),
    });
    let ttl = c.keep_ttl(cur);
    c.write(id, ops, ttl)?;
    Ok(Value::Int(new))
}
