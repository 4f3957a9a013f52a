//! The session resource: create, list, read, update, invalidate, touch,
//! rename, and single attributes.

use super::*;

pub(super) async fn create(req: Request<Incoming>, h: &Handle, q: &Query) -> Result<Resp, Resp> {
    let mode = send_mode(q)?;
    let b: CreateBody = parse_json(&body(req, max_body(h)).await?)?;
    // An id the sidecar makes up exists nowhere: nothing to fetch first (in
    // backup mode). A client's id may exist on its holders: fetched, so a
    // duplicate is refused there too.
    let (id, fetch) = match b.id {
        Some(raw) => {
            let id = sid(&raw)?;
            (id.clone(), vec![id])
        }
        None => (SessionId::random(), Vec::new()),
    };
    let mut ops = vec![Op::Create];
    ops.extend(decode_attrs(b.attributes)?);
    let mi = max_inactive(b.max_inactive_seconds)?;
    let origin = origin();
    let key = id.clone();
    // The answer is read in the write's own transaction: a member that holds
    // no copy (backup mode) drops its copy soon, and need not fetch it back.
    let r = h
        .txn_on(fetch, move |tx| {
            let written = tx_write(tx, origin, key.clone(), ops, mi, mode);
            let grace = tx.core().cfg.touch_flush_ms;
            let s = tx.core().store.get(&key, tx.now(), grace).ok().cloned();
            match written {
                Ok(None) => Step::Ready(Ok(s)),
                Ok(Some(t)) => Step::after(move |r| r[t.0].clone().map(|()| s)),
                Err(e) => Step::Ready(Err(e)),
            }
        })
        .await;
    let s = match r {
        None => return Err(unavailable()),
        Some(Err(e)) => return Err(write_err(e)),
        Some(Ok(Some(s))) => s,
        Some(Ok(None)) => read(h, id.clone(), false).await?,
    };
    Ok(with_etag(
        json_resp(StatusCode::CREATED, &session_json(&id, &s, &h.jvm_route)),
        s.etag(),
    ))
}

/// A session's `ETag`: its version (`Session::etag`) in quotes.
fn etag(version: u64) -> hyper::header::HeaderValue {
    hyper::header::HeaderValue::from_str(&format!("\"{version:016x}\""))
        .unwrap_or_else(|_| hyper::header::HeaderValue::from_static("\"\""))
}

fn with_etag(mut r: Resp, version: u64) -> Resp {
    r.headers_mut().insert(ETAG, etag(version));
    r
}

/// On a write's answer: the version the write was applied to.
const PRIOR_ETAG: &str = "sessionmesh-prior-etag";

/// A write that reports the session's version before and after it, read in
/// the same transaction: a client whose copy was at the prior version holds,
/// with its own change applied, exactly the new one.
async fn write_versioned(
    h: &Handle,
    id: SessionId,
    ops: Vec<Op>,
    mi: Option<u64>,
    mode: Option<SendMode>,
) -> Result<(Option<u64>, Option<u64>), Resp> {
    let origin = origin();
    let r = h
        .txn_on(super::keys(&id, &ops), move |tx| {
            match versioned(tx, origin, id, ops, mi, mode) {
                Ok(Versioned {
                    before,
                    after,
                    ticket: None,
                }) => Step::Ready(Ok((before, after))),
                Ok(Versioned {
                    before,
                    after,
                    ticket: Some(t),
                }) => Step::after(move |r| r[t.0].clone().map(|()| (before, after))),
                Err(e) => Step::Ready(Err(e)),
            }
        })
        .await;
    match r {
        None => Err(unavailable()),
        Some(Err(e)) => Err(write_err(e)),
        Some(Ok(v)) => Ok(v),
    }
}

/// A write applied inside a transaction: the session's versions before and
/// after it (`None`: no session), and its ticket if it waits for replication.
pub(super) struct Versioned {
    pub(super) before: Option<u64>,
    pub(super) after: Option<u64>,
    pub(super) ticket: Option<crate::node::Ticket>,
}

/// [`tx_write`], with the versions a `PATCH` answers in its `ETag` headers.
pub(super) fn versioned(
    tx: &mut crate::node::Tx<'_>,
    origin: u32,
    id: SessionId,
    ops: Vec<Op>,
    mi: Option<u64>,
    mode: Option<SendMode>,
) -> Result<Versioned, WriteError> {
    let (now, grace) = (tx.now(), tx.core().cfg.touch_flush_ms);
    let key = id.clone();
    let version =
        move |c: &crate::core::Core| c.store.get(&key, now, grace).ok().map(Session::etag);
    let before = version(tx.core());
    let ticket = tx_write(tx, origin, id, ops, mi, mode)?;
    Ok(Versioned {
        before,
        after: version(tx.core()),
        ticket,
    })
}

/// The ops of a `PATCH`: the attributes set (base64), those removed, and the
/// access itself.
pub(super) fn patch_ops(
    set: BTreeMap<String, String>,
    remove: Vec<String>,
) -> Result<Vec<Op>, Resp> {
    let mut ops = decode_attrs(set)?;
    ops.extend(remove.into_iter().map(|name| Op::Remove { name }));
    ops.push(Op::Touch);
    Ok(ops)
}

pub(super) async fn list(h: &Handle, q: &Query) -> Result<Resp, Resp> {
    let limit = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(1000usize)
        .min(10_000);
    let cursor = match q.get("cursor") {
        Some(c) if !c.is_empty() => Some(sid(c)?),
        _ => None,
    };
    let (ids, count) = h
        .txn(move |tx| {
            let now = tx.now();
            let ids = tx.core().list(cursor.as_ref(), limit, now);
            Step::Ready((ids, tx.core().store.live_count()))
        })
        .await
        .ok_or_else(unavailable)?;
    let next = if ids.len() == limit {
        ids.last().map(|i| i.as_str().to_owned())
    } else {
        None
    };
    let ids: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
    Ok(json_resp(
        StatusCode::OK,
        &json!({"count": count, "ids": ids, "next": next}),
    ))
}

/// The session; `304 Not Modified` (no body) when `If-None-Match` names its
/// current version, so a client can check its copy cheaply.
pub(super) async fn get(
    h: &Handle,
    q: &Query,
    id: &str,
    if_none_match: Option<&hyper::header::HeaderValue>,
) -> Result<Resp, Resp> {
    let id = sid(id)?;
    let touch = q.get("touch").is_none_or(|t| t != "false");
    let s = read(h, id.clone(), touch).await?;
    let v = s.etag();
    if if_none_match.is_some_and(|m| m.as_bytes() == etag(v).as_bytes()) {
        let mut r = no_content();
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        return Ok(with_etag(r, v));
    }
    Ok(with_etag(
        json_resp(StatusCode::OK, &session_json(&id, &s, &h.jvm_route)),
        v,
    ))
}

pub(super) async fn patch(
    req: Request<Incoming>,
    h: &Handle,
    q: &Query,
    id: &str,
) -> Result<Resp, Resp> {
    let id = sid(id)?;
    let mode = send_mode(q)?;
    let b: PatchBody = parse_json(&body(req, max_body(h)).await?)?;
    let ops = patch_ops(b.set, b.remove)?;
    let mi = max_inactive(b.max_inactive_seconds)?;
    let (before, after) = write_versioned(h, id, ops, mi, mode).await?;
    let mut r = no_content();
    if let Some(a) = after {
        r = with_etag(r, a);
    }
    if let Some(b) = before {
        r.headers_mut().insert(PRIOR_ETAG, etag(b));
    }
    Ok(r)
}

pub(super) async fn delete(h: &Handle, q: &Query, id: &str) -> Result<Resp, Resp> {
    let id = sid(id)?;
    write(h, id, vec![Op::Invalidate], None, send_mode(q)?).await?;
    Ok(no_content())
}

pub(super) async fn touch(h: &Handle, id: &str) -> Result<Resp, Resp> {
    let id = sid(id)?;
    read(h, id, true).await?;
    Ok(no_content())
}

pub(super) async fn rename(
    req: Request<Incoming>,
    h: &Handle,
    q: &Query,
    id: &str,
) -> Result<Resp, Resp> {
    let id = sid(id)?;
    let mode = send_mode(q)?;
    let b: RenameBody = parse_json(&body(req, 64 * 1024).await?)?;
    let to = sid(&b.new_id)?;
    if to == id {
        return Ok(json_resp(StatusCode::OK, &json!({"id": to.as_str()})));
    }
    write(h, id, vec![Op::Rename { to: to.clone() }], None, mode).await?;
    Ok(json_resp(
        StatusCode::OK,
        &json!({"id": to.as_str(), "routedId": format!("{}.{}", to.as_str(), h.jvm_route)}),
    ))
}

pub(super) async fn get_attr(h: &Handle, q: &Query, id: &str, name: &str) -> Result<Resp, Resp> {
    let id = sid(id)?;
    let name = pct_decode(name);
    let s = read(h, id, q.get("touch").is_none_or(|t| t != "false")).await?;
    match s.attrs.get(&name).and_then(|a| a.value.clone()) {
        Some(v) => {
            let mut r = Response::new(Full::new(v));
            r.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/octet-stream"),
            );
            Ok(r)
        }
        None => Err(err(
            StatusCode::NOT_FOUND,
            "no_such_attribute",
            "attribute not found",
        )),
    }
}

pub(super) async fn put_attr(
    req: Request<Incoming>,
    h: &Handle,
    q: &Query,
    id: &str,
    name: &str,
) -> Result<Resp, Resp> {
    let id = sid(id)?;
    let name = pct_decode(name);
    let mode = send_mode(q)?;
    let value = body(req, h.limits.max_attr_bytes + 1).await?;
    write(h, id, vec![Op::Set { name, value }], None, mode).await?;
    Ok(no_content())
}

pub(super) async fn delete_attr(h: &Handle, q: &Query, id: &str, name: &str) -> Result<Resp, Resp> {
    let id = sid(id)?;
    let name = pct_decode(name);
    write(h, id, vec![Op::Remove { name }], None, send_mode(q)?).await?;
    Ok(no_content())
}
