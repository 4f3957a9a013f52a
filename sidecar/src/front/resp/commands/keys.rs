//! Keyspace commands: deletion, expiry, renaming, types and SCAN.

use super::*;

/// DEL, UNLINK.
pub(super) fn del(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(1, false)?;
    let mut n = 0;
    for k in a {
        if c.delete(&c.key(k)?)? {
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
        .filter(|k| c.key(k).ok().is_some_and(|id| c.session(&id).is_some()))
        .count();
    Ok(Value::Int(n as i64))
}

/// EXPIRE, PEXPIRE, EXPIREAT, PEXPIREAT, checked in Redis's order: the
/// options, the number, its overflow (`ERR invalid expire time`), then the key.
pub(super) fn expire(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    let name = args.name;
    args.need(2, false)?;
    let id = c.key(&a[0])?;
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for o in &a[2..] {
        match upper(o).as_str() {
            "NX" => nx = true,
            "XX" => xx = true,
            "GT" => gt = true,
            "LT" => lt = true,
            _ => {
                return Err(Value::err(format!(
                    "ERR Unsupported option {}",
                    String::from_utf8_lossy(o)
                )))
            }
        }
    }
    if nx && (xx || gt || lt) {
        return Err(Value::err(
            "ERR NX and XX, GT or LT options at the same time are not compatible",
        ));
    }
    if gt && lt {
        return Err(Value::err(
            "ERR GT and LT options at the same time are not compatible",
        ));
    }
    let n = int(&a[1])?;
    let bad = || {
        Value::err(format!(
            "ERR invalid expire time in '{}' command",
            name.to_ascii_lowercase()
        ))
    };
    let ms = if matches!(name, "EXPIRE" | "EXPIREAT") {
        n.checked_mul(1000).ok_or_else(bad)?
    } else {
        n
    };
    let base = if matches!(name, "EXPIRE" | "PEXPIRE") {
        c.now as i64
    } else {
        0
    };
    let at = ms.checked_add(base).ok_or_else(bad)?;
    let Some(s) = c.session(&id) else {
        return Ok(Value::Int(0));
    };
    let cur = s.expires_at_ms();
    let at = at.max(0) as u64;
    // A key without a TTL counts as expiring never: GT fails, LT succeeds.
    let ok = !(nx && cur.is_some()
        || xx && cur.is_none()
        || gt && cur.is_none_or(|t| at <= t)
        || lt && cur.is_some_and(|t| at >= t));
    if !ok {
        return Ok(Value::Int(0));
    }
    c.expire_at(id, at)?;
    Ok(Value::Int(1))
}

/// EXPIRETIME, PEXPIRETIME: the absolute expiry (-1 none, -2 no key).
pub(super) fn expiretime(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let id = c.key(&args.a[0])?;
    Ok(Value::Int(
        match c.session(&id).map(Session::expires_at_ms) {
            None => -2,
            Some(None) => -1,
            Some(Some(t)) if args.name == "EXPIRETIME" => (t.saturating_add(500) / 1000) as i64,
            Some(Some(t)) => t as i64,
        },
    ))
}

/// PERSIST.
pub(super) fn persist(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(1, true)?;
    let id = c.key(&a[0])?;
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
    let id = c.key(&a[0])?;
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
    let (from, to) = (c.key(&a[0])?, c.key(&a[1])?);
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
    let id = c.key(&a[0])?;
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
            "COUNT" => {
                let n = int(v)?;
                if n < 1 {
                    return Err(Value::err(SYNTAX));
                }
                count = n.min(100_000) as usize;
            }
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
    let (ids, at_end) = c.list(start.as_ref(), count);
    let mut keys = Vec::new();
    for id in &ids {
        let name = id.db_key().1;
        if pattern.as_ref().is_some_and(|p| !glob(p, name.as_bytes())) {
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
        keys.push(Value::str(name));
    }
    let next = match ids.last() {
        Some(last) if !at_end => {
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
    let n = c.tx.core().store.count_db(c.db, c.now);
    Ok(Value::Int(n as i64))
}

/// FLUSHDB, FLUSHALL [ASYNC|SYNC]: refused unless `--allow-flush`; then
/// every key of the database (FLUSHDB) or of all of them (FLUSHALL) is
/// deleted on every member (delete markers, replicated).
pub(super) fn flushdb(
    c: &mut Ctx<'_, '_>,
    st: &RedisState,
    args: &Args<'_>,
) -> Result<Value, Value> {
    match args.a {
        [] => {}
        [m] if matches!(upper(m).as_str(), "ASYNC" | "SYNC") => {}
        _ => return Err(Value::err(SYNTAX)),
    }
    if !st.allow_flush {
        return Err(Value::err(
            "ERR FLUSHDB is disabled: it would delete every user's session on every member (start the sidecar with --allow-flush for test set-ups)",
        ));
    }
    let all = args.name == "FLUSHALL";
    let mut cursor: Option<SessionId> = None;
    loop {
        let (ids, at_end) = if all {
            let ids = c.tx.core().store.list(cursor.as_ref(), 1024, c.now, 0);
            let end = ids.len() < 1024;
            (ids, end)
        } else {
            c.list(cursor.as_ref(), 1024)
        };
        for id in &ids {
            c.delete(id)?;
        }
        match ids.last() {
            Some(last) if !at_end => cursor = Some(last.clone()),
            _ => break,
        }
    }
    Ok(Value::ok())
}
