//! A small HTTP/1.1 client over one keep-alive connection, used by the demo,
//! the bench harness and the process-level tests to talk to sidecars.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;

pub struct Client {
    addr: SocketAddr,
    conn: Option<SendRequest<Full<Bytes>>>,
    pub timeout: Duration,
    /// Sent as `Authorization: Bearer` when the sidecar has `--api-token-file`.
    token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    pub headers: hyper::HeaderMap,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Client {
            addr,
            conn: None,
            timeout: Duration::from_secs(5),
            token: None,
        }
    }

    /// A client that authenticates with the sidecar's API token.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    async fn connect(&mut self) -> anyhow::Result<&mut SendRequest<Full<Bytes>>> {
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            let s = tokio::net::TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.conn = Some(tx);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no connection"))
    }

    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> anyhow::Result<Reply> {
        self.request_with(method, path, &[], body).await
    }

    /// A request with extra headers (`(name, value)` pairs). A request that
    /// could not even be sent on a kept-alive connection the server had just
    /// closed is retried once on a new connection.
    pub async fn request_with(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: impl Into<Bytes>,
    ) -> anyhow::Result<Reply> {
        let body = body.into();
        let reused = self.conn.as_ref().is_some_and(|c| !c.is_closed());
        match self
            .try_request(method.clone(), path, headers, body.clone())
            .await
        {
            Err(e)
                if reused
                    && e.downcast_ref::<hyper::Error>()
                        .is_some_and(|h| h.is_canceled() || h.is_closed()) =>
            {
                self.try_request(method, path, headers, body).await
            }
            r => r,
        }
    }

    async fn try_request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> anyhow::Result<Reply> {
        let timeout = self.timeout;
        let token = self.token.clone();
        let fut = async {
            let conn = self.connect().await?;
            conn.ready().await?;
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "localhost")
                .header("content-type", "application/json");
            if let Some(t) = &token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            for (k, v) in headers {
                req = req.header(*k, v.as_str());
            }
            let resp = conn.send_request(req.body(Full::new(body))?).await?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, anyhow::Error>(Reply {
                status,
                body,
                headers,
            })
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                anyhow::bail!("request timed out")
            }
        }
    }

    pub async fn get(&mut self, path: &str) -> anyhow::Result<Reply> {
        self.request(Method::GET, path, Bytes::new()).await
    }
    pub async fn post(&mut self, path: &str, body: impl Into<Bytes>) -> anyhow::Result<Reply> {
        self.request(Method::POST, path, body).await
    }
    pub async fn put(&mut self, path: &str, body: impl Into<Bytes>) -> anyhow::Result<Reply> {
        self.request(Method::PUT, path, body).await
    }
    pub async fn delete(&mut self, path: &str) -> anyhow::Result<Reply> {
        self.request(Method::DELETE, path, Bytes::new()).await
    }
}
