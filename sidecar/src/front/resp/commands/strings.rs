//! String commands: a string key is a session whose value is the reserved
//! attribute `STRING_ATTR`.

use super::*;

/// GET.
pub(super) fn get(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(1, true)?;
    let id = c.key(&a[0])?;
    Ok(c.string(&id)?.map_or(Value::Null, Value::Bulk))
}

/// The options of SET and GETEX, parsed as Redis does: every option first,
/// then the expire argument (so `SET k v PX XX 1` is a syntax error, not a
/// bad integer).
#[derive(Default)]
struct Opts<'a> {
    nx: bool,
    xx: bool,
    get: bool,
    keep: bool,
    persist: bool,
    expire: Option<(&'static str, &'a Bytes)>,
}

fn parse_opts<'a>(a: &'a [Bytes], set: bool) -> Result<Opts<'a>, Value> {
    let mut o = Opts::default();
    let mut i = 0;
    while i < a.len() {
        let opt = upper(&a[i]);
        let next = a.get(i + 1);
        let unit = match opt.as_str() {
            "EX" => Some("EX"),
            "PX" => Some("PX"),
            "EXAT" => Some("EXAT"),
            "PXAT" => Some("PXAT"),
            _ => None,
        };
        match (opt.as_str(), unit, next) {
            ("NX", ..) if set && !o.xx => o.nx = true,
            ("XX", ..) if set && !o.nx => o.xx = true,
            ("GET", ..) if set => o.get = true,
            ("KEEPTTL", ..) if set && o.expire.is_none() => o.keep = true,
            ("PERSIST", ..) if !set && o.expire.is_none() => o.persist = true,
            (_, Some(u), Some(v))
                if !o.keep && !o.persist && o.expire.is_none_or(|(w, _)| w == u) =>
            {
                o.expire = Some((u, v));
                i += 1;
            }
            _ => return Err(Value::err(SYNTAX)),
        }
        i += 1;
    }
    Ok(o)
}

/// An expire argument of SET, SETEX, PSETEX or GETEX as an absolute time in
/// ms, by Redis's rules: positive, and neither the unit conversion nor adding
/// the current time may overflow a signed 64-bit number. The result may be
/// in the past (EXAT, PXAT): the key is then deleted at once.
pub(super) fn expire_arg(now: u64, v: &Bytes, unit: &str, cmd: &str) -> Result<u64, Value> {
    let n = int(v)?;
    let bad = || {
        Value::err(format!(
            "ERR invalid expire time in '{}' command",
            cmd.to_ascii_lowercase()
        ))
    };
    let seconds = matches!(unit, "EX" | "EXAT");
    if n <= 0 || (seconds && n > i64::MAX / 1000) {
        return Err(bad());
    }
    let ms = if seconds { n * 1000 } else { n };
    let at = if matches!(unit, "EX" | "PX") {
        ms.checked_add(now as i64).ok_or_else(bad)?
    } else {
        ms
    };
    Ok(at as u64)
}

/// SET.
pub(super) fn set(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(2, false)?;
    let id = c.key(&a[0])?;
    let o = parse_opts(&a[2..], true)?;
    let at = match o.expire {
        Some((u, v)) => Some(expire_arg(c.now, v, u, "set")?),
        None => None,
    };
    let cur = c.session(&id);
    let old = match cur.map(Ctx::kind) {
        Some(Kind::Hash(_)) if o.get => return Err(Value::err(WRONGTYPE)),
        Some(Kind::Str(v)) => Some(v.clone()),
        _ => None,
    };
    let exists = cur.is_some();
    let reply = if o.get {
        old.map_or(Value::Null, Value::Bulk)
    } else {
        Value::ok()
    };
    if (o.nx && exists) || (o.xx && !exists) {
        return Ok(if o.get { reply } else { Value::Null });
    }
    match at {
        // Already expired (EXAT/PXAT in the past): Redis deletes at once, and
        // so does every member here; the new value is never readable.
        Some(at) if at <= c.now => {
            c.delete(&id)?;
        }
        Some(at) => c.set_string(id, a[1].clone(), at - c.now)?,
        None => {
            let ttl = if o.keep { c.keep_ttl(cur) } else { 0 };
            c.set_string(id, a[1].clone(), ttl)?;
        }
    }
    Ok(reply)
}

/// SETNX: SET NX with an integer reply.
pub(super) fn setnx(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    let id = c.key(&a[0])?;
    if c.session(&id).is_some() {
        return Ok(Value::Int(0));
    }
    c.set_string(id, a[1].clone(), 0)?;
    Ok(Value::Int(1))
}

/// GETSET: SET GET, which also clears the TTL.
pub(super) fn getset(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    let id = c.key(&a[0])?;
    let old = c.string(&id)?;
    c.set_string(id, a[1].clone(), 0)?;
    Ok(old.map_or(Value::Null, Value::Bulk))
}

/// A stored number as Redis reads it: the canonical decimal form of a
/// signed 64-bit integer, nothing else (no spaces, `+` or leading zeros).
pub(super) fn stored_int(v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?;
    let n: i64 = s.parse().ok()?;
    (n.to_string() == s).then_some(n)
}

/// INCR, DECR, INCRBY, DECRBY. The key keeps its TTL, as in Redis.
pub(super) fn incr(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    let by = match args.name {
        "INCR" => 1,
        "DECR" => -1,
        "INCRBY" => int(&a[1])?,
        _ => {
            let n = int(&a[1])?;
            if n == i64::MIN {
                return Err(Value::err("ERR decrement would overflow"));
            }
            -n
        }
    };
    let id = c.key(&a[0])?;
    let old = match c.string(&id)? {
        None => 0,
        Some(v) => stored_int(&v).ok_or_else(|| Value::err(NOT_INT))?,
    };
    let new = old
        .checked_add(by)
        .ok_or_else(|| Value::err("ERR increment or decrement would overflow"))?;
    let ttl = c.keep_ttl(c.session(&id));
    c.set_string(id, Bytes::from(new.to_string()), ttl)?;
    Ok(Value::Int(new))
}

/// SETEX, PSETEX.
pub(super) fn setex(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    let name = args.name;
    args.need(3, true)?;
    let id = c.key(&a[0])?;
    let unit = if name == "SETEX" { "EX" } else { "PX" };
    let at = expire_arg(c.now, &a[1], unit, name)?;
    c.set_string(id, a[2].clone(), at.saturating_sub(c.now).max(1))?;
    Ok(Value::ok())
}

/// GETEX.
pub(super) fn getex(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(1, false)?;
    let id = c.key(&a[0])?;
    let o = parse_opts(&a[1..], false)?;
    let Some(v) = c.string(&id)? else {
        return Ok(Value::Null);
    };
    if let Some((u, n)) = o.expire {
        let at = expire_arg(c.now, n, u, "getex")?;
        c.expire_at(id, at)?;
    } else if o.persist && c.session(&id).and_then(Session::expires_at_ms).is_some() {
        c.write(id, vec![Op::MaxInactive], 0)?;
    }
    Ok(Value::Bulk(v))
}

/// GETDEL.
pub(super) fn getdel(c: &mut Ctx<'_, '_>, args: &Args<'_>) -> Result<Value, Value> {
    let a = args.a;
    args.need(1, true)?;
    let id = c.key(&a[0])?;
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
        let v = c
            .key(k)
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
        .map(|p| Ok((c.key(&p[0])?, p[1].clone())))
        .collect::<Result<_, Value>>()?;
    for (id, v) in pairs {
        c.set_string(id, v, 0)?;
    }
    Ok(Value::ok())
}
