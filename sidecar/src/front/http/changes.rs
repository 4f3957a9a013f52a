//! `GET /v1/changes`: a stream of the sessions that change, for an app that
//! keeps copies of sessions (a near cache, as the Tomcat Manager does) and
//! must never serve one that changed here or on another member.
//!
//! The answer is `200`, chunked, `text/plain`, and never ends while the member
//! runs. Its first line is `ready <watcher>`: from then on every change to a
//! session that the local API has read or written (an app holds copies of no
//! other) is sent as a line `"<version>" <id>` (the session's `ETag` now) or
//! `- <id>` (gone: invalidated, renamed away), written before the
//! acknowledgement of the change leaves this member. Writes that carry
//! `Sessionmesh-Watcher: <watcher>` are not echoed to that watcher. A watcher
//! that falls more than 4 MiB behind is dropped: the stream ends.

use super::*;
use crate::node::watch::Subscription;
use hyper::body::{Body, Frame};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio_util::sync::WaitForCancellationFutureOwned;

/// The stream's body: the chunks the core task sends, until it drops this
/// watcher or the member stops.
pub struct ChangeBody {
    first: Option<Bytes>,
    sub: Subscription,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Body for ChangeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let me = self.get_mut();
        if let Some(b) = me.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if me.stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        match me.sub.rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => {
                me.sub.queued.fetch_sub(b.len(), Ordering::Relaxed);
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Subscribes, turns the core's change log on, then answers `ready`.
pub(super) async fn watch(
    req: &Request<Incoming>,
    h: &Handle,
    stop: &CancellationToken,
) -> Result<Response<ChangeBody>, Resp> {
    if req.method() != Method::GET {
        return Err(err(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "GET /v1/changes",
        ));
    }
    let sub = h.watchers.subscribe();
    // Every change of a round after this one is recorded: what the app reads
    // after `ready` is covered.
    h.txn(|tx| {
        tx.core_mut().watch_changes();
        Step::Ready(())
    })
    .await
    .ok_or_else(unavailable)?;
    let body = ChangeBody {
        first: Some(Bytes::from(format!("ready {}\n", sub.id))),
        sub,
        stop: Box::pin(stop.clone().cancelled_owned()),
    };
    let mut r = Response::new(body);
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    Ok(r)
}

tokio::task_local! {
    /// The change watcher a request says it is (`Sessionmesh-Watcher`).
    pub(super) static WATCHER: u32;
}

/// The watcher the request under way named (0: none).
pub(super) fn origin() -> u32 {
    WATCHER.try_with(|w| *w).unwrap_or(0)
}

/// A local write, marked as `origin`'s own so its stream does not echo it.
pub(super) fn tx_write(
    tx: &mut crate::node::Tx<'_>,
    origin: u32,
    id: SessionId,
    ops: Vec<Op>,
    mi: Option<u64>,
    mode: Option<SendMode>,
) -> Result<Option<crate::node::Ticket>, WriteError> {
    tx.core_mut().set_change_origin(origin);
    let r = tx.write(id, ops, mi, mode, None);
    tx.core_mut().set_change_origin(0);
    r
}
