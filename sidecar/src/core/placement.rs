//! Where a session lives in backup mode: rendezvous (highest-random-weight)
//! hashing. Every member ranks the live members by a hash of (member, session
//! id); the first is the owner, the next `backups` hold copies. A membership
//! change moves only what it must: a member that goes away hands its place to
//! the next in each ranking, and one that joins takes a place only where it
//! ranks high enough.

use crate::core::identity::SessionId;

/// A well-mixed 64-bit hash of (member, session): splitmix64's finalizer over
/// FNV-1a, so that nearby names and ids spread evenly.
pub fn score(member: &str, id: &SessionId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in member
        .as_bytes()
        .iter()
        .chain(std::iter::once(&0xff))
        .chain(id.as_str().as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The first `copies` of `members` in the session's ranking (owner first).
pub fn holders<'a>(members: &'a [String], id: &SessionId, copies: usize) -> Vec<&'a str> {
    let mut ranked: Vec<(u64, &str)> = members.iter().map(|m| (score(m, id), m.as_str())).collect();
    // Highest score first; the name breaks (astronomically rare) ties.
    ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ranked.truncate(copies);
    ranked.into_iter().map(|(_, m)| m).collect()
}

/// Whether `member` is among the session's first `copies` of `members`,
/// without sorting: it is when fewer than `copies` members outrank it.
pub fn holds(members: &[String], member: &str, id: &SessionId, copies: usize) -> bool {
    if !members.iter().any(|m| m == member) {
        return false;
    }
    let mine = (score(member, id), member);
    let above = members
        .iter()
        .filter(|m| m.as_str() != member)
        .filter(|m| {
            let s = (score(m, id), m.as_str());
            s.0 > mine.0 || (s.0 == mine.0 && s.1 < mine.1)
        })
        .count();
    above < copies
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("member-{i}")).collect()
    }

    fn ids(n: usize) -> Vec<SessionId> {
        (0..n)
            .map(|i| SessionId::parse(&format!("s{i:06}")).expect("id"))
            .collect()
    }

    #[test]
    fn holders_are_distinct_deterministic_and_agree_with_holds() {
        let m = names(9);
        for id in ids(500) {
            let h = holders(&m, &id, 3);
            assert_eq!(h.len(), 3);
            assert!(h[0] != h[1] && h[1] != h[2] && h[0] != h[2]);
            let mut shuffled = m.clone();
            shuffled.reverse();
            assert_eq!(
                h,
                holders(&shuffled, &id, 3),
                "order of the list matters not"
            );
            for name in &m {
                assert_eq!(holds(&m, name, &id, 3), h.contains(&name.as_str()));
            }
        }
        assert_eq!(
            holders(&names(2), &ids(1)[0], 5).len(),
            2,
            "fewer members than copies"
        );
        assert!(!holds(&m, "stranger", &ids(1)[0], 3));
    }

    #[test]
    fn owners_spread_evenly() {
        let m = names(10);
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        let all = ids(20_000);
        for id in &all {
            *per.entry(holders(&m, id, 1)[0]).or_default() += 1;
        }
        for (name, n) in per {
            assert!((1_700..=2_300).contains(&n), "{name} owns {n} of 20000");
        }
    }

    #[test]
    fn a_member_leaving_moves_only_its_own_places_and_a_joiner_only_takes_places() {
        let before = names(9);
        let mut after = before.clone();
        after.retain(|n| n != "member-4");
        let mut joined = before.clone();
        joined.push("member-new".into());
        let (mut moved_leave, mut moved_join) = (0, 0);
        let all = ids(5_000);
        for id in &all {
            let h0 = holders(&before, id, 2);
            let h1 = holders(&after, id, 2);
            if !h0.contains(&"member-4") {
                assert_eq!(h0, h1, "a session the leaver did not hold stays put");
            } else {
                moved_leave += 1;
                let kept: Vec<_> = h0.iter().filter(|m| **m != "member-4").collect();
                assert!(
                    kept.iter().all(|k| h1.contains(k)),
                    "the other holder keeps it"
                );
            }
            let hj = holders(&joined, id, 2);
            if !hj.contains(&"member-new") {
                assert_eq!(h0, hj, "the joiner takes nothing here, so nothing moves");
            } else {
                moved_join += 1;
            }
        }
        // About 2/9 and 2/10 of the sessions: O(K/N), not a reshuffle.
        assert!((900..=1_350).contains(&moved_leave), "{moved_leave}");
        assert!((800..=1_200).contains(&moved_join), "{moved_join}");
    }
}
