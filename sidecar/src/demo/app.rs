//! The demo web app: a per-user counter kept in the session through the local
//! sidecar's HTTP API, with Tomcat's cookie convention `JSESSIONID=<id>.<jvmRoute>`.
//!
//! After a failover it rebinds the session to its own route, as Tomcat's
//! JvmRouteBinderValve does: `ABC.node1` becomes `ABC.node2` in a new cookie.
//! The sidecar keys sessions by `ABC`, so nothing is copied. It never logs
//! session ids.

use crate::demo::client::Client;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, COOKIE, SET_COOKIE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub struct AppConfig {
    pub name: String,
    pub route: String,
    pub sidecar: SocketAddr,
    /// `sync` or `async` (the counter must survive a crash right after a
    /// response, so the demo defaults to `sync`).
    pub send: String,
    /// The sidecar's API token, when it has one.
    pub token: Option<String>,
}

struct App {
    cfg: AppConfig,
    pool: Mutex<Vec<Client>>,
}

impl App {
    fn client(&self) -> Client {
        self.pool
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_else(|| Client::new(self.cfg.sidecar).with_token(self.cfg.token.clone()))
    }
    fn give_back(&self, c: Client) {
        if let Ok(mut p) = self.pool.lock() {
            if p.len() < 256 {
                p.push(c);
            }
        }
    }
}

/// Serves until the process ends.
pub async fn serve(listener: TcpListener, cfg: AppConfig) {
    let app = Arc::new(App {
        cfg,
        pool: Mutex::new(Vec::new()),
    });
    let mut acceptor = crate::net::accept::Acceptor::new("demo-app");
    loop {
        let (stream, _) = acceptor.accept(&listener).await;
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&app, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn resp(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// The value of cookie `name` in a request.
pub fn cookie(req_cookies: &str, name: &str) -> Option<String> {
    req_cookies
        .split(';')
        .map(str::trim)
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=').map(str::to_owned))
}

async fn handle(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut c = app.client();
    let r = match req.uri().path() {
        "/health" => match c.get("/readyz").await {
            Ok(r) if r.status == 200 => resp(
                StatusCode::OK,
                json!({"status": "ok", "node": app.cfg.name}),
            ),
            _ => resp(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "sidecar not ready", "node": app.cfg.name}),
            ),
        },
        _ => count(app, &mut c, &req).await,
    };
    app.give_back(c);
    r
}

type Resp = Response<Full<Bytes>>;

/// A 502 naming what failed at the sidecar.
fn bad_gateway(app: &App, what: &str, status: Option<u16>) -> Resp {
    resp(
        StatusCode::BAD_GATEWAY,
        json!({"error": what, "status": status, "node": app.cfg.name}),
    )
}

/// The session's counter: `Ok(Some(n))` for a known session, `Ok(None)` for
/// an unknown, expired or invalidated one.
async fn read_counter(app: &App, c: &mut Client, key: &str) -> Result<Option<u64>, Resp> {
    match c
        .get(&format!("/v1/sessions/{key}/attributes/counter"))
        .await
    {
        Ok(r) if r.status == 200 => Ok(Some(r.text().trim().parse().unwrap_or(0))),
        // 404: unknown or expired session, or no counter yet; 410: invalidated.
        Ok(r) if r.status == 404 || r.status == 410 => Ok(None),
        Ok(r) => Err(bad_gateway(app, "sidecar", Some(r.status))),
        Err(e) => Err(bad_gateway(app, &e.to_string(), None)),
    }
}

async fn create_session(app: &App, c: &mut Client) -> Result<String, Resp> {
    let send = &app.cfg.send;
    match c.post(&format!("/v1/sessions?send={send}"), "{}").await {
        Ok(r) if r.status == 201 => Ok(r.json()["id"].as_str().unwrap_or_default().to_owned()),
        Ok(r) => Err(bad_gateway(app, "create failed", Some(r.status))),
        Err(e) => Err(bad_gateway(app, &e.to_string(), None)),
    }
}

async fn write_counter(app: &App, c: &mut Client, key: &str, counter: u64) -> Result<(), Resp> {
    let send = &app.cfg.send;
    let path = format!("/v1/sessions/{key}/attributes/counter?send={send}");
    match c.put(&path, counter.to_string()).await {
        Ok(r) if r.status == 204 => Ok(()),
        Ok(r) => Err(bad_gateway(app, "write failed", Some(r.status))),
        Err(e) => Err(bad_gateway(app, &e.to_string(), None)),
    }
}

async fn count(app: &App, c: &mut Client, req: &Request<Incoming>) -> Resp {
    match count_steps(app, c, req).await {
        Ok(r) | Err(r) => r,
    }
}

/// Reads the counter of the session the cookie names (or creates one),
/// increments it, and sets the cookie when the session is new or rebound.
async fn count_steps(app: &App, c: &mut Client, req: &Request<Incoming>) -> Result<Resp, Resp> {
    let cookies: String = req
        .headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join("; ");
    let presented = cookie(&cookies, "JSESSIONID");
    let mut found = None;
    if let Some(full) = &presented {
        let k = full.split('.').next().unwrap_or_default().to_owned();
        if let Some(n) = read_counter(app, c, &k).await? {
            found = Some((k, n));
        }
    }
    let created = found.is_none();
    let (key, mut counter) = match found {
        Some(x) => x,
        None => (create_session(app, c).await?, 0),
    };
    counter += 1;
    write_counter(app, c, &key, counter).await?;
    let routed = format!("{key}.{}", app.cfg.route);
    let rebound = !created && presented.as_deref() != Some(routed.as_str());
    let mut r = resp(
        StatusCode::OK,
        json!({"counter": counter, "session": routed, "node": app.cfg.name, "new": created, "rebound": rebound}),
    );
    if created || rebound {
        if let Ok(v) =
            hyper::header::HeaderValue::from_str(&format!("JSESSIONID={routed}; Path=/; HttpOnly"))
        {
            r.headers_mut().insert(SET_COOKIE, v);
        }
    }
    Ok(r)
}
