//! A small cookie-sticky HTTP router, used by the demo when HAProxy is not
//! installed. It does what the recommended HAProxy configuration does:
//! `cookie SERVERID insert indirect nocache`, health checks on `/health`,
//! `option redispatch` with retries on connection failure, and a maintenance
//! state for draining a server.

use crate::demo::app::cookie;
use crate::demo::client::Client;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub up: AtomicBool,
    pub maint: AtomicBool,
}

#[derive(Clone)]
pub struct Router {
    pub backends: Arc<Vec<Backend>>,
    rr: Arc<AtomicUsize>,
}

impl Router {
    pub fn new(backends: Vec<(String, SocketAddr)>) -> Self {
        Router {
            backends: Arc::new(
                backends
                    .into_iter()
                    .map(|(name, addr)| Backend {
                        name,
                        addr,
                        up: AtomicBool::new(false),
                        maint: AtomicBool::new(false),
                    })
                    .collect(),
            ),
            rr: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn set_maint(&self, name: &str, maint: bool) {
        if let Some(b) = self.backends.iter().find(|b| b.name == name) {
            b.maint.store(maint, Ordering::Relaxed);
        }
    }

    fn usable(&self, i: usize) -> bool {
        let b = &self.backends[i];
        b.up.load(Ordering::Relaxed) && !b.maint.load(Ordering::Relaxed)
    }

    /// Health checks every 100 ms until cancelled.
    pub async fn check_loop(self, stop: CancellationToken) {
        let mut clients: Vec<Client> = self.backends.iter().map(|b| Client::new(b.addr)).collect();
        for c in clients.iter_mut() {
            c.timeout = Duration::from_millis(500);
        }
        loop {
            for (i, c) in clients.iter_mut().enumerate() {
                let ok = c.get("/health").await.is_ok_and(|r| r.status == 200);
                self.backends[i].up.store(ok, Ordering::Relaxed);
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    pub async fn serve(self, listener: TcpListener, stop: CancellationToken) {
        let mut acceptor = crate::net::accept::Acceptor::new("router");
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => return,
                x = acceptor.accept(&listener) => x,
            };
            let _ = stream.set_nodelay(true);
            let router = self.clone();
            tokio::spawn(async move {
                let mut conns: Vec<Option<Client>> =
                    (0..router.backends.len()).map(|_| None).collect();
                let conns = Arc::new(tokio::sync::Mutex::new(std::mem::take(&mut conns)));
                let svc = hyper::service::service_fn(move |req| {
                    let router = router.clone();
                    let conns = conns.clone();
                    async move { Ok::<_, std::convert::Infallible>(router.forward(req, &conns).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        conns: &tokio::sync::Mutex<Vec<Option<Client>>>,
    ) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let cookies: String = req
            .headers()
            .get_all(hyper::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join("; ");
        let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
            return status(StatusCode::BAD_REQUEST);
        };
        let sticky = cookie(&cookies, "SERVERID")
            .and_then(|s| self.backends.iter().position(|b| b.name == s));
        // Persistence first, then round-robin; on connection failure, redispatch.
        let mut tried = Vec::new();
        for _attempt in 0..=self.backends.len() {
            let pick = match sticky.filter(|i| self.usable(*i) && !tried.contains(i)) {
                Some(i) => Some(i),
                None => (0..self.backends.len())
                    .map(|k| (self.rr.fetch_add(1, Ordering::Relaxed) + k) % self.backends.len())
                    .find(|i| self.usable(*i) && !tried.contains(i)),
            };
            let Some(i) = pick else { break };
            tried.push(i);
            let mut guard = conns.lock().await;
            let c = guard[i].get_or_insert_with(|| Client::new(self.backends[i].addr));
            let headers = [("cookie", cookies.clone())];
            match c
                .request_with(method.clone(), &path, &headers, body.clone())
                .await
            {
                Ok(r) => {
                    let mut out = Response::new(Full::new(r.body));
                    *out.status_mut() =
                        StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
                    for (k, v) in r.headers.iter() {
                        if k != hyper::header::CONTENT_LENGTH
                            && k != hyper::header::TRANSFER_ENCODING
                            && k != hyper::header::CONNECTION
                        {
                            out.headers_mut().append(k, v.clone());
                        }
                    }
                    if sticky != Some(i) {
                        if let Ok(v) = hyper::header::HeaderValue::from_str(&format!(
                            "SERVERID={}; path=/",
                            self.backends[i].name
                        )) {
                            out.headers_mut().append(hyper::header::SET_COOKIE, v);
                        }
                        out.headers_mut().insert(
                            hyper::header::CACHE_CONTROL,
                            hyper::header::HeaderValue::from_static("private"),
                        );
                    }
                    return out;
                }
                Err(_) => {
                    guard[i] = None;
                    self.backends[i].up.store(false, Ordering::Relaxed);
                }
            }
        }
        status(StatusCode::SERVICE_UNAVAILABLE)
    }
}

fn status(s: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = s;
    r
}
