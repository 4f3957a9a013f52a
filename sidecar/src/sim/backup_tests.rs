//! Backup mode on the simulated cluster: 50 to 100 members, each session on
//! an owner and K backups. Every acknowledged write must survive any K
//! simultaneous kills, and copies must converge to 1 + K after kills, joins,
//! restarts and partitions.

use super::*;
use crate::core::placement;

/// Heartbeats every 250 ms, as a cluster this size would run: 100 members
/// at 100 ms make the simulation slow for nothing.
fn cfg(k: usize) -> CoreConfig {
    let mut c = CoreConfig {
        backups: Some(k),
        send: SendMode::Sync,
        anti_entropy_interval_ms: 1_000,
        heartbeat_interval_ms: 250,
        ..CoreConfig::default()
    };
    c.detector.suspect_after_ms = 1_000;
    c
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("m{i:03}")).collect()
}

fn sid(id: &str) -> SessionId {
    SessionId::parse(id).expect("id")
}

fn up_names(sim: &Sim) -> Vec<String> {
    sim.nodes
        .iter()
        .filter(|(_, n)| n.up)
        .map(|(k, _)| k.clone())
        .collect()
}

fn all_ready(sim: &Sim) -> bool {
    sim.nodes
        .values()
        .filter(|n| n.up)
        .all(|n| n.core.is_ready())
}

/// Running members whose store has the session (live or invalidated).
fn holders_now(sim: &Sim, id: &str) -> Vec<String> {
    let id = sid(id);
    sim.nodes
        .iter()
        .filter(|(_, n)| n.up && n.core.store.has(&id))
        .map(|(k, _)| k.clone())
        .collect()
}

/// Every session is on exactly the members placement names, over the running ones.
fn placed(sim: &Sim, ids: &[String], copies: usize) -> bool {
    let up = up_names(sim);
    ids.iter().all(|id| {
        let mut want: Vec<String> = placement::holders(&up, &sid(id), copies)
            .into_iter()
            .map(str::to_owned)
            .collect();
        want.sort();
        holders_now(sim, id) == want
    })
}

/// Every up member's kept per-peer digests equal a walk of its store
/// (asserted), and whether every two members' digests of what they share
/// agree.
fn pair_digests_agree(sim: &mut Sim, seed: u64, when: &str) -> bool {
    let up = up_names(sim);
    let mut kept = BTreeMap::new();
    for n in &up {
        for p in up.iter().filter(|p| *p != n) {
            let node = sim.nodes.get_mut(n).expect("up member");
            let d = node.core.pair_digest(p);
            assert_eq!(
                d,
                node.core.scanned_pair_digest(p),
                "seed {seed}, {when}: {n}'s kept digest for {p} differs from its store"
            );
            kept.insert((n.clone(), p.clone()), d);
        }
    }
    kept.iter()
        .all(|((n, p), d)| kept.get(&(p.clone(), n.clone())) == Some(d))
}

/// Every two members agree on what they share: at once when `repair` is
/// false (every acknowledged write reached every holder), else after
/// anti-entropy, comparing the kept digests, repaired the rest. Each member
/// compares with one random peer a round, so a given pair meets about every
/// N / 2 rounds: allow 2 N.
fn check_pair_digests(sim: &mut Sim, seed: u64, when: &str, repair: bool) {
    let rounds = if repair {
        2 * up_names(sim).len() as u64
    } else {
        0
    };
    let end = sim.now + rounds * sim.cfg.anti_entropy_interval_ms;
    while !pair_digests_agree(sim, seed, when) {
        assert!(
            sim.now < end,
            "seed {seed}, {when}: members still disagree on what they share"
        );
        sim.run_for(250);
    }
}

/// `run_until` for costly conditions: checked every 50 ms of virtual time.
fn wait(sim: &mut Sim, ms: u64, cond: impl Fn(&Sim) -> bool) -> bool {
    let end = sim.now + ms;
    while sim.now < end {
        if cond(sim) {
            return true;
        }
        sim.run_for(50);
    }
    cond(sim)
}

fn pick(sim: &mut Sim, from: &[String]) -> String {
    let i = sim.rng.below(from.len() as u64) as usize;
    from[i].clone()
}

/// Sync writes of `value` to every session, each on a random running member
/// that may hold no copy; returns the sessions whose write was acknowledged.
fn write_all(sim: &mut Sim, ids: &[String], value: &str, settle_ms: u64) -> Vec<String> {
    let up = up_names(sim);
    let mut writes = Vec::new();
    for id in ids {
        let node = pick(sim, &up);
        let w = sim.set_anywhere(&node, id, "v", value, SendMode::Sync);
        writes.push((node, w, id.clone()));
    }
    wait(sim, settle_ms, |s| {
        writes
            .iter()
            .all(|(n, w, _)| s.write_results.contains_key(&(n.clone(), *w)))
    });
    for (n, w, id) in &writes {
        let r = sim.write_results.get(&(n.clone(), *w));
        if r != Some(&Ok(())) {
            let up = up_names(sim);
            let want = placement::holders(&up, &sid(id), 2);
            let view = sim.nodes[n].core.backup_view_len();
            eprintln!("write of {value} to {id} on {n}: {r:?}; on {:?}, placed {want:?}, view {view}, up {}", holders_now(sim, id), up.len());
        }
    }
    writes
        .into_iter()
        .filter(|(n, w, _)| sim.write_results.get(&(n.clone(), *w)) == Some(&Ok(())))
        .map(|(_, _, id)| id)
        .collect()
}

fn create_all(sim: &mut Sim, n: usize) -> Vec<String> {
    let up = up_names(sim);
    let ids: Vec<String> = (0..n).map(|i| format!("S{i:04}")).collect();
    for id in &ids {
        let node = pick(sim, &up);
        sim.fetch(&node, id);
        sim.create(&node, id);
    }
    ids
}

/// Every acknowledged value is read back from a random running member.
fn check_reads(sim: &mut Sim, acked: &[String], value: &str, seed: u64, when: &str) {
    let up = up_names(sim);
    for id in acked {
        let node = pick(sim, &up);
        let got = sim.value_anywhere(&node, id, "v");
        assert_eq!(
            got.as_deref(),
            Some(value),
            "seed {seed}: {when}: acknowledged write of {id} not read on {node}"
        );
    }
}

fn scenario(seed: u64, members: usize, k: usize) {
    let copies = k + 1;
    let list = names(members);
    let refs: Vec<&str> = list.iter().map(String::as_str).collect();
    let mut sim = Sim::new(seed, &refs, cfg(k));
    let seed = sim.seed;
    assert!(
        wait(&mut sim, 5_000, all_ready),
        "seed {seed}: not all ready"
    );
    let ids = create_all(&mut sim, 150);
    let acked = write_all(&mut sim, &ids, "1", 3_000);
    assert_eq!(
        acked.len(),
        ids.len(),
        "seed {seed}: sync writes with every member up"
    );
    // Fetched copies go within a second; then each session is on 1 + K members.
    assert!(
        wait(&mut sim, 3_000, |s| placed(s, &ids, copies)),
        "seed {seed}: sessions not on exactly {copies} members after writes"
    );
    check_reads(&mut sim, &acked, "1", seed, "all up");
    check_pair_digests(&mut sim, seed, "all up", false);

    // K members die at once: the holders of one session, the worst case for it,
    // while writes to every session are under way.
    let victims: Vec<String> = holders_now(&sim, &ids[0]).into_iter().take(k).collect();
    for v in &victims {
        sim.kill(v);
    }
    let acked2 = write_all(&mut sim, &ids, "2", 5_000);
    assert!(
        wait(&mut sim, 10_000, |s| placed(s, &ids, copies)),
        "seed {seed}: copies not restored to {copies} after killing {victims:?}"
    );
    check_reads(&mut sim, &acked2, "2", seed, "after K kills");
    assert!(
        acked2.len() * 10 >= ids.len() * 9,
        "seed {seed}: most writes acknowledged ({})",
        acked2.len()
    );

    // A new member joins and an old one restarts (empty): both turn ready and
    // copies follow the new placement.
    sim.start("joiner");
    let restarted = victims[0].clone();
    sim.start(&restarted);
    assert!(
        wait(&mut sim, 15_000, all_ready),
        "seed {seed}: joiner/restarted not ready"
    );
    let acked3 = write_all(&mut sim, &ids, "3", 5_000);
    assert_eq!(
        acked3.len(),
        ids.len(),
        "seed {seed}: writes after the join"
    );
    assert!(
        wait(&mut sim, 10_000, |s| placed(s, &ids, copies)),
        "seed {seed}: copies not on the new placement after a join and a restart"
    );
    check_reads(&mut sim, &acked3, "3", seed, "after join and restart");
    check_pair_digests(&mut sim, seed, "after join and restart", false);

    // A partition: a quarter of the members apart for two seconds, writes on
    // both sides; afterwards every copy agrees and placement is restored.
    let up = up_names(&sim);
    let (a, b) = up.split_at(up.len() / 4);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let b: Vec<&str> = b.iter().map(String::as_str).collect();
    sim.partition(&a, &b);
    let _ = write_all(&mut sim, &ids, "4", 2_000);
    sim.heal();
    assert!(
        wait(&mut sim, 20_000, |s| placed(s, &ids, copies)
            && ids.iter().all(|id| {
                let id = sid(id);
                let hashes: BTreeSet<Option<u64>> = s
                    .nodes
                    .values()
                    .filter(|n| n.up && n.core.store.has(&id))
                    .map(|n| n.core.store.entry_hash_of(&id))
                    .collect();
                hashes.len() == 1
            })),
        "seed {seed}: copies did not converge after the partition healed"
    );
    check_pair_digests(&mut sim, seed, "after the partition healed", true);
}

#[test]
fn fifty_members_k2_keep_every_acknowledged_write_through_two_kills_joins_and_partitions() {
    scenario(5, 50, 2);
}

#[test]
fn a_hundred_members_k1_keep_every_acknowledged_write_through_a_kill() {
    scenario(11, 100, 1);
}

#[test]
fn a_write_on_a_member_without_a_copy_goes_to_the_holders_only() {
    let list = names(9);
    let refs: Vec<&str> = list.iter().map(String::as_str).collect();
    let mut sim = Sim::new(3, &refs, cfg(1));
    assert!(wait(&mut sim, 5_000, all_ready));
    let id = "lonely";
    let h: Vec<String> = placement::holders(&list, &sid(id), 2)
        .into_iter()
        .map(str::to_owned)
        .collect();
    let outsider = list
        .iter()
        .find(|n| !h.contains(n))
        .expect("an outsider")
        .clone();
    sim.fetch(&outsider, id);
    sim.create(&outsider, id);
    let w = sim.set(&outsider, id, "v", "x", SendMode::Sync);
    assert!(sim.run_until(1_000, |s| s
        .write_results
        .contains_key(&(outsider.clone(), w))));
    assert_eq!(sim.write_results[&(outsider.clone(), w)], Ok(()));
    for name in &h {
        assert_eq!(
            sim.value(name, id, "v").as_deref(),
            Some("x"),
            "holder {name}"
        );
    }
    sim.run_for(1_500);
    let mut now_on = holders_now(&sim, id);
    now_on.sort();
    let mut want = h.clone();
    want.sort();
    assert_eq!(
        now_on, want,
        "the outsider's copy is dropped; no one else got it"
    );
    // Each of the 7 others reads it through a fetch.
    for name in list.iter().filter(|n| !h.contains(n)) {
        assert_eq!(
            sim.value_anywhere(name, id, "v").as_deref(),
            Some("x"),
            "{name}"
        );
    }
}

#[test]
fn a_renamed_session_is_found_under_its_new_id_on_every_member() {
    let list = names(7);
    let refs: Vec<&str> = list.iter().map(String::as_str).collect();
    let mut sim = Sim::new(9, &refs, cfg(1));
    assert!(sim.run_until(5_000, all_ready));
    sim.fetch("m000", "before");
    sim.create("m000", "before");
    let w = sim.set("m000", "before", "user", "ann", SendMode::Sync);
    assert!(sim.run_until(1_000, |s| s.write_results.contains_key(&("m000".into(), w))));
    sim.fetch("m003", "before");
    let w = sim.write(
        "m003",
        "before",
        vec![Op::Rename { to: sid("after") }],
        SendMode::Sync,
    );
    assert!(sim.run_until(1_000, |s| s.write_results.contains_key(&("m003".into(), w))));
    assert_eq!(sim.write_results[&("m003".into(), w)], Ok(()));
    for name in &list {
        assert_eq!(
            sim.value_anywhere(name, "after", "user").as_deref(),
            Some("ann"),
            "{name}"
        );
        assert_eq!(
            sim.value_anywhere(name, "before", "user"),
            None,
            "{name}: the old id is gone"
        );
    }
    let ids = vec!["after".to_owned()];
    assert!(
        wait(&mut sim, 12_000, |s| placed(s, &ids, 2)),
        "the new id on its holders only"
    );
}
