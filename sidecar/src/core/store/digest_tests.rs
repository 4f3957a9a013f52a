//! The kept bucket sums and the hash journal against a walk of the store.

use super::tests::{delta, h, id};
use super::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Step {
    Apply(usize, Op),
    Rename(usize, usize),
    MergeFromOther(usize),
    Forget(usize),
    Sweep(u64),
}

const IDS: [&str; 4] = ["a", "b", "c", "d"];

fn arb_step() -> impl Strategy<Value = Step> {
    let op = prop_oneof![
        4 => ("[xy]", "[pq]").prop_map(|(n, v)| Op::Set { name: n, value: Bytes::from(v) }),
        2 => "[xy]".prop_map(|n| Op::Remove { name: n }),
        1 => Just(Op::Delete),
        1 => Just(Op::Invalidate),
        1 => Just(Op::Touch),
    ];
    prop_oneof![
        6 => (0..IDS.len(), op).prop_map(|(i, o)| Step::Apply(i, o)),
        1 => (0..IDS.len(), 0..IDS.len()).prop_map(|(a, b)| Step::Rename(a, b)),
        2 => (0..IDS.len()).prop_map(Step::MergeFromOther),
        1 => (0..IDS.len()).prop_map(Step::Forget),
        1 => (0u64..400).prop_map(Step::Sweep),
    ]
}

proptest! {
    /// Whatever happens to the entries (deltas, renames, merges, forgets,
    /// sweeps that drop old markers and tombstones), the kept bucket sums
    /// equal a walk of the store, and the journal's changes add up to them.
    #[test]
    fn kept_sums_and_journal_match_a_walk_of_the_store(
        steps in prop::collection::vec(arb_step(), 1..40),
    ) {
        let mut st = Store::default().journaled(true);
        let mut other = Store::default();
        let mut from_journal = vec![0u64; BUCKETS];
        for (i, step) in steps.iter().enumerate() {
            let now = 1000 + 10 * i as u64;
            let stamp = h(now, (i % 3) as u32);
            match step {
                Step::Apply(k, op) => {
                    st.apply(&delta(IDS[*k], stamp, vec![op.clone()]), now);
                    other.apply(&delta(IDS[(k + 1) % IDS.len()], stamp, vec![op.clone()]), now);
                }
                Step::Rename(a, b) => {
                    st.apply(&delta(IDS[*a], stamp, vec![Op::Rename { to: id(IDS[*b]) }]), now);
                }
                Step::MergeFromOther(k) => {
                    if let Some(s) = other.state(&id(IDS[*k])) {
                        st.merge(s, now);
                    }
                }
                Step::Forget(k) => {
                    st.forget(&id(IDS[*k]));
                }
                Step::Sweep(ttl) => {
                    st.sweep_part(None, 2, now, (0, *ttl), None);
                }
            }
            prop_assert_eq!(st.bucket_digest(), st.scanned_digest(), "after step {}: {:?}", i, step);
            let changes = st.take_journal();
            prop_assert!(changes.is_some(), "the journal kept every change");
            for (cid, before, after) in changes.unwrap_or_default() {
                let b = bucket_of(&cid);
                from_journal[b] = from_journal[b].wrapping_sub(before).wrapping_add(after);
            }
            prop_assert_eq!(&from_journal, &st.scanned_digest(), "journal after step {}", i);
        }
    }
}
