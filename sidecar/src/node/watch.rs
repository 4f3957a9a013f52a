//! The apps watching for changed sessions (`GET /v1/changes`): each gets a
//! line per changed session, written by the core task at the end of every
//! round, before anything of that round goes to a peer. So in `sync` mode a
//! change made elsewhere is on its way to the watching app before the writer's
//! acknowledgement is: the app's near cache is never read stale after the
//! write was answered.

use bytes::{BufMut, Bytes, BytesMut};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// A watcher that falls this far behind is dropped: its stream ends and the
/// app, which then trusts none of its copies, subscribes again.
pub const MAX_QUEUED_BYTES: usize = 4 << 20;

struct Watcher {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
}

/// What a subscriber reads: chunks of lines, and how many bytes wait.
pub struct Subscription {
    pub rx: mpsc::UnboundedReceiver<Bytes>,
    pub queued: Arc<AtomicUsize>,
}

#[derive(Default)]
pub struct Watchers {
    list: Mutex<Vec<Watcher>>,
    count: AtomicUsize,
    /// Watchers dropped for falling behind.
    pub dropped: AtomicU64,
}

impl Watchers {
    pub fn subscribe(&self) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let mut l = self.list.lock().unwrap_or_else(|e| e.into_inner());
        l.push(Watcher {
            tx,
            queued: queued.clone(),
        });
        self.count.store(l.len(), Ordering::Relaxed);
        Subscription { rx, queued }
    }

    /// Watchers connected now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Sends one chunk to every watcher; forgets those gone or too far behind.
    pub fn publish(&self, chunk: &Bytes) {
        let mut l = self.list.lock().unwrap_or_else(|e| e.into_inner());
        l.retain(|w| {
            if w.queued.load(Ordering::Relaxed) + chunk.len() > MAX_QUEUED_BYTES {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            w.queued.fetch_add(chunk.len(), Ordering::Relaxed);
            w.tx.send(chunk.clone()).is_ok()
        });
        self.count.store(l.len(), Ordering::Relaxed);
    }

    /// Ends every stream (the member stops).
    pub fn close_all(&self) {
        let mut l = self.list.lock().unwrap_or_else(|e| e.into_inner());
        l.clear();
        self.count.store(0, Ordering::Relaxed);
    }
}

/// The lines of a change chunk: `"<version>" <id>` for a session as it is
/// now (the version is its `ETag`), `- <id>` for one gone.
pub fn encode(changes: &[(crate::core::identity::SessionId, Option<u64>)]) -> Bytes {
    let mut b = BytesMut::with_capacity(changes.len() * 48);
    for (id, v) in changes {
        match v {
            Some(v) => b.put_slice(format!("\"{v:016x}\" ").as_bytes()),
            None => b.put_slice(b"- "),
        }
        b.put_slice(id.as_str().as_bytes());
        b.put_u8(b'\n');
    }
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::identity::SessionId;

    #[test]
    fn lines_name_the_version_or_a_dash() {
        let a = SessionId::parse("a1").unwrap();
        let b = SessionId::parse("b2").unwrap();
        let got = encode(&[(a, Some(0xab)), (b, None)]);
        assert_eq!(&got[..], b"\"00000000000000ab\" a1\n- b2\n");
    }

    #[test]
    fn a_watcher_that_does_not_read_is_dropped_and_the_others_keep_their_stream() {
        let w = Watchers::default();
        let mut reader = w.subscribe();
        let _stuck = w.subscribe();
        assert_eq!(w.count(), 2);
        let chunk = Bytes::from(vec![b'x'; MAX_QUEUED_BYTES / 4]);
        for _ in 0..6 {
            w.publish(&chunk);
            while let Ok(c) = reader.rx.try_recv() {
                reader.queued.fetch_sub(c.len(), Ordering::Relaxed);
            }
        }
        assert_eq!(w.count(), 1, "the stuck watcher is gone");
        assert_eq!(w.dropped.load(Ordering::Relaxed), 1);
        w.publish(&chunk);
        assert!(reader.rx.try_recv().is_ok(), "the reader still gets chunks");
        drop(reader);
        w.publish(&chunk);
        assert_eq!(w.count(), 0, "a closed stream is forgotten");
    }
}
