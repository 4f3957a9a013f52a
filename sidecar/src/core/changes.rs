//! Which sessions changed, for the local app's near cache (`GET /v1/changes`).
//! Recorded only while an app watches; the runtime hands them over at the end
//! of every round of the core, before anything is sent to a peer.

use super::*;

impl Core {
    /// Starts recording changed sessions (an app subscribed).
    pub fn watch_changes(&mut self) {
        self.changes.get_or_insert_with(Vec::new);
    }

    /// Stops recording (no app watches any more).
    pub fn unwatch_changes(&mut self) {
        self.changes = None;
    }

    /// The sessions changed since the last call, each once, in order, with
    /// their version now (`Session::etag`), or `None` when they are gone
    /// (invalidated, renamed away, expired). Ids the HTTP API cannot name
    /// (Redis keys with spaces, other databases) are left out.
    pub fn take_changes(&mut self, now_ms: u64) -> Vec<(SessionId, Option<u64>)> {
        let Some(ids) = self.changes.as_mut().map(std::mem::take) else {
            return Vec::new();
        };
        let mut seen = HashSet::with_capacity(ids.len());
        let grace = self.cfg.touch_flush_ms;
        ids.into_iter()
            .filter(|id| http_visible(id) && seen.insert(id.clone()))
            .map(|id| {
                let v = self.store.get(&id, now_ms, grace).ok().map(|s| s.etag());
                (id, v)
            })
            .collect()
    }

    /// Notes the sessions a delta touches (its id, and a rename's target).
    pub(super) fn note_change(&mut self, d: &Delta) {
        if let Some(c) = self.changes.as_mut() {
            c.push(d.id.clone());
            for op in &d.ops {
                if let Op::Rename { to } = op {
                    c.push(to.clone());
                }
            }
        }
    }

    pub(super) fn note_changed_id(&mut self, id: &SessionId) {
        if let Some(c) = self.changes.as_mut() {
            c.push(id.clone());
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

    #[test]
    fn nothing_is_recorded_until_watched_and_each_id_comes_once_with_its_version() {
        let mut c = core();
        let d = delta("s1", vec![Op::Create], &mut c);
        c.store.apply(&d, 1_000);
        c.note_change(&d);
        assert!(c.take_changes(1_000).is_empty(), "not watched: nothing");
        c.watch_changes();
        let set = Op::Set {
            name: "a".into(),
            value: bytes::Bytes::from_static(b"1"),
        };
        for _ in 0..2 {
            let d = delta("s1", vec![set.clone()], &mut c);
            c.store.apply(&d, 1_000);
            c.note_change(&d);
        }
        let got = c.take_changes(1_000);
        let now = c.store.get(&d.id, 1_000, 0).map(Session::etag).ok();
        assert_eq!(got, vec![(d.id.clone(), now)]);
        assert!(now.is_some());
        assert!(c.take_changes(1_000).is_empty(), "taken once");
        c.unwatch_changes();
        c.note_change(&d);
        c.watch_changes();
        assert!(c.take_changes(1_000).is_empty(), "unwatched: forgotten");
    }

    #[test]
    fn a_rename_reports_the_old_id_gone_and_the_new_one_and_keys_the_api_cannot_name_are_left_out()
    {
        let mut c = core();
        c.watch_changes();
        let d = delta("old", vec![Op::Create], &mut c);
        c.store.apply(&d, 1_000);
        let to = SessionId::parse("new").unwrap();
        let r = delta("old", vec![Op::Rename { to: to.clone() }], &mut c);
        c.store.apply(&r, 1_000);
        c.take_changes(1_000);
        c.note_change(&r);
        c.note_changed_id(&SessionId::key(b"a key").unwrap());
        let got = c.take_changes(1_000);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0], (SessionId::parse("old").unwrap(), None));
        assert_eq!(got[1].0, to);
        assert!(got[1].1.is_some());
    }
}
