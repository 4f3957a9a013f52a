//! Liveness, readiness, the cluster view, metrics and the test hook.

use super::*;

pub(super) async fn freeze(h: &Handle, q: &Query) -> Result<Resp, Resp> {
    let ms = q
        .get("ms")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1_000)
        .min(60_000);
    let _ = h.cmd_tx.send(Command::Freeze { ms }).await;
    Ok(json_resp(StatusCode::ACCEPTED, &json!({"frozenMs": ms})))
}

pub(super) async fn healthz(h: &Handle) -> Result<Resp, Resp> {
    // Liveness measures the core, not the socket: a member whose core
    // is stuck must be restarted, not kept because its HTTP task runs.
    let silent = h.core_silent_ms();
    if silent > crate::node::CORE_STALL_HEALTH_MS {
        Ok(json_resp(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "core stalled", "silentMs": silent}),
        ))
    } else {
        Ok(json_resp(StatusCode::OK, &json!({"status": "ok"})))
    }
}

pub(super) async fn readyz(h: &Handle) -> Result<Resp, Resp> {
    let ready = h.ready.load(Ordering::Relaxed);
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(json_resp(code, &json!({"ready": ready})))
}

pub(super) async fn cluster(h: &Handle) -> Result<Resp, Resp> {
    let st = h
        .call(|reply| Command::Status { reply })
        .await
        .ok_or_else(unavailable)?;
    let mut v = serde_json::to_value(&st).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "settings".into(),
            serde_json::to_value(&h.settings).unwrap_or(Value::Null),
        );
    }
    Ok(json_resp(StatusCode::OK, &v))
}

pub(super) async fn metrics(h: &Handle) -> Result<Resp, Resp> {
    let st = h
        .call(|reply| Command::Status { reply })
        .await
        .ok_or_else(unavailable)?;
    let mut r = Response::new(Full::new(Bytes::from(crate::front::metrics::render(
        &st, h,
    ))));
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(crate::front::metrics::CONTENT_TYPE),
    );
    Ok(r)
}
