//! `POST /v1/batch`: the writes of several sessions in one request, run in one
//! transaction. A client that serves many users at once (the Tomcat Manager)
//! sends the changes of the requests finishing together as one batch: one
//! HTTP exchange and, in sync mode, one replication round for all of them.
//!
//! Each write succeeds or fails by itself, exactly as the same `PATCH` or
//! `touch` sent alone would; the answer lists one result per write, in order.
//! Only a malformed batch is refused as a whole, before anything is applied.

use super::*;

/// Writes in one batch at most.
const MAX_WRITES: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BatchBody {
    writes: Vec<BatchWrite>,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Kind {
    /// Attribute changes, as `PATCH /v1/sessions/{id}`.
    #[default]
    Patch,
    /// An access only, as `POST /v1/sessions/{id}/touch`.
    Touch,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BatchWrite {
    id: String,
    #[serde(default)]
    op: Kind,
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
    max_inactive_seconds: Option<u64>,
}

/// A write, checked and decoded.
enum Planned {
    Patch {
        id: SessionId,
        ops: Vec<Op>,
        mi: Option<u64>,
    },
    Touch {
        id: SessionId,
    },
}

impl Planned {
    fn id(&self) -> &SessionId {
        match self {
            Planned::Patch { id, .. } | Planned::Touch { id } => id,
        }
    }
}

/// One write's result: the versions before and after it, or its error.
enum Outcome {
    Done {
        before: Option<u64>,
        after: Option<u64>,
    },
    Touched,
    Failed(WriteError),
}

fn plan(i: usize, w: BatchWrite) -> Result<Planned, Resp> {
    let id = sid(&w.id).map_err(|_| {
        err(
            StatusCode::BAD_REQUEST,
            "bad_session_id",
            format!("write {i}: not a valid session id"),
        )
    })?;
    if w.op == Kind::Touch {
        if !w.set.is_empty() || !w.remove.is_empty() || w.max_inactive_seconds.is_some() {
            return Err(err(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("write {i}: a touch carries no set, remove or maxInactiveSeconds"),
            ));
        }
        return Ok(Planned::Touch { id });
    }
    let ops = super::sessions::patch_ops(w.set, w.remove).map_err(|_| {
        err(
            StatusCode::BAD_REQUEST,
            "bad_base64",
            format!("write {i}: an attribute is not valid base64"),
        )
    })?;
    let mi = max_inactive(w.max_inactive_seconds).map_err(|_| {
        err(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("write {i}: maxInactiveSeconds is too large"),
        )
    })?;
    Ok(Planned::Patch { id, ops, mi })
}

pub(super) async fn batch(req: Request<Incoming>, h: &Handle, q: &Query) -> Result<Resp, Resp> {
    let mode = send_mode(q)?;
    let b: BatchBody = parse_json(&body(req, max_body(h).saturating_mul(2)).await?)?;
    if b.writes.len() > MAX_WRITES {
        return Err(err(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "{} writes in one batch (at most {MAX_WRITES})",
                b.writes.len()
            ),
        ));
    }
    let planned = b
        .writes
        .into_iter()
        .enumerate()
        .map(|(i, w)| plan(i, w))
        .collect::<Result<Vec<_>, _>>()?;
    let ids: Vec<SessionId> = planned.iter().map(|p| p.id().clone()).collect();
    let origin = origin();
    let outcomes = h
        .txn_on(ids, move |tx| run(tx, origin, planned, mode))
        .await
        .ok_or_else(unavailable)?;
    let results: Vec<Value> = outcomes.iter().map(result_json).collect();
    Ok(json_resp(StatusCode::OK, &json!({ "results": results })))
}

/// Runs every write in one transaction; the answer waits for all of them.
fn run(
    tx: &mut crate::node::Tx<'_>,
    origin: u32,
    planned: Vec<Planned>,
    mode: Option<SendMode>,
) -> Step<Vec<Outcome>> {
    let mut out = Vec::with_capacity(planned.len());
    let mut waits = Vec::new();
    for p in planned {
        match p {
            Planned::Touch { id } => {
                let now = tx.now();
                out.push(match tx.core_mut().read(&id, true, now) {
                    Ok(_) => Outcome::Touched,
                    Err(e) => Outcome::Failed(e),
                })
            }
            Planned::Patch { id, ops, mi } => {
                match super::sessions::versioned(tx, origin, id, ops, mi, mode) {
                    Ok(v) => {
                        if let Some(t) = v.ticket {
                            waits.push((out.len(), t));
                        }
                        out.push(Outcome::Done {
                            before: v.before,
                            after: v.after,
                        });
                    }
                    Err(e) => out.push(Outcome::Failed(e)),
                }
            }
        }
    }
    if waits.is_empty() {
        return Step::Ready(out);
    }
    Step::after(move |r| {
        for (i, t) in waits {
            if let Some(Err(e)) = r.get(t.0) {
                out[i] = Outcome::Failed(e.clone());
            }
        }
        out
    })
}

fn result_json(o: &Outcome) -> Value {
    match o {
        Outcome::Done { before, after } => {
            let mut m = Map::new();
            m.insert("status".into(), json!(204));
            if let Some(a) = after {
                m.insert("etag".into(), json!(quoted(*a)));
            }
            if let Some(b) = before {
                m.insert("priorEtag".into(), json!(quoted(*b)));
            }
            Value::Object(m)
        }
        Outcome::Touched => json!({"status": 204}),
        Outcome::Failed(e) => {
            let (status, code) = write_status(e);
            json!({"status": status.as_u16(), "error": code, "message": e.to_string()})
        }
    }
}

/// A version as its `ETag` header value reads (with the quotes).
fn quoted(version: u64) -> String {
    format!("\"{version:016x}\"")
}
