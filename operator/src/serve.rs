//! The operator's HTTP endpoints (the webhook over TLS, health and metrics in
//! clear) on hyper with hyper-util's graceful shutdown. Accept errors (out of
//! file descriptors) back off with jitter instead of spinning; a connection
//! gets a bounded time for its TLS handshake and headers; on shutdown the
//! listener closes and open connections finish their request, for at most
//! `DRAIN`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long a client has for its TLS handshake and for its request headers.
const HANDSHAKE: Duration = Duration::from_secs(5);
/// How long open connections may take to finish once shutdown starts.
const DRAIN: Duration = Duration::from_secs(5);

/// The waits after failed accepts: 5 ms doubling to 1 s, jittered.
fn accept_delays() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(5))
        .with_max_delay(Duration::from_secs(1))
        .with_jitter()
        .without_max_times()
        .build()
}

/// The next connection, or `None` on shutdown; failures wait with back-off.
async fn accept(
    what: &str,
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<TcpStream> {
    let mut delays = accept_delays();
    let mut failures = 0u64;
    loop {
        let r = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = listener.accept() => r,
        };
        match r {
            Ok((stream, _)) => {
                if failures > 0 {
                    info!(listener = what, failures, "accepting connections again");
                }
                return Some(stream);
            }
            Err(e) => {
                if failures == 0 {
                    warn!(listener = what, error = %e, "accept failed; backing off (out of file descriptors?)");
                }
                failures += 1;
                let wait = delays.next().unwrap_or(Duration::from_secs(1));
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Serves `handler` on `listener` (over TLS when `tls` is given) until `shutdown`.
pub async fn serve<F, Fut>(
    what: &'static str,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: F,
    shutdown: CancellationToken,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    while let Some(stream) = accept(what, &listener, &shutdown).await {
        let watcher = graceful.watcher();
        let (tls, handler) = (tls.clone(), handler.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, std::convert::Infallible>(handler(req).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE);
            match tls {
                Some(acceptor) => {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    let _ = watcher.watch(conn).await;
                }
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    let _ = watcher.watch(conn).await;
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            listener = what,
            "connections still open after the drain time; closing them"
        );
    }
}

/// A plain-text response with `status`.
pub fn text(status: hyper::StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_until_shutdown_and_then_refuses_new_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            "test",
            listener,
            None,
            |req: Request<Incoming>| async move {
                text(hyper::StatusCode::OK, format!("path {}", req.uri().path()))
            },
            shutdown.clone(),
        ));
        let r = get(addr, "/x").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.ends_with("path /x"), "{r}");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server ends after shutdown")
            .expect("no panic");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the listener is closed"
        );
    }

    #[tokio::test]
    async fn an_open_idle_connection_does_not_hold_shutdown_past_the_drain_time() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            "test",
            listener,
            None,
            |_req: Request<Incoming>| async move { text(hyper::StatusCode::OK, "ok") },
            shutdown.clone(),
        ));
        // A client that connects and sends nothing; the request after it is
        // answered only once the loop has accepted it (accepts are in order).
        let _idle = TcpStream::connect(addr).await.expect("connect");
        assert!(get(addr, "/").await.starts_with("HTTP/1.1 200"));
        let started = std::time::Instant::now();
        shutdown.cancel();
        tokio::time::timeout(DRAIN + Duration::from_secs(5), server)
            .await
            .expect("shutdown is bounded")
            .expect("no panic");
        assert!(started.elapsed() <= DRAIN + Duration::from_secs(1));
    }
}
