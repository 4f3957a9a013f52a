//! The apps watching for changed sessions (`GET /v1/changes`): each gets a
//! line per changed session, written by the core task at the end of every
//! round, before anything of that round goes to a peer. So in `sync` mode a
//! change made elsewhere is on its way to the watching app before the writer's
//! acknowledgement is: the app's near cache is never read stale after the
//! write was answered.

use crate::core::Change;
use bytes::{BufMut, Bytes, BytesMut};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// A watcher that falls this far behind is dropped: its stream ends and the
/// app, which then trusts none of its copies, subscribes again.
pub const MAX_QUEUED_BYTES: usize = 4 << 20;

struct Watcher {
    id: u32,
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
}

/// What a subscriber reads: chunks of lines, and how many bytes wait.
pub struct Subscription {
    /// Named by the watcher's own writes (`Sessionmesh-Watcher`), which are
    /// not echoed back to it.
    pub id: u32,
    pub rx: mpsc::UnboundedReceiver<Bytes>,
    pub queued: Arc<AtomicUsize>,
}

#[derive(Default)]
pub struct Watchers {
    list: Mutex<Vec<Watcher>>,
    count: AtomicUsize,
    next_id: AtomicU32,
    /// Watchers dropped for falling behind.
    pub dropped: AtomicU64,
}

impl Watchers {
    pub fn subscribe(&self) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let id = self
            .next_id
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1)
            .max(1);
        let mut l = self.list.lock().unwrap_or_else(|e| e.into_inner());
        l.push(Watcher {
            id,
            tx,
            queued: queued.clone(),
        });
        self.count.store(l.len(), Ordering::Relaxed);
        Subscription { id, rx, queued }
    }

    /// Watchers connected now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Tells every watcher of the changes that were not all its own
    /// writes; forgets watchers gone or too far behind.
    pub fn publish(&self, changes: &[Change]) {
        let mut l = self.list.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Option<Bytes> = None;
        l.retain(|w| {
            let chunk = if changes.iter().any(|c| c.only_from == w.id) {
                encode(changes.iter().filter(|c| c.only_from != w.id))
            } else {
                all.get_or_insert_with(|| encode(changes.iter())).clone()
            };
            if chunk.is_empty() {
                return !w.tx.is_closed();
            }
            if w.queued.load(Ordering::Relaxed) + chunk.len() > MAX_QUEUED_BYTES {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            w.queued.fetch_add(chunk.len(), Ordering::Relaxed);
            w.tx.send(chunk).is_ok()
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
pub fn encode<'a>(changes: impl Iterator<Item = &'a Change>) -> Bytes {
    let mut b = BytesMut::new();
    for c in changes {
        let id = &c.id;
        match c.version {
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

    fn change(id: &str, version: Option<u64>, only_from: u32) -> Change {
        Change {
            id: SessionId::parse(id).unwrap(),
            version,
            only_from,
        }
    }

    #[test]
    fn lines_name_the_version_or_a_dash() {
        let got = encode([change("a1", Some(0xab), 0), change("b2", None, 0)].iter());
        assert_eq!(&got[..], b"\"00000000000000ab\" a1\n- b2\n");
    }

    #[test]
    fn a_watcher_is_not_told_of_its_own_writes_and_the_others_are() {
        let w = Watchers::default();
        let mut one = w.subscribe();
        let mut two = w.subscribe();
        assert_ne!(one.id, two.id);
        w.publish(&[change("a", Some(1), one.id), change("b", Some(2), 0)]);
        assert_eq!(&one.rx.try_recv().unwrap()[..], b"\"0000000000000002\" b\n");
        let all = two.rx.try_recv().unwrap();
        assert_eq!(
            &all[..],
            b"\"0000000000000001\" a\n\"0000000000000002\" b\n"
        );
        w.publish(&[change("a", Some(3), one.id)]);
        assert!(
            one.rx.try_recv().is_err(),
            "nothing but its own write: no chunk"
        );
        assert!(two.rx.try_recv().is_ok());
    }

    #[test]
    fn a_watcher_that_does_not_read_is_dropped_and_the_others_keep_their_stream() {
        let w = Watchers::default();
        let mut reader = w.subscribe();
        let _stuck = w.subscribe();
        assert_eq!(w.count(), 2);
        let id = "x".repeat(200);
        let many: Vec<Change> = (0..2000).map(|_| change(&id, Some(1), 0)).collect();
        let per = encode(many.iter()).len();
        for _ in 0..(MAX_QUEUED_BYTES / per + 2) {
            w.publish(&many);
            while let Ok(c) = reader.rx.try_recv() {
                reader.queued.fetch_sub(c.len(), Ordering::Relaxed);
            }
        }
        assert_eq!(w.count(), 1, "the stuck watcher is gone");
        assert_eq!(w.dropped.load(Ordering::Relaxed), 1);
        w.publish(&many);
        assert!(reader.rx.try_recv().is_ok(), "the reader still gets chunks");
        drop(reader);
        w.publish(&many);
        assert_eq!(w.count(), 0, "a closed stream is forgotten");
    }
}
