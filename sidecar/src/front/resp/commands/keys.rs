//! Keyspace commands: deletion, expiry, renaming, types and SCAN.

use super::*;

/// DEL, UNLINK.
pub(super) fn del(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(1, false)?;
    let mut n = 0;
    for k in a {
        if c.delete(&key(k)?)? {
            n += 1;
        }
    }
    Ok(Value::Int(n))
}

/// EXISTS.
pub(super) fn exists(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(1, false)?;
    let n = a
        .iter()
        .filter(|k| key(k).ok().is_some_and(|id| c.session(&id).is_some()))
        .count();
    Ok(Value::Int(n as i64))
}

/// EXPIRE, PEXPIRE, EXPIREAT, PEXPIREAT.
pub(super) fn expire(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    let name = args.name;
    args.need(2, false)?;
    let id = key(&a[0])?;
    let n = int(&a[1])?;
    let at: i128 = match name {
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

/// PERSIST.
pub(super) fn persist(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(1, true)?;
    let id = key(&a[0])?;
    match c.session(&id).map(|s| s.expires_at_ms()) {
        Some(Some(_)) => {
            c.write(id, vec![Op::MaxInactive], 0)?;
            Ok(Value::Int(1))
        }
        _ => Ok(Value::Int(0)),
    }
}

/// TTL, PTTL.
pub(super) fn ttl(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    let name = args.name;
    args.need(1, true)?;
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

/// RENAME, RENAMENX.
pub(super) fn rename(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    let name = args.name;
    args.need(2, true)?;
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

/// TYPE.
pub(super) fn key_type(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(1, true)?;
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

/// SCAN.
pub(super) fn scan(
    c: &mut Ctx<'_, '_>,
    st: &mut RedisState,
    args: &Args<'_>,
) -> Result<Value, Value> {
    let a = args.a;
    args.need(1, false)?;
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

/// DBSIZE.
pub(super) fn dbsize(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    args.need(0, true)?;
    Ok(Value::Int(c.tx.core().store.live_count() as i64))
}

/// FLUSHDB, FLUSHALL.
pub(super) fn flushdb() -> Result<Value, Value> {
    Err(Value::err(
        "ERR FLUSHDB is disabled: it would delete every user's session on every member",
    ))
}
