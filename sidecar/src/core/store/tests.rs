//! Store tests: convergence, limits, tombstones, expiry.

use super::*;

pub(super) fn id(s: &str) -> SessionId {
    SessionId::parse(s).unwrap()
}
pub(super) fn h(w: u64, n: u32) -> Hlc {
    Hlc {
        wall_ms: w,
        logical: 0,
        node: n,
    }
}
pub(super) fn delta(i: &str, hlc: Hlc, ops: Vec<Op>) -> Delta {
    Delta {
        id: id(i),
        hlc,
        created_ms: 1000,
        last_accessed_ms: hlc.wall_ms,
        max_inactive_ms: 60_000,
        ops,
    }
}
fn set(n: &str, v: &str) -> Op {
    Op::Set {
        name: n.into(),
        value: Bytes::from(v.to_owned()),
    }
}
fn val(st: &Store, i: &str, n: &str) -> Option<Bytes> {
    st.get(&id(i), 2000, 0)
        .ok()
        .and_then(|s| s.attrs.get(n))
        .and_then(|a| a.value.clone())
}

/// Found by the `resp_commands` fuzz target (`HSET k f a f b` kept `a`;
/// Redis keeps `b`): within one delta the later operation on an attribute wins.
#[test]
fn the_last_operation_on_an_attribute_within_one_delta_wins() {
    let mut st = Store::default();
    let d = delta(
        "A",
        h(1500, 1),
        vec![set("f", "a"), set("g", "1"), set("f", "b")],
    );
    assert_eq!(st.apply(&d, 1500), Applied::Changed);
    assert_eq!(val(&st, "A", "f").as_deref(), Some(&b"b"[..]));
    assert_eq!(val(&st, "A", "g").as_deref(), Some(&b"1"[..]));
    assert_eq!(
        st.apply(&d, 1500),
        Applied::Ignored,
        "applying it again changes nothing"
    );
    let rm = delta(
        "A",
        h(1600, 1),
        vec![set("g", "2"), Op::Remove { name: "g".into() }],
    );
    st.apply(&rm, 1600);
    assert_eq!(val(&st, "A", "g"), None, "set then removed");
    let back = delta(
        "A",
        h(1700, 1),
        vec![Op::Remove { name: "f".into() }, set("f", "c")],
    );
    st.apply(&back, 1700);
    assert_eq!(
        val(&st, "A", "f").as_deref(),
        Some(&b"c"[..]),
        "removed then set"
    );
    // Many attributes in one delta (the map path, not the pairwise one).
    let mut ops: Vec<Op> = (0..20).map(|i| set(&format!("n{i}"), "first")).collect();
    ops.push(set("n0", "last"));
    st.apply(&delta("A", h(1800, 1), ops), 1800);
    assert_eq!(val(&st, "A", "n0").as_deref(), Some(&b"last"[..]));
    assert_eq!(val(&st, "A", "n19").as_deref(), Some(&b"first"[..]));
}

#[test]
fn removal_markers_count_toward_the_session_size() {
    let limits = Limits {
        max_attr_bytes: 1024,
        max_session_bytes: 4096,
        max_sessions: 10,
        max_attr_name: 128,
    };
    let mut st = Store::new(limits);
    st.apply(
        &delta("s", h(1_000, 0), vec![Op::Create, set("keep", "v")]),
        1_000,
    );
    let removes: Vec<Op> = (0..100)
        .map(|i| Op::Remove {
            name: format!("{i:0>100}"),
        })
        .collect();
    let d = delta("s", h(1_001, 0), removes);
    assert!(matches!(
        st.check_local(&d, 1_000, 0),
        Err(StoreError::SessionTooLarge { .. })
    ));
    // Removing what is there is fine, and writing it again costs only the value.
    let d = delta(
        "s",
        h(1_002, 0),
        vec![Op::Remove {
            name: "keep".into(),
        }],
    );
    assert_eq!(st.check_local(&d, 1_000, 0), Ok(()));
    st.apply(&d, 1_000);
    let big = Op::Set {
        name: "keep".into(),
        value: Bytes::from(vec![b'x'; 1024]),
    };
    assert_eq!(
        st.check_local(&delta("s", h(1_003, 0), vec![big]), 1_000, 0),
        Ok(())
    );
}

#[test]
fn a_peers_data_is_held_to_the_local_limits() {
    let limits = Limits {
        max_attr_bytes: 1024,
        max_session_bytes: 4096,
        max_sessions: 2,
        max_attr_name: 16,
    };
    let mut st = Store::new(limits);
    let big = Op::Set {
        name: "a".into(),
        value: Bytes::from(vec![b'x'; 2048]),
    };
    assert_eq!(
        st.check_remote_delta(&delta("s1", h(1, 0), vec![big])),
        Err(StoreError::AttrTooLarge {
            size: 2048,
            max: 1024
        })
    );
    let long = Op::Set {
        name: "n".repeat(17),
        value: Bytes::from_static(b"v"),
    };
    assert_eq!(
        st.check_remote_delta(&delta("s1", h(1, 0), vec![long])),
        Err(StoreError::BadName { max: 16 })
    );
    let many: Vec<Op> = (0..5)
        .map(|i| Op::Set {
            name: format!("a{i}"),
            value: Bytes::from(vec![b'x'; 1000]),
        })
        .collect();
    assert!(matches!(
        st.check_remote_delta(&delta("s1", h(1, 0), many)),
        Err(StoreError::SessionTooLarge { .. })
    ));
    for i in ["s1", "s2"] {
        let d = delta(i, h(1, 0), vec![Op::Create, set("a", "1")]);
        assert_eq!(st.check_remote_delta(&d), Ok(()));
        st.apply(&d, 1_000);
    }
    // Full: no new session from a peer, but existing ones take changes.
    assert_eq!(
        st.check_remote_delta(&delta("s3", h(2, 0), vec![set("a", "1")])),
        Err(StoreError::Full { max: 2 })
    );
    assert_eq!(
        st.check_remote_delta(&delta("s1", h(2, 0), vec![set("a", "2")])),
        Ok(())
    );
    let state = SessionState {
        id: id("s3"),
        entry: st
            .state(&id("s1"))
            .map(|s| s.entry)
            .unwrap_or(Entry::Tombstone {
                hlc: h(0, 0),
                at_ms: 0,
                reusable: true,
            }),
    };
    assert_eq!(
        st.check_remote_state(&state),
        Err(StoreError::Full { max: 2 })
    );
}

#[test]
fn an_id_no_local_client_could_write_does_not_decode() {
    for bad in ["", "a\nb", "\u{7f}"] {
        let json = serde_json::to_string(bad).unwrap_or_default();
        assert!(serde_json::from_str::<SessionId>(&json).is_err(), "{bad:?}");
    }
    let enc = postcard::to_allocvec(&"").unwrap_or_default();
    assert!(postcard::from_bytes::<SessionId>(&enc).is_err());
    assert!(serde_json::from_str::<SessionId>("\"ok/key:1\"").is_ok());
}

#[test]
fn entries_stamped_past_the_bound_are_dropped_and_nothing_else() {
    let mut st = Store::new(Limits::default());
    st.apply(
        &delta("now", h(1_000, 0), vec![Op::Create, set("a", "1")]),
        1_000,
    );
    st.apply(
        &delta("future", h(600_000, 0), vec![Op::Create, set("a", "1")]),
        1_000,
    );
    st.apply(
        &delta("gone", h(700_000, 0), vec![Op::Create, Op::Invalidate]),
        1_000,
    );
    assert_eq!(st.drop_beyond(2_000), 2);
    assert_eq!(val(&st, "now", "a").as_deref(), Some(&b"1"[..]));
    assert!(st.state(&id("future")).is_none() && st.state(&id("gone")).is_none());
    assert_eq!((st.live_count(), st.tombstone_count()), (1, 0));
}

#[test]
fn delta_for_unknown_session_creates_it() {
    let mut st = Store::default();
    assert_eq!(
        st.apply(&delta("A", h(1500, 1), vec![set("x", "1")]), 1500),
        Applied::Changed
    );
    assert_eq!(val(&st, "A", "x").as_deref(), Some(&b"1"[..]));
    assert_eq!(st.live_count(), 1);
}

#[test]
fn last_writer_wins_per_attribute_in_any_order() {
    let d1 = delta("A", h(1500, 1), vec![set("x", "old"), set("y", "y1")]);
    let d2 = delta("A", h(1600, 2), vec![set("x", "new")]);
    for order in [[&d1, &d2], [&d2, &d1]] {
        let mut st = Store::default();
        for d in order {
            st.apply(d, 1700);
        }
        assert_eq!(val(&st, "A", "x").as_deref(), Some(&b"new"[..]));
        assert_eq!(val(&st, "A", "y").as_deref(), Some(&b"y1"[..]));
    }
}

#[test]
fn removal_is_not_undone_by_an_older_set() {
    let mut st = Store::default();
    st.apply(
        &delta("A", h(1600, 1), vec![Op::Remove { name: "x".into() }]),
        1600,
    );
    st.apply(&delta("A", h(1500, 2), vec![set("x", "stale")]), 1600);
    assert_eq!(val(&st, "A", "x"), None);
}

#[test]
fn invalidation_is_final_and_gc_removes_it() {
    let mut st = Store::default();
    st.apply(&delta("A", h(1500, 1), vec![set("x", "1")]), 1500);
    st.apply(&delta("A", h(1600, 1), vec![Op::Invalidate]), 1600);
    assert_eq!(
        st.get(&id("A"), 1600, 0).unwrap_err(),
        StoreError::Invalidated
    );
    assert_eq!(
        st.apply(&delta("A", h(1700, 2), vec![set("x", "2")]), 1700),
        Applied::Ignored
    );
    assert_eq!(st.live_count(), 0);
    assert_eq!(st.payload_bytes(), 0);
    st.sweep(1600 + 10_000, 0, 10_000);
    assert_eq!(st.tombstone_count(), 0);
}

#[test]
fn expired_state_is_never_resurrected() {
    let mut st = Store::default();
    let d = delta("A", h(1500, 1), vec![set("x", "1")]);
    assert_eq!(st.apply(&d, 1500 + 60_000), Applied::Ignored);
    assert_eq!(st.live_count(), 0);
    st.apply(&d, 1500);
    assert_eq!(st.sweep(1500 + 60_000, 0, 1), 1);
    let state = SessionState {
        id: id("A"),
        entry: Entry::Live(Session {
            created_ms: 1000,
            last_accessed_ms: 1500,
            max_inactive_ms: 60_000,
            meta_hlc: Hlc::default(),
            attrs: AttrMap::default(),
            cleared: Hlc::default(),
        }),
    };
    assert_eq!(st.merge(state, 1500 + 60_000), Applied::Ignored);
}

#[test]
fn a_deleted_key_can_be_written_again_but_not_revived_by_older_state() {
    let mut st = Store::default();
    st.apply(
        &delta("K", h(1500, 1), vec![set("a", "old"), set("b", "old")]),
        1500,
    );
    let stale = st.state(&id("K")).unwrap();
    st.apply(&delta("K", h(1600, 2), vec![Op::Delete]), 1600);
    assert_eq!(
        st.get(&id("K"), 1600, 0).unwrap_err(),
        StoreError::NotFound,
        "a delete is not an invalidation"
    );
    assert_eq!(st.live_count(), 0);
    // An older write or a stale replica's state cannot bring it back.
    assert_eq!(
        st.apply(&delta("K", h(1550, 3), vec![set("a", "late")]), 1600),
        Applied::Ignored
    );
    assert_eq!(st.merge(stale.clone(), 1600), Applied::Ignored);
    // A newer write creates the key afresh.
    st.apply(
        &delta("K", h(1700, 1), vec![Op::Create, set("a", "new")]),
        1700,
    );
    assert_eq!(val(&st, "K", "a").as_deref(), Some(&b"new"[..]));
    assert_eq!(st.merge(stale, 1700), Applied::Ignored);
    assert_eq!(
        val(&st, "K", "b"),
        None,
        "an attribute from before the delete came back"
    );
    // On a replica that saw the writes in another order, the result is the same.
    let mut other = Store::default();
    other.apply(
        &delta("K", h(1700, 1), vec![Op::Create, set("a", "new")]),
        1700,
    );
    other.apply(
        &delta("K", h(1500, 1), vec![set("a", "old"), set("b", "old")]),
        1700,
    );
    other.apply(&delta("K", h(1600, 2), vec![Op::Delete]), 1700);
    assert_eq!(other.fingerprint(), st.fingerprint());
}

mod convergence {
    use super::*;
    use proptest::prelude::*;

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => ("[ab]", "[xyz]").prop_map(|(n, v)| Op::Set { name: n, value: Bytes::from(v) }),
            2 => "[ab]".prop_map(|n| Op::Remove { name: n }),
            1 => Just(Op::Delete),
            1 => Just(Op::MaxInactive),
            1 => Just(Op::Invalidate),
        ]
    }

    proptest! {
        /// Any order of the same deltas, and any split merged back by full
        /// states, ends in the same store.
        #[test]
        fn deltas_in_any_order_and_merges_converge(
            ops in prop::collection::vec((arb_op(), 0u32..3), 1..12),
            perm_seed in any::<u64>(),
            split in any::<u64>(),
        ) {
            let deltas: Vec<Delta> = ops.iter().enumerate().map(|(i, (op, node))| Delta {
                id: id("K"),
                hlc: Hlc { wall_ms: 1000 + i as u64, logical: 0, node: *node },
                created_ms: 1000,
                last_accessed_ms: 1000,
                max_inactive_ms: 60_000 + i as u64,
                ops: vec![op.clone()],
            }).collect();
            let mut reference = Store::default();
            for d in &deltas { reference.apply(d, 1000); }
            let mut shuffled = deltas.clone();
            let mut x = perm_seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut other = Store::default();
            for d in &shuffled { other.apply(d, 1000); }
            prop_assert_eq!(other.fingerprint(), reference.fingerprint());
            let (mut a, mut b) = (Store::default(), Store::default());
            for (i, d) in shuffled.iter().enumerate() {
                if split >> (i % 64) & 1 == 1 { a.apply(d, 1000); } else { b.apply(d, 1000); }
            }
            if let Some(st) = a.state(&id("K")) { b.merge(st, 1000); }
            if let Some(st) = b.state(&id("K")) { a.merge(st, 1000); }
            prop_assert_eq!(a.fingerprint(), b.fingerprint());
            prop_assert_eq!(a.fingerprint(), reference.fingerprint());
        }
    }
}

#[test]
fn invalidation_wins_over_delete() {
    let mut a = Store::default();
    a.apply(&delta("K", h(1500, 1), vec![set("a", "1")]), 1500);
    let mut b = Store::default();
    b.apply(&delta("K", h(1500, 1), vec![set("a", "1")]), 1500);
    a.apply(&delta("K", h(1600, 1), vec![Op::Delete]), 1600);
    b.apply(&delta("K", h(1550, 2), vec![Op::Invalidate]), 1600);
    a.merge(b.state(&id("K")).unwrap(), 1600);
    b.merge(a.state(&id("K")).unwrap(), 1600);
    assert_eq!(
        a.get(&id("K"), 1600, 0).unwrap_err(),
        StoreError::Invalidated
    );
    assert_eq!(a.fingerprint(), b.fingerprint());
}

#[test]
fn rename_moves_attributes_and_tombstones_old_id() {
    let mut st = Store::default();
    st.apply(&delta("A", h(1500, 1), vec![set("x", "1")]), 1500);
    st.apply(
        &delta("A", h(1600, 1), vec![Op::Rename { to: id("B") }]),
        1600,
    );
    assert_eq!(val(&st, "B", "x").as_deref(), Some(&b"1"[..]));
    assert_eq!(
        st.get(&id("A"), 1600, 0).unwrap_err(),
        StoreError::Invalidated
    );
    assert_eq!(st.live_count(), 1);
}

#[test]
fn limits_are_checked_before_anything_changes() {
    let mut st = Store::new(Limits {
        max_attr_bytes: 4,
        max_session_bytes: 10,
        max_sessions: 1,
        max_attr_name: 8,
    });
    let big = delta("A", h(1500, 1), vec![Op::Create, set("x", "12345")]);
    assert!(matches!(
        st.check_local(&big, 1500, 0),
        Err(StoreError::AttrTooLarge { size: 5, max: 4 })
    ));
    let ok = delta("A", h(1500, 1), vec![Op::Create, set("x", "1234")]);
    st.check_local(&ok, 1500, 0).unwrap();
    st.apply(&ok, 1500);
    let grow = delta("A", h(1600, 1), vec![set("y", "1234"), set("z", "1234")]);
    assert!(matches!(
        st.check_local(&grow, 1600, 0),
        Err(StoreError::SessionTooLarge { .. })
    ));
    let other = delta("B", h(1600, 1), vec![Op::Create]);
    assert_eq!(
        st.check_local(&other, 1600, 0),
        Err(StoreError::Full { max: 1 })
    );
    assert_eq!(
        st.check_local(&delta("C", h(1, 1), vec![set("a", "b")]), 1600, 0),
        Err(StoreError::NotFound)
    );
}

#[test]
fn attr_map_from_the_wire_is_sorted_and_unique() {
    let a = |w| Attr {
        value: Some(Bytes::from_static(b"v")),
        hlc: h(w, 1),
        removed_at_ms: 0,
    };
    let m = AttrMap::from(vec![
        ("b".into(), a(1)),
        ("a".into(), a(1)),
        ("b".into(), a(5)),
    ]);
    assert_eq!(m.len(), 2);
    assert_eq!(m.get("b").unwrap().hlc.wall_ms, 5);
    assert!(m.get("a").is_some() && m.get("c").is_none());
}

#[test]
fn chunks_cover_everything_once() {
    let mut st = Store::default();
    for i in 0..100 {
        st.apply(
            &delta(
                &format!("S{i:03}"),
                h(1500, 1),
                vec![set("x", "0123456789")],
            ),
            1500,
        );
    }
    let mut cursor = None;
    let mut seen = 0;
    loop {
        let (chunk, next) = st.chunk_after(cursor.as_ref(), 300);
        seen += chunk.len();
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, 100);
}

#[test]
fn digests_agree_after_merge() {
    let mut a = Store::default();
    let mut b = Store::default();
    a.apply(&delta("A", h(1500, 1), vec![set("x", "1")]), 1500);
    b.apply(&delta("B", h(1500, 2), vec![set("y", "1")]), 1500);
    assert_ne!(a.bucket_digest(), b.bucket_digest());
    {
        let st = a.state(&id("A")).unwrap();
        b.merge(st, 1500);
    }
    {
        let st = b.state(&id("B")).unwrap();
        a.merge(st, 1500);
    }
    assert_eq!(a.bucket_digest(), b.bucket_digest());
    assert_eq!(a.fingerprint(), b.fingerprint());
}

#[test]
fn a_sweep_in_parts_covers_the_whole_store_once_per_pass() {
    let mut st = Store::new(Limits::default());
    for i in 0..25 {
        let id = SessionId::parse(&format!("p{i:02}")).expect("id");
        let d = Delta {
            id,
            hlc: Hlc {
                wall_ms: 10,
                logical: 0,
                node: 1,
            },
            created_ms: 10,
            last_accessed_ms: 10,
            // Every other session expires at 1010.
            max_inactive_ms: if i % 2 == 0 { 1_000 } else { 1_000_000 },
            ops: vec![Op::Create, Op::MaxInactive],
        };
        st.apply(&d, 10);
    }
    let (mut cursor, mut expired, mut parts) = (None, 0, 0);
    loop {
        let s = st.sweep_part(cursor.as_ref(), 10, 5_000, (0, 60_000), None);
        expired += s.expired;
        parts += 1;
        cursor = s.next;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(
        (parts, expired),
        (3, 13),
        "25 entries in parts of 10; 13 expired"
    );
    assert_eq!(st.live_count(), 12);
    let s = st.sweep_part(None, 10, 5_000, (0, 60_000), Some(5));
    assert_eq!(
        s.beyond, 10,
        "stamped at 10 > 5: the first part's 10 entries go"
    );
    assert_eq!(st.live_count(), 2);
}
