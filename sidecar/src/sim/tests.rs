//! Scenarios on the simulated cluster, each over several seeds.

use super::*;

fn cfg() -> CoreConfig {
    CoreConfig {
        anti_entropy_interval_ms: 1_000,
        ..CoreConfig::default()
    }
}

fn all_ready(sim: &Sim) -> bool {
    sim.nodes
        .values()
        .filter(|n| n.up)
        .all(|n| n.core.is_ready())
}

const SEEDS: [u64; 4] = [1, 7, 42, 20261122];

#[test]
fn cold_start_all_members_become_ready() {
    for seed in SEEDS {
        let mut sim = Sim::new(seed, &["a", "b", "c"], cfg());
        // The seed actually used (SIM_SEED overrides it), for the messages.
        let seed = sim.seed;
        assert!(
            sim.run_until(3_000, all_ready),
            "seed {seed}: not all ready"
        );
    }
}

#[test]
fn kill_a_member_is_detected_quickly_and_sync_writes_complete() {
    for seed in SEEDS {
        let mut sim = Sim::new(seed, &["a", "b", "c"], cfg());
        // The seed actually used (SIM_SEED overrides it), for the messages.
        let seed = sim.seed;
        assert!(sim.run_until(3_000, all_ready));
        sim.create("a", "S1");
        let w = sim.set("a", "S1", "n", "1", SendMode::Sync);
        assert!(
            sim.run_until(100, |s| s.write_results.contains_key(&("a".into(), w))),
            "seed {seed}"
        );
        assert_eq!(sim.write_results[&("a".into(), w)], Ok(()));
        assert_eq!(
            sim.value("c", "S1", "n").as_deref(),
            Some("1"),
            "seed {seed}: sync write not on c"
        );
        let killed_at = sim.now;
        sim.kill("c");
        assert!(
            sim.run_until(1_000, |s| s.state_seen("a", "c") == Some(MemberState::Dead)
                && s.state_seen("b", "c") == Some(MemberState::Dead)),
            "seed {seed}: c not declared dead within 1 s"
        );
        assert!(
            sim.now - killed_at < 100,
            "seed {seed}: connection loss should give fast detection"
        );
        let w = sim.set("b", "S1", "n", "2", SendMode::Sync);
        assert!(sim.run_until(100, |s| s.write_results.contains_key(&("b".into(), w))));
        assert_eq!(
            sim.write_results[&("b".into(), w)],
            Ok(()),
            "seed {seed}: sync write stuck on dead member"
        );
        assert_eq!(sim.value("a", "S1", "n").as_deref(), Some("2"));
    }
}

#[test]
fn hung_member_is_detected_by_missing_heartbeats() {
    // A partition that leaves connections "up" is what a hung process looks
    // like: nothing arrives. Model it by cutting links without telling anyone.
    let mut sim = Sim::new(3, &["a", "b", "c"], cfg());
    assert!(sim.run_until(3_000, all_ready));
    sim.drop_rate = 0.0;
    sim.cut.insert(("c".into(), "a".into()));
    sim.cut.insert(("c".into(), "b".into()));
    sim.cut.insert(("a".into(), "c".into()));
    sim.cut.insert(("b".into(), "c".into()));
    // links stay in `links`, so messages are "sent" but probes fail; drop all.
    sim.drop_rate = 1.0;
    let t0 = sim.now;
    assert!(sim.run_until(2_000, |s| s.state_seen("a", "c") == Some(MemberState::Dead)));
    let took = sim.now - t0;
    assert!(took <= 1_000, "hung member took {took} ms to detect");
    assert!(
        took >= 500,
        "declared dead before the silence threshold: {took} ms"
    );
}

#[test]
fn partition_and_heal_converges() {
    for seed in SEEDS {
        let mut sim = Sim::new(seed, &["a", "b", "c"], cfg());
        // The seed actually used (SIM_SEED overrides it), for the messages.
        let seed = sim.seed;
        assert!(sim.run_until(3_000, all_ready));
        sim.create("a", "S1");
        sim.run_for(50);
        sim.partition(&["a"], &["b", "c"]);
        sim.run_for(1_000);
        sim.set("a", "S1", "left", "from-a", SendMode::Async);
        sim.set("b", "S1", "right", "from-b", SendMode::Async);
        sim.create("a", "ONLY-A");
        sim.create("c", "ONLY-C");
        sim.run_for(500);
        assert!(!sim.converged());
        sim.heal();
        assert!(
            sim.run_until(5_000, |s| s.converged()),
            "seed {seed}: did not converge after heal"
        );
        for n in ["a", "b", "c"] {
            assert_eq!(
                sim.value(n, "S1", "left").as_deref(),
                Some("from-a"),
                "seed {seed} node {n}"
            );
            assert_eq!(
                sim.value(n, "S1", "right").as_deref(),
                Some("from-b"),
                "seed {seed} node {n}"
            );
            assert_eq!(
                sim.state_seen(n, if n == "a" { "b" } else { "a" }),
                Some(MemberState::Alive)
            );
        }
    }
}

#[test]
fn concurrent_writes_to_one_attribute_agree_everywhere() {
    for seed in SEEDS {
        let mut sim = Sim::new(seed, &["a", "b", "c"], cfg());
        // The seed actually used (SIM_SEED overrides it), for the messages.
        let seed = sim.seed;
        sim.delay_ms = (1, 20);
        assert!(sim.run_until(3_000, all_ready));
        sim.create("a", "S1");
        sim.run_for(50);
        for i in 0..50 {
            let n = ["a", "b", "c"][sim.rng.below(3) as usize];
            sim.set(n, "S1", "cart", &format!("v{i}-{n}"), SendMode::Async);
            let gap = sim.rng.below(3);
            sim.run_for(gap);
        }
        assert!(sim.run_until(3_000, |s| s.converged()), "seed {seed}");
        let v = sim.value("a", "S1", "cart");
        assert!(v.is_some());
        assert_eq!(sim.value("b", "S1", "cart"), v, "seed {seed}");
        assert_eq!(sim.value("c", "S1", "cart"), v, "seed {seed}");
    }
}

#[test]
fn lossy_links_still_converge() {
    for seed in SEEDS {
        let mut sim = Sim::new(seed, &["a", "b", "c"], cfg());
        // The seed actually used (SIM_SEED overrides it), for the messages.
        let seed = sim.seed;
        assert!(sim.run_until(3_000, all_ready));
        sim.drop_rate = 0.05;
        for i in 0..200 {
            let n = ["a", "b", "c"][(i % 3) as usize];
            let id = format!("S{}", i % 40);
            if i < 40 {
                sim.create(n, &id);
            } else {
                sim.set(n, &id, "k", &format!("{i}"), SendMode::Async);
            }
            sim.run_for(2);
        }
        sim.drop_rate = 0.0;
        assert!(
            sim.run_until(10_000, |s| s.converged()),
            "seed {seed}: lossy run did not converge"
        );
    }
}

#[test]
fn join_during_writes_gets_everything_before_ready() {
    for seed in SEEDS {
        let mut sim = Sim::new(
            seed,
            &["a", "b", "c"],
            CoreConfig {
                transfer_chunk_bytes: 2048,
                ..cfg()
            },
        );
        assert!(sim.run_until(3_000, all_ready));
        for i in 0..300 {
            sim.create("a", &format!("S{i:04}"));
            sim.set(
                "a",
                &format!("S{i:04}"),
                "v",
                &"x".repeat(100),
                SendMode::Async,
            );
        }
        sim.run_for(100);
        sim.start("d");
        let mut became_ready = false;
        for i in 300..2_300 {
            let n = ["a", "b", "c"][i % 3];
            sim.create(n, &format!("S{i:04}"));
            sim.run_for(1);
            if sim.nodes["d"].core.is_ready() {
                became_ready = true;
                // Everything written before it turned ready is there.
                let have = sim.nodes["d"].core.store.live_count();
                let want = sim.nodes["a"].core.store.live_count();
                assert!(have + 3 >= want, "seed {seed}: ready with {have} of {want}");
                break;
            }
        }
        assert!(became_ready, "seed {seed}: joiner never became ready");
        assert!(sim.nodes["d"].core.stats.transfer_sessions >= 300);
        assert!(sim.run_until(5_000, |s| s.converged()), "seed {seed}");
    }
}

#[test]
fn transfer_source_dying_moves_to_another_member_and_never_goes_ready_early() {
    let mut sim = Sim::new(
        11,
        &["a", "b", "c"],
        CoreConfig {
            transfer_chunk_bytes: 1024,
            ..cfg()
        },
    );
    assert!(sim.run_until(3_000, all_ready));
    for i in 0..500 {
        sim.create("a", &format!("S{i:04}"));
    }
    sim.run_for(100);
    sim.delay_ms = (5, 10);
    sim.start("d");
    assert!(sim.run_until(1_000, |s| matches!(
        s.nodes["d"].core.phase(),
        crate::core::Phase::Transferring { .. }
    )));
    let src = match sim.nodes["d"].core.phase() {
        crate::core::Phase::Transferring { source, .. } => source.clone(),
        _ => unreachable!(),
    };
    sim.run_for(30);
    sim.kill(&src);
    let mut ok = false;
    for _ in 0..5_000 {
        sim.step();
        if sim.nodes["d"].core.is_ready() {
            assert_eq!(sim.nodes["d"].core.store.live_count(), 500);
            ok = true;
            break;
        }
    }
    assert!(ok, "never finished after the source died");
    assert!(sim.nodes["d"].core.stats.transfer_retries >= 1);
}

#[test]
fn restarted_member_is_a_new_generation_and_catches_up() {
    for seed in SEEDS {
        let mut sim = Sim::new(seed, &["a", "b", "c"], cfg());
        // The seed actually used (SIM_SEED overrides it), for the messages.
        let seed = sim.seed;
        assert!(sim.run_until(3_000, all_ready));
        sim.create("a", "S1");
        sim.set("a", "S1", "k", "1", SendMode::Sync);
        sim.run_for(50);
        let old = sim.nodes["b"].core.me.clone();
        sim.kill("b");
        sim.run_for(200);
        sim.set("a", "S1", "k", "2", SendMode::Sync);
        sim.start("b");
        let new = sim.nodes["b"].core.me.clone();
        assert!(new.generation > old.generation);
        assert!(sim.run_until(3_000, all_ready), "seed {seed}");
        assert_eq!(sim.value("b", "S1", "k").as_deref(), Some("2"));
        assert_eq!(sim.state_seen("a", "b"), Some(MemberState::Alive));
        // The new life receives replication again.
        let w = sim.set("c", "S1", "k", "3", SendMode::Sync);
        assert!(sim.run_until(200, |s| s.write_results.contains_key(&("c".into(), w))));
        assert_eq!(sim.write_results[&("c".into(), w)], Ok(()));
        assert_eq!(
            sim.value("b", "S1", "k").as_deref(),
            Some("3"),
            "seed {seed}"
        );
    }
}

#[test]
fn touches_are_coalesced_and_replicated() {
    let mut sim = Sim::new(9, &["a", "b"], cfg());
    assert!(sim.run_until(3_000, all_ready));
    sim.create("a", "S1");
    sim.run_for(50);
    let sid = SessionId::parse("S1").unwrap();
    let sent_before = sim.nodes["a"].core.stats.deltas_sent;
    for _ in 0..50 {
        let now = sim.now;
        sim.nodes
            .get_mut("a")
            .unwrap()
            .core
            .read(&sid, true, now)
            .unwrap();
        sim.run_for(10);
    }
    let last = sim.nodes["a"]
        .core
        .store
        .get(&sid, sim.now, 0)
        .unwrap()
        .last_accessed_ms;
    sim.run_for(1_100);
    let sent = sim.nodes["a"].core.stats.deltas_sent - sent_before;
    assert!(sent <= 2, "{sent} deltas for 50 touches: not coalesced");
    assert_eq!(
        sim.nodes["b"]
            .core
            .store
            .get(&sid, sim.now, 0)
            .unwrap()
            .last_accessed_ms,
        last
    );
}

#[test]
fn a_slow_peer_applies_backpressure_then_releases_it() {
    let mut sim = Sim::new(
        13,
        &["a", "b"],
        CoreConfig {
            max_queue_bytes: 4_000,
            ..cfg()
        },
    );
    assert!(sim.run_until(3_000, all_ready));
    sim.create("a", "S1");
    sim.run_for(20);
    // b stops reading: everything a sends is lost in flight, nothing is acked,
    // but the connection stays up (a slow, not a dead, peer).
    sim.drop_rate = 1.0;
    let mut ws = Vec::new();
    for i in 0..4 {
        ws.push(sim.set(
            "a",
            "S1",
            &format!("k{i}"),
            &"x".repeat(1000),
            SendMode::Async,
        ));
    }
    let done = |s: &Sim, w: &u64| s.write_results.contains_key(&("a".into(), *w));
    assert!(done(&sim, &ws[0]), "first writes fit in the queue");
    assert!(
        !done(&sim, ws.last().unwrap()),
        "past the bound an async write must wait"
    );
    // The peer answers probes, so it stays a member; the waiting write fails
    // with a clear timeout (applied locally, still queued) instead of hanging.
    assert!(sim.run_until(3_000, |s| ws.iter().all(|w| done(s, w))));
    assert_eq!(sim.state_seen("a", "b"), Some(MemberState::Alive));
    assert!(ws[..3]
        .iter()
        .all(|w| sim.write_results[&("a".into(), *w)].is_ok()));
    assert!(matches!(
        sim.write_results[&("a".into(), ws[3])],
        Err(WriteError::Timeout(_))
    ));
    assert_eq!(
        sim.value("a", "S1", "k3").as_deref(),
        Some(&*"x".repeat(1000))
    );
    // When the peer drains again, new writes go through at once.
    sim.drop_rate = 0.0;
    assert!(
        sim.run_until(8_000, |s| s.converged()
            && s.nodes["a"].core.queue_totals().0 == 0),
        "did not catch up"
    );
    let w = sim.set("a", "S1", "after", "1", SendMode::Async);
    assert_eq!(sim.write_results.get(&("a".into(), w)), Some(&Ok(())));
}

#[test]
fn graceful_leave_is_seen_as_left_at_once() {
    let mut sim = Sim::new(5, &["a", "b", "c"], cfg());
    assert!(sim.run_until(3_000, all_ready));
    sim.create("c", "S1");
    sim.set("c", "S1", "k", "last", SendMode::Async);
    sim.leave("c", 1_000);
    assert_eq!(sim.state_seen("a", "c"), Some(MemberState::Left));
    assert_eq!(sim.state_seen("b", "c"), Some(MemberState::Left));
    assert_eq!(sim.value("a", "S1", "k").as_deref(), Some("last"));
    assert_eq!(
        sim.nodes["a"].core.stats.detections, 0,
        "a leave must not count as a failure"
    );
}

#[test]
fn a_group_of_writes_is_applied_on_a_peer_in_one_step() {
    for seed in SEEDS {
        // A small frame limit: twelve 4 KiB writes are more than one
        // batch's worth (max_frame / 2), so only grouping keeps them together.
        let mut sim = Sim::new(
            seed,
            &["a", "b"],
            CoreConfig {
                max_frame_bytes: 64 << 10,
                ..cfg()
            },
        );
        let seed = sim.seed;
        assert!(sim.run_until(3_000, all_ready), "seed {seed}");
        let ids: Vec<String> = (0..12).map(|i| format!("T{i}")).collect();
        for round in 0..20 {
            let value = format!("r{round}:{}", "x".repeat(4000));
            let writes = ids
                .iter()
                .map(|id| {
                    let mut ops = if round == 0 { vec![Op::Create] } else { vec![] };
                    ops.push(Op::Set {
                        name: "v".into(),
                        value: value.clone().into_bytes().into(),
                    });
                    (id.as_str(), ops)
                })
                .collect();
            sim.write_group("a", writes);
            let have = |s: &Sim| {
                ids.iter()
                    .filter(|id| s.value("b", id, "v").as_deref() == Some(value.as_str()))
                    .count()
            };
            let end = sim.now + 1_000;
            while sim.now < end && have(&sim) < ids.len() {
                sim.step();
                let n = have(&sim);
                assert!(
                    n == 0 || n == ids.len(),
                    "seed {seed} round {round}: b shows {n} of {} writes of one group",
                    ids.len()
                );
            }
            assert_eq!(
                have(&sim),
                ids.len(),
                "seed {seed} round {round}: the group arrived"
            );
        }
    }
}
