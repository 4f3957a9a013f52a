//! The local HTTP/JSON API for the app (see docs/openapi.yaml), the probes,
//! `/v1/cluster` and `/metrics`.
//!
//! Errors are JSON `{"error": code, "message": text}` with a status that says
//! whether anything changed (4xx: nothing; 504: applied locally, replication
//! not confirmed in time). Bodies are read with a size limit before parsing.
// Handlers return the response for a refusal as their error: it is built
// once, on a path that is about to answer anyway, so its size costs nothing.
#![allow(clippy::result_large_err)]

use crate::core::identity::SessionId;
use crate::core::store::{Op, Session, StoreError};
use crate::core::{SendMode, WriteError};
use crate::node::{Command, Handle, Step};
mod batch;
mod changes;
use changes::{origin, tx_write, WATCHER};
mod probes;
mod sessions;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, ETAG, IF_NONE_MATCH, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

type Resp = Response<Full<Bytes>>;
/// A decoded query string.
type Query = BTreeMap<String, String>;

/// The largest JSON body: a whole session, base64-encoded, with room for names.
fn max_body(h: &Handle) -> usize {
    h.limits.max_session_bytes / 3 * 4 + 64 * 1024
}

/// Bounds and guards of the local HTTP listeners.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Open connections at most; more are closed at once and counted.
    pub max_connections: usize,
    /// A connection that sends no complete request header for this long is closed.
    pub idle_timeout: std::time::Duration,
    /// When set, every API request (not the probes) must carry
    /// `Authorization: Bearer <token>`.
    pub token: Option<Arc<Vec<u8>>>,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 1024,
            idle_timeout: std::time::Duration::from_secs(30),
            token: None,
        }
    }
}

/// Refuses what a web page in a browser on this machine could send to the
/// loopback API: a `Host` naming another host (DNS rebinding), any `Origin` (browsers set
/// it on cross-origin requests), and a POST that is not JSON (a form or a
/// `text/plain` fetch needs no CORS preflight; `application/json` does). With a
/// token configured, also a request without it. `None` lets the request in.
fn refuse_forgeable(req: &Request<Incoming>, token: Option<&[u8]>) -> Option<Resp> {
    let headers = req.headers();
    if let Some(host) = headers
        .get(hyper::header::HOST)
        .map(|v| v.to_str().unwrap_or(""))
    {
        let name = host
            .rsplit_once(':')
            .filter(|(h, p)| !p.contains(']') && !h.is_empty())
            .map_or(host, |(h, _)| h);
        let name = name.trim_start_matches('[').trim_end_matches(']');
        // DNS rebinding needs a host name: an IP literal (as clients of an API
        // bound to a non-loopback address use) cannot be rebound.
        let ok = name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok();
        if !ok {
            return Some(err(
                StatusCode::FORBIDDEN,
                "forbidden_host",
                "the Host header must be localhost or an IP address",
            ));
        }
    }
    if headers.contains_key(hyper::header::ORIGIN) {
        return Some(err(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "requests from web pages (with an Origin header) are not accepted",
        ));
    }
    if req.method() == Method::POST {
        let ct = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !ct
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("application/json")
        {
            return Some(err(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "POST bodies must be sent as Content-Type: application/json",
            ));
        }
    }
    let probe = matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics");
    if let Some(expected) = token.filter(|_| !probe) {
        let got = headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !crate::core::identity::ct_eq(expected, got.trim().as_bytes()) {
            let mut r = err(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this API needs Authorization: Bearer <token> (--api-token-file)",
            );
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer"),
            );
            return Some(r);
        }
    }
    None
}

/// Serves the API until `shutdown`; open connections finish their request.
pub async fn serve(
    listener: TcpListener,
    handle: Handle,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    serve_with(listener, handle, limits, shutdown, false).await
}

/// Serves only `/healthz`, `/readyz` and `/metrics` (for probes from outside the pod).
pub async fn serve_probes(
    listener: TcpListener,
    handle: Handle,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    serve_with(listener, handle, limits, shutdown, true).await
}

async fn serve_with(
    listener: TcpListener,
    handle: Handle,
    limits: HttpLimits,
    shutdown: CancellationToken,
    probes_only: bool,
) {
    let tracker = TaskTracker::new();
    let mut acceptor =
        crate::net::accept::Acceptor::new(if probes_only { "probes" } else { "http" });
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            x = acceptor.accept(&listener) => x,
        };
        if open.load(Ordering::Relaxed) >= limits.max_connections {
            handle.io.http_refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let (handle, shutdown, open) = (handle.clone(), shutdown.clone(), open.clone());
        let (token, idle) = (limits.token.clone(), limits.idle_timeout);
        tracker.spawn(async move {
            let _guard = OpenGuard(open);
            connection(stream, handle, token, idle, probes_only, shutdown).await;
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Serves one connection (any byte stream: a socket, or an in-memory pipe in
/// the fuzzer) until it closes or `shutdown`, after which the request under
/// way finishes.
pub async fn connection<I>(
    io: I,
    handle: Handle,
    token: Option<Arc<Vec<u8>>>,
    idle: std::time::Duration,
    probes_only: bool,
    shutdown: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let stop = shutdown.clone();
    let svc = hyper::service::service_fn(move |req| {
        let (handle, token, stop) = (handle.clone(), token.clone(), stop.clone());
        async move {
            if probes_only && !matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics") {
                return Ok::<_, std::convert::Infallible>(left(err(
                    StatusCode::NOT_FOUND,
                    "no_route",
                    "only probes are served here",
                )));
            }
            // The probe port is reached by the kubelet with the pod's IP
            // as Host, and serves nothing a page could abuse.
            if !probes_only {
                let token = token.as_deref().map(|t| t.as_slice());
                if let Some(r) = refuse_forgeable(&req, token) {
                    return Ok(left(r));
                }
                if req.uri().path() == "/v1/changes" {
                    return Ok(match changes::watch(&req, &handle, &stop).await {
                        Ok(r) => r.map(Either::Right),
                        Err(r) => left(r),
                    });
                }
            }
            let watcher = req
                .headers()
                .get("sessionmesh-watcher")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(0u32);
            Ok(left(WATCHER.scope(watcher, route(req, &handle)).await))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(idle)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(error = %e, "http connection error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

fn left(r: Resp) -> Response<Either<Full<Bytes>, changes::ChangeBody>> {
    r.map(Either::Left)
}

/// Counts a connection as open for as long as it lives.
struct OpenGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn json_resp(status: StatusCode, v: &Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn err(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Resp {
    let mut r = json_resp(
        status,
        &json!({"error": code, "message": message.to_string()}),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(RETRY_AFTER, hyper::header::HeaderValue::from_static("1"));
    }
    r
}

fn no_content() -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

fn write_err(e: WriteError) -> Resp {
    let (status, code) = write_status(&e);
    err(status, code, &e)
}

/// A write error's status and code (the same in a batch's results).
fn write_status(e: &WriteError) -> (StatusCode, &'static str) {
    match e {
        WriteError::Store(s) => match s {
            StoreError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            StoreError::Invalidated => (StatusCode::GONE, "invalidated"),
            StoreError::Exists => (StatusCode::CONFLICT, "exists"),
            StoreError::AttrTooLarge { .. } | StoreError::SessionTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "too_large")
            }
            StoreError::Full { .. } => (StatusCode::INSUFFICIENT_STORAGE, "store_full"),
            StoreError::BadName { .. } => (StatusCode::BAD_REQUEST, "bad_attribute_name"),
        },
        WriteError::NotReady => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
        WriteError::Leaving => (StatusCode::SERVICE_UNAVAILABLE, "leaving"),
        WriteError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "replication_timeout"),
        WriteError::ClockSkew { .. } => (StatusCode::SERVICE_UNAVAILABLE, "clock_skew"),
    }
}

fn unavailable() -> Resp {
    err(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "the member is shutting down",
    )
}

/// The query string, decoded (`+` is a space, `%XX` a byte).
fn query(uri: &hyper::Uri) -> BTreeMap<String, String> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// A percent-encoded path segment, decoded (`+` stays a `+`).
fn pct_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn send_mode(q: &BTreeMap<String, String>) -> Result<Option<SendMode>, Resp> {
    match q.get("send").map(String::as_str) {
        None => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|e: String| err(StatusCode::BAD_REQUEST, "bad_request", e)),
    }
}

async fn body(req: Request<Incoming>, max: usize) -> Result<Bytes, Resp> {
    match Limited::new(req.into_body(), max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(err(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("request body exceeds {max} bytes"),
                ))
            } else {
                Err(err(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("cannot read body: {e}"),
                ))
            }
        }
    }
}

fn parse_json<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, Resp> {
    if b.is_empty() {
        return serde_json::from_slice(b"{}")
            .map_err(|e| err(StatusCode::BAD_REQUEST, "malformed_json", e));
    }
    serde_json::from_slice(b).map_err(|e| {
        err(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("malformed JSON: {e}"),
        )
    })
}

fn sid(raw: &str) -> Result<SessionId, Resp> {
    SessionId::parse(&pct_decode(raw))
        .map_err(|e| err(StatusCode::BAD_REQUEST, "bad_session_id", e))
}

fn session_json(id: &SessionId, s: &Session, route: &str) -> Value {
    let attrs: Map<String, Value> = s
        .live_attrs()
        .map(|(k, v)| (k.clone(), Value::String(B64.encode(v))))
        .collect();
    json!({
        "id": id.as_str(),
        "routedId": format!("{}.{}", id.as_str(), route),
        "createdMs": s.created_ms,
        "lastAccessedMs": s.last_accessed_ms,
        "maxInactiveSeconds": s.max_inactive_ms / 1000,
        "expiresAtMs": s.expires_at_ms(),
        "attributes": attrs,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateBody {
    id: Option<String>,
    max_inactive_seconds: Option<u64>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PatchBody {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
    max_inactive_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RenameBody {
    new_id: String,
}

fn decode_attrs(m: BTreeMap<String, String>) -> Result<Vec<Op>, Resp> {
    m.into_iter()
        .map(|(name, v)| {
            B64.decode(v.as_bytes())
                .map(|value| Op::Set {
                    name: name.clone(),
                    value: value.into(),
                })
                .map_err(|e| {
                    err(
                        StatusCode::BAD_REQUEST,
                        "bad_base64",
                        format!("attribute {name:?} is not valid base64: {e}"),
                    )
                })
        })
        .collect()
}

fn max_inactive(secs: Option<u64>) -> Result<Option<u64>, Resp> {
    match secs {
        Some(s) if s > 10 * 365 * 24 * 3600 => Err(err(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "maxInactiveSeconds is too large",
        )),
        Some(s) => Ok(Some(s * 1000)),
        None => Ok(None),
    }
}

async fn write(
    h: &Handle,
    id: SessionId,
    ops: Vec<Op>,
    mi: Option<u64>,
    mode: Option<SendMode>,
) -> Result<(), Resp> {
    let origin = origin();
    let r = h
        .txn_on(keys(&id, &ops), move |tx| {
            match tx_write(tx, origin, id, ops, mi, mode) {
                Ok(None) => Step::Ready(Ok(())),
                Ok(Some(t)) => Step::after(move |r| r[t.0].clone()),
                Err(e) => Step::Ready(Err(e)),
            }
        })
        .await;
    match r {
        None => Err(unavailable()),
        Some(Err(e)) => Err(write_err(e)),
        Some(Ok(())) => Ok(()),
    }
}

/// The sessions a write works on: its own, and a rename's new id.
fn keys(id: &SessionId, ops: &[Op]) -> Vec<SessionId> {
    let mut k = vec![id.clone()];
    k.extend(ops.iter().filter_map(|o| match o {
        Op::Rename { to } => Some(to.clone()),
        _ => None,
    }));
    k
}

async fn read(h: &Handle, id: SessionId, touch: bool) -> Result<Session, Resp> {
    let r = h
        .txn_on(vec![id.clone()], move |tx| {
            let now = tx.now();
            Step::Ready(tx.core_mut().read(&id, touch, now))
        })
        .await;
    match r {
        None => Err(unavailable()),
        Some(r) => r.map_err(write_err),
    }
}

async fn route(req: Request<Incoming>, h: &Handle) -> Resp {
    match handle(req, h).await {
        Ok(r) | Err(r) => r,
    }
}

async fn handle(req: Request<Incoming>, h: &Handle) -> Result<Resp, Resp> {
    let path = req.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    let q = query(req.uri());
    match (&method, parts.as_slice()) {
        (&Method::POST, ["v1", "test", "freeze-core"]) if h.test_hooks => {
            probes::freeze(h, &q).await
        }
        (&Method::GET, ["healthz"]) => probes::healthz(h).await,
        (&Method::GET, ["readyz"]) => probes::readyz(h).await,
        (&Method::GET, ["v1", "cluster"]) => probes::cluster(h).await,
        (&Method::GET, ["metrics"]) => probes::metrics(h).await,
        (&Method::POST, ["v1", "sessions"]) => sessions::create(req, h, &q).await,
        (&Method::POST, ["v1", "batch"]) => batch::batch(req, h, &q).await,
        (&Method::GET, ["v1", "sessions"]) => sessions::list(h, &q).await,
        (&Method::GET, ["v1", "sessions", id]) => {
            sessions::get(h, &q, id, req.headers().get(IF_NONE_MATCH)).await
        }
        (&Method::PATCH, ["v1", "sessions", id]) => sessions::patch(req, h, &q, id).await,
        (&Method::DELETE, ["v1", "sessions", id]) => sessions::delete(h, &q, id).await,
        (&Method::POST, ["v1", "sessions", id, "touch"]) => sessions::touch(h, id).await,
        (&Method::POST, ["v1", "sessions", id, "rename"]) => sessions::rename(req, h, &q, id).await,
        (&Method::GET, ["v1", "sessions", id, "attributes", name]) => {
            sessions::get_attr(h, &q, id, name).await
        }
        (&Method::PUT, ["v1", "sessions", id, "attributes", name]) => {
            sessions::put_attr(req, h, &q, id, name).await
        }
        (&Method::DELETE, ["v1", "sessions", id, "attributes", name]) => {
            sessions::delete_attr(h, &q, id, name).await
        }
        (
            _,
            ["healthz"] | ["readyz"] | ["metrics"] | ["v1", "cluster"] | ["v1", "sessions", ..],
        ) => Err(err(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        )),
        _ => Err(err(
            StatusCode::NOT_FOUND,
            "no_route",
            format!("no such endpoint: {path}"),
        )),
    }
}

#[cfg(test)]
mod decode_tests {
    use super::*;

    #[test]
    fn path_segments_and_queries_decode_every_escape() {
        assert_eq!(
            pct_decode("a%2Fb%41"),
            "a/bA",
            "an escape at the very end too"
        );
        assert_eq!(
            pct_decode("a+b%2"),
            "a+b%2",
            "a broken escape stays as it is"
        );
        let uri: hyper::Uri = "/v1/sessions?limit=5&cursor=a%20b&send=sy%6Ec&x=1+2"
            .parse()
            .expect("uri");
        let q = query(&uri);
        assert_eq!(q["cursor"], "a b");
        assert_eq!(q["send"], "sync");
        assert_eq!(q["x"], "1 2");
        assert_eq!(q["limit"], "5");
    }
}
