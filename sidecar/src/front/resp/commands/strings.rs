//! String commands: a string key is a session whose value is the reserved
//! attribute `STRING_ATTR`.

use super::*;

/// GET.
pub(super) fn get(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(1, true)?;
    let id = key(&a[0])?;
    Ok(c.string(&id)?.map_or(Value::Null, Value::Bulk))
}

/// SET.
pub(super) fn set(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(2, false)?;
    let id = key(&a[0])?;
    let (mut ttl, mut nx, mut xx, mut keep, mut get) = (None::<u64>, false, false, false, false);
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

/// SETEX, PSETEX.
pub(super) fn setex(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    let name = args.name;
    args.need(3, true)?;
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

/// GETEX.
pub(super) fn getex(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(1, false)?;
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

/// GETDEL.
pub(super) fn getdel(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(1, true)?;
    let id = key(&a[0])?;
    let Some(v) = c.string(&id)? else {
        return Ok(Value::Null);
    };
    c.delete(&id)?;
    Ok(Value::Bulk(v))
}

/// MGET.
pub(super) fn mget(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(1, false)?;
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

/// MSET.
pub(super) fn mset(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    let name = args.name;
    if a.is_empty() || a.len() % 2 != 0 {
        return Err(arity_error(name));
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
