//! Transactions: the one way a front-end reads or changes the store.
//!
//! A transaction is a closure run on the core task in one go, so it is atomic
//! with respect to every other request and to the peers' deltas. It may make
//! any number of writes; those that wait for acknowledgements (sync mode,
//! back-pressure) get a `Ticket`, and the transaction's continuation runs once
//! every ticket has its result. The runtime knows nothing of HTTP or Redis: it
//! keeps one table of pending writes for every front-end.

use crate::core::identity::SessionId;
use crate::core::store::Op;
use crate::core::{Core, SendMode, WriteError};
use std::collections::HashMap;

/// The results of a transaction's waiting writes, indexed by `Ticket`.
pub type Results = Vec<Result<(), WriteError>>;

/// What runs once a transaction's writes are done.
pub type Done = Box<dyn FnOnce(Results) + Send>;

/// A transaction as the runtime sees it.
pub type TxnFn = Box<dyn FnOnce(&mut Tx<'_>) -> Done + Send>;

/// A write that completes later; its result is `Results[ticket.0]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(pub usize);

/// The view a transaction has of the core.
pub struct Tx<'a> {
    core: &'a mut Core,
    now: u64,
    next_write: &'a mut u64,
    waiting: Vec<u64>,
}

impl<'a> Tx<'a> {
    pub fn new(core: &'a mut Core, now: u64, next_write: &'a mut u64) -> Self {
        Tx {
            core,
            now,
            next_write,
            waiting: Vec::new(),
        }
    }

    /// The current time (wall clock, ms) the whole transaction sees.
    pub fn now(&self) -> u64 {
        self.now
    }

    pub fn core(&self) -> &Core {
        self.core
    }

    /// For reads that change bookkeeping (a read that touches a session).
    pub fn core_mut(&mut self) -> &mut Core {
        self.core
    }

    /// One write. `Ok(None)`: done; `Ok(Some(ticket))`: its result comes
    /// with the transaction's `Results`. `grace_ms` is how long past its expiry
    /// a session is still found (see `Core::write_with`).
    pub fn write(
        &mut self,
        id: SessionId,
        ops: Vec<Op>,
        max_inactive_ms: Option<u64>,
        mode: Option<SendMode>,
        grace_ms: Option<u64>,
    ) -> Result<Option<Ticket>, WriteError> {
        let w = *self.next_write;
        *self.next_write += 1;
        let grace = grace_ms.unwrap_or(self.core.cfg.touch_flush_ms);
        let done = self
            .core
            .write_with(w, id, ops, max_inactive_ms, mode, self.now, grace)?;
        if done {
            return Ok(None);
        }
        self.waiting.push(w);
        Ok(Some(Ticket(self.waiting.len() - 1)))
    }
}

/// What a front-end's transaction gives back: a value now, or a continuation
/// that makes the value from the results of its waiting writes.
pub enum Step<T> {
    Ready(T),
    After(Box<dyn FnOnce(Results) -> T + Send>),
}

impl<T> Step<T> {
    pub fn after(f: impl FnOnce(Results) -> T + Send + 'static) -> Self {
        Step::After(Box::new(f))
    }
}

/// A transaction whose writes are not all done.
struct Open {
    results: Results,
    waiting: usize,
    done: Done,
}

/// Every transaction waiting for writes, and which write belongs to which.
#[derive(Default)]
pub struct Pending {
    writes: HashMap<u64, (u64, usize)>,
    txns: HashMap<u64, Open>,
    next: u64,
    /// Transactions not run yet: their sessions are being fetched from
    /// their holders (backup mode), by fetch.
    parked: HashMap<u64, TxnFn>,
}

impl Pending {
    /// Holds `job` until fetch `fetch` is done.
    pub fn park(&mut self, fetch: u64, job: TxnFn) {
        self.parked.insert(fetch, job);
    }

    /// The transaction that waited for fetch `fetch`, to run now.
    pub fn unpark(&mut self, fetch: u64) -> Option<TxnFn> {
        self.parked.remove(&fetch)
    }

    /// Runs `job` on `core`, and its continuation at once if it made no
    /// waiting write.
    pub fn run(&mut self, core: &mut Core, now: u64, next_write: &mut u64, job: TxnFn) {
        let mut tx = Tx::new(core, now, next_write);
        let done = job(&mut tx);
        let waiting = tx.waiting;
        if waiting.is_empty() {
            done(Vec::new());
            return;
        }
        let t = self.next;
        self.next += 1;
        for (i, w) in waiting.iter().enumerate() {
            self.writes.insert(*w, (t, i));
        }
        let open = Open {
            results: vec![Ok(()); waiting.len()],
            waiting: waiting.len(),
            done,
        };
        self.txns.insert(t, open);
    }

    /// A write finished; runs its transaction's continuation if it was the last.
    pub fn complete(&mut self, write: u64, result: Result<(), WriteError>) {
        let Some((t, i)) = self.writes.remove(&write) else {
            return;
        };
        let Some(open) = self.txns.get_mut(&t) else {
            return;
        };
        open.results[i] = result;
        open.waiting -= 1;
        if open.waiting == 0 {
            if let Some(open) = self.txns.remove(&t) {
                (open.done)(open.results);
            }
        }
    }

    /// Transactions still waiting.
    pub fn len(&self) -> usize {
        self.txns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.txns.is_empty()
    }
}

/// Wraps a front-end's transaction for the runtime: the value reaches `reply`.
pub fn boxed<T: Send + 'static>(
    f: impl FnOnce(&mut Tx<'_>) -> Step<T> + Send + 'static,
    reply: tokio::sync::oneshot::Sender<T>,
) -> TxnFn {
    Box::new(move |tx| match f(tx) {
        Step::Ready(v) => {
            let _ = reply.send(v);
            Box::new(|_| {})
        }
        Step::After(k) => Box::new(move |r| {
            let _ = reply.send(k(r));
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::identity::{Generation, NodeId};
    use crate::core::CoreConfig;
    use std::sync::{Arc, Mutex};

    fn core(send: SendMode) -> Core {
        let me = NodeId {
            name: "a".into(),
            generation: Generation(1),
        };
        let cfg = CoreConfig {
            send,
            ..CoreConfig::default()
        };
        let mut c = Core::new(me, cfg, &[], 0);
        c.tick(10_000);
        c
    }

    fn sid(s: &str) -> SessionId {
        SessionId::parse(s).expect("valid id")
    }

    #[test]
    fn a_transaction_without_waiting_writes_finishes_at_once() {
        let mut c = core(SendMode::Async);
        let mut p = Pending::default();
        let mut next = 0;
        let seen = Arc::new(Mutex::new(None));
        let s = seen.clone();
        p.run(
            &mut c,
            10_000,
            &mut next,
            Box::new(move |tx| {
                let t = tx.write(sid("s1"), vec![Op::Create], None, None, None);
                let t2 = tx.write(sid("s2"), vec![Op::Create], None, None, None);
                Box::new(move |r| *s.lock().expect("lock") = Some((t, t2, r.len())))
            }),
        );
        let got = seen.lock().expect("lock").take();
        assert!(matches!(got, Some((Ok(None), Ok(None), 0))), "{got:?}");
        assert!(p.is_empty());
        assert_eq!(next, 2, "each write gets its own number");
        assert_eq!(c.store.live_count(), 2);
    }

    #[test]
    fn the_continuation_runs_after_the_last_waiting_write_with_each_result() {
        let mut c = core(SendMode::Sync);
        c.set_members(&["a".into(), "b".into()], 10_000);
        let mut p = Pending::default();
        let mut next = 100;
        let seen = Arc::new(Mutex::new(None));
        let s = seen.clone();
        p.run(
            &mut c,
            10_000,
            &mut next,
            Box::new(move |tx| {
                let t1 = tx.write(sid("s1"), vec![Op::Create], None, None, None);
                let t2 = tx.write(sid("s2"), vec![Op::Create], None, None, None);
                assert_eq!(t1.ok().flatten(), Some(Ticket(0)));
                assert_eq!(t2.ok().flatten(), Some(Ticket(1)));
                Box::new(move |r| *s.lock().expect("lock") = Some(r))
            }),
        );
        assert_eq!(p.len(), 1);
        p.complete(101, Err(WriteError::Timeout(5)));
        assert!(
            seen.lock().expect("lock").is_none(),
            "one write is still out"
        );
        p.complete(999, Ok(()));
        assert!(
            seen.lock().expect("lock").is_none(),
            "an unknown write changes nothing"
        );
        p.complete(100, Ok(()));
        let r = seen.lock().expect("lock").take().expect("finished");
        assert!(r[0].is_ok());
        assert!(matches!(r[1], Err(WriteError::Timeout(5))));
        assert!(p.is_empty());
    }

    #[test]
    fn a_refused_write_is_an_error_and_waits_for_nothing() {
        let me = NodeId {
            name: "a".into(),
            generation: Generation(1),
        };
        // Not ready yet: a peer is known and no state transfer happened.
        let mut c = Core::new(me, CoreConfig::default(), &["b".into()], 0);
        let mut p = Pending::default();
        let mut next = 0;
        let seen = Arc::new(Mutex::new(None));
        let s = seen.clone();
        p.run(
            &mut c,
            0,
            &mut next,
            Box::new(move |tx| {
                let r = tx.write(sid("s1"), vec![Op::Create], None, None, None);
                *s.lock().expect("lock") = Some(r.is_err());
                Box::new(|_| {})
            }),
        );
        assert_eq!(*seen.lock().expect("lock"), Some(true));
        assert!(p.is_empty());
    }
}
