//! Which sessions changed, for the local app's near cache (`GET /v1/changes`).
//! Recorded only while an app watches, and only for sessions the local API
//! has read or written since (an app holds copies of no other). The runtime
//! hands them over at the end of every round of the core, before anything is
//! sent to a peer.

use super::*;
use std::collections::HashMap;

/// What the core records while watched.
#[derive(Debug, Default)]
pub struct Changes {
    /// Sessions changed this round, with the watcher whose own write it was
    /// (0: a peer's write, or a local client that is no watcher).
    log: Vec<(SessionId, u32)>,
    /// Sessions the local API has read or written while watched.
    interest: HashSet<SessionId>,
    /// The watcher making the local write under way (0: none).
    origin: u32,
}

/// A changed session as the watchers are told: its version now (`None`:
/// gone), and the one watcher not to tell because every change of the round
/// was its own write (0: tell all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub id: SessionId,
    pub version: Option<u64>,
    pub only_from: u32,
}

impl Core {
    /// Starts recording changed sessions (an app subscribed).
    pub fn watch_changes(&mut self) {
        self.changes.get_or_insert_with(Changes::default);
    }

    /// Stops recording (no app watches any more).
    pub fn unwatch_changes(&mut self) {
        self.changes = None;
    }

    /// The watcher whose write the local writes until the next call are (0: none).
    pub fn set_change_origin(&mut self, watcher: u32) {
        if let Some(c) = self.changes.as_mut() {
            c.origin = watcher;
        }
    }

    /// The sessions changed since the last call that the local API has read
    /// or written, each once, in order, with their version now
    /// (`Session::etag`), or `None` when they are gone (invalidated, renamed
    /// away, expired). Ids the HTTP API cannot name (Redis keys with spaces,
    /// other databases) are left out.
    pub fn take_changes(&mut self, now_ms: u64) -> Vec<Change> {
        let Some(c) = self.changes.as_mut() else {
            return Vec::new();
        };
        let log = std::mem::take(&mut c.log);
        let mut out: Vec<Change> = Vec::new();
        let mut at: HashMap<SessionId, usize> = HashMap::with_capacity(log.len());
        for (id, origin) in log {
            if !c.interest.contains(&id) || !http_visible(&id) {
                continue;
            }
            match at.get(&id) {
                Some(&i) if out[i].only_from != origin => out[i].only_from = 0,
                Some(_) => {}
                None => {
                    at.insert(id.clone(), out.len());
                    out.push(Change {
                        id,
                        version: None,
                        only_from: origin,
                    });
                }
            }
        }
        let grace = self.cfg.touch_flush_ms;
        for ch in &mut out {
            ch.version = self.store.get(&ch.id, now_ms, grace).ok().map(|s| s.etag());
            if ch.version.is_none() {
                c.interest.remove(&ch.id);
            }
        }
        // Sessions that expired unseen: forgotten once they outnumber the live ones.
        if c.interest.len() > 2 * self.store.live_count() + 1024 {
            let store = &self.store;
            c.interest.retain(|id| store.get(id, now_ms, grace).is_ok());
        }
        out
    }

    /// Notes the sessions a delta touches (its id, and a rename's target);
    /// `local`: written through the local API.
    pub(super) fn note_change(&mut self, d: &Delta, local: bool) {
        if let Some(c) = self.changes.as_mut() {
            let origin = if local { c.origin } else { 0 };
            if local {
                c.interest.insert(d.id.clone());
            }
            c.log.push((d.id.clone(), origin));
            for op in &d.ops {
                if let Op::Rename { to } = op {
                    if local {
                        c.interest.insert(to.clone());
                    }
                    c.log.push((to.clone(), origin));
                }
            }
        }
    }

    /// A session merged from a peer (transfer, anti-entropy).
    pub(super) fn note_changed_id(&mut self, id: &SessionId) {
        if let Some(c) = self.changes.as_mut() {
            c.log.push((id.clone(), 0));
        }
    }

    /// A session read through the local API: the app may now hold a copy.
    pub(super) fn note_read(&mut self, id: &SessionId) {
        if let Some(c) = self.changes.as_mut() {
            if !c.interest.contains(id) {
                c.interest.insert(id.clone());
            }
        }
    }
}

/// Whether the HTTP API names this id as it is (`SessionId::parse` keeps it).
fn http_visible(id: &SessionId) -> bool {
    id.as_str()
        .bytes()
        .all(|b| (0x21..=0x7e).contains(&b) && !matches!(b, b'/' | b'?' | b'#' | b'%' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store::Session;

    fn core() -> Core {
        Core::new(
            NodeId::new("a".into(), crate::core::identity::Generation(1)),
            CoreConfig::default(),
            &[],
            1_000,
        )
    }

    fn delta(id: &str, ops: Vec<Op>, c: &mut Core) -> Delta {
        Delta {
            id: SessionId::parse(id).unwrap(),
            hlc: c.clock.now(1_000),
            created_ms: 1_000,
            last_accessed_ms: 1_000,
            max_inactive_ms: 60_000,
            ops,
        }
    }

    fn set() -> Op {
        Op::Set {
            name: "a".into(),
            value: bytes::Bytes::from_static(b"1"),
        }
    }

    fn apply(c: &mut Core, d: &Delta, local: bool) {
        c.store.apply(d, 1_000);
        c.note_change(d, local);
    }

    #[test]
    fn only_sessions_the_local_api_used_while_watched_are_reported_once_with_their_version() {
        let mut c = core();
        let d = delta("s1", vec![Op::Create], &mut c);
        apply(&mut c, &d, true);
        assert!(c.take_changes(1_000).is_empty(), "not watched: nothing");
        c.watch_changes();
        let d = delta("s1", vec![set()], &mut c);
        apply(&mut c, &d, false);
        assert!(
            c.take_changes(1_000).is_empty(),
            "a peer's write of a session never used here is not reported"
        );
        c.note_read(&d.id);
        for _ in 0..2 {
            let d = delta("s1", vec![set()], &mut c);
            apply(&mut c, &d, false);
        }
        let now = c.store.get(&d.id, 1_000, 0).map(Session::etag).ok();
        assert!(now.is_some());
        let want = Change {
            id: d.id.clone(),
            version: now,
            only_from: 0,
        };
        assert_eq!(c.take_changes(1_000), vec![want]);
        assert!(c.take_changes(1_000).is_empty(), "taken once");
        c.unwatch_changes();
        apply(&mut c, &d, false);
        c.watch_changes();
        assert!(c.take_changes(1_000).is_empty(), "unwatched: forgotten");
    }

    #[test]
    fn a_watchers_own_write_is_marked_unless_another_change_joins_it_in_the_round() {
        let mut c = core();
        c.watch_changes();
        c.set_change_origin(7);
        let d = delta("w1", vec![Op::Create], &mut c);
        apply(&mut c, &d, true);
        c.set_change_origin(0);
        assert_eq!(c.take_changes(1_000)[0].only_from, 7);
        c.set_change_origin(7);
        let d = delta("w1", vec![set()], &mut c);
        apply(&mut c, &d, true);
        c.set_change_origin(0);
        let peer = delta("w1", vec![set()], &mut c);
        apply(&mut c, &peer, false);
        assert_eq!(c.take_changes(1_000)[0].only_from, 0, "a peer wrote too");
    }

    #[test]
    fn a_rename_reports_the_old_id_gone_and_the_new_one_and_keys_the_api_cannot_name_are_left_out()
    {
        let mut c = core();
        c.watch_changes();
        let d = delta("old", vec![Op::Create], &mut c);
        apply(&mut c, &d, true);
        let to = SessionId::parse("new").unwrap();
        let r = delta("old", vec![Op::Rename { to: to.clone() }], &mut c);
        c.take_changes(1_000);
        apply(&mut c, &r, true);
        let key = SessionId::key(b"a key").unwrap();
        c.note_read(&key);
        c.note_changed_id(&key);
        let got = c.take_changes(1_000);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].id, SessionId::parse("old").unwrap());
        assert_eq!(got[0].version, None);
        assert_eq!(got[1].id, to);
        assert!(got[1].version.is_some());
    }
}
