//! Backup mode with real processes: 5 members behind HAProxy, each session
//! on an owner and K backups. A SIGKILL of K members that hold a user's
//! session (the holder the cookie sticks to, or the owner and a backup
//! together) keeps every user logged in, counting on.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

use sessionmesh_sidecar::core::identity::SessionId;
use sessionmesh_sidecar::core::placement;
use sessionmesh_sidecar::demo::stack::{LbChoice, Stack, User};
use std::time::{Duration, Instant};

fn bin() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_sessionmesh-sidecar").into()
}

async fn stack(backups: &str) -> Stack {
    stack_with(backups, &[]).await
}

async fn stack_with(backups: &str, more: &[&str]) -> Stack {
    sessionmesh_sidecar::demo::localcluster::require("haproxy");
    let mut args = vec!["--replication", "backup", "--backups", backups];
    args.extend(more);
    Stack::start(&bin(), 5, &args, LbChoice::Haproxy, "sync")
        .await
        .expect("stack with HAProxy")
}

/// 20 users, 3 visits each; returns them with their last counter.
async fn users(st: &Stack) -> Vec<(User, u64)> {
    let mut out = Vec::new();
    for _ in 0..20 {
        let mut u = User::new(st.lb_addr);
        let mut last = 0;
        for i in 1..=3 {
            let v = u.visit().await.expect("visit");
            assert_eq!((v.status, v.counter), (200, Some(i)));
            last = i;
        }
        out.push((u, last));
    }
    out
}

/// Every user's next visit continues the counter, within a deadline, with no
/// failed request.
async fn all_continue(users: &mut [(User, u64)], what: &str) {
    for (n, (u, last)) in users.iter_mut().enumerate() {
        let t = Instant::now();
        let v = loop {
            match u.visit().await {
                Ok(v) if v.status == 200 => break v,
                other => assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "{what}: user {n} gets no good answer: {:?}",
                    other.map(|v| v.status)
                ),
            }
        };
        assert_eq!(
            v.counter,
            Some(*last + 1),
            "{what}: user {n} was logged out or lost a write (on {})",
            v.node
        );
        *last += 1;
    }
}

/// The session key (before the route suffix) of a user.
fn key(u: &User) -> SessionId {
    let c = u.session_cookie().expect("cookie");
    SessionId::parse(c.split('.').next().expect("key")).expect("id")
}

fn names(st: &Stack) -> Vec<String> {
    (0..5).map(|i| st.name(i)).collect()
}

async fn metric(st: &Stack, i: usize, name: &str) -> Option<f64> {
    let addr = st.cl.nodes[i].http;
    let mut c = sessionmesh_sidecar::demo::client::Client::new(addr?);
    let body = c.get("/metrics").await.ok()?.text();
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits (10 s at most) until the members `on` store `want` sessions in all.
async fn stored_copies(st: &Stack, on: &[usize], want: f64) {
    stored_copies_within(st, on, want, Duration::from_secs(10)).await;
}

async fn stored_copies_within(st: &Stack, on: &[usize], want: f64, within: Duration) {
    let t = Instant::now();
    loop {
        let mut total = 0.0;
        for j in on {
            total += metric(st, *j, "sessionmesh_sessions").await.unwrap_or(0.0);
        }
        if total == want {
            return;
        }
        assert!(
            t.elapsed() < within,
            "{total} sessions stored on members {on:?}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k1_a_sigkill_of_the_node_a_user_sticks_to_keeps_every_user_logged_in() {
    let mut st = stack("1").await;
    let mut us = users(&st).await;
    // Each session is on 2 of the 5 members, not on all of them (fetched
    // copies on the others go within a second).
    stored_copies(&st, &[0, 1, 2, 3, 4], 40.0).await;
    let sticky = us[0].0.sticky_server().expect("sticky cookie");
    let i = st.index_of(&sticky).expect("node");
    st.kill_node(i);
    all_continue(&mut us, "after SIGKILL of one member").await;
    // Copies are restored to 2 per session among the 4 left.
    let left: Vec<usize> = (0..5).filter(|j| *j != i).collect();
    stored_copies(&st, &left, 40.0).await;
    all_continue(&mut us, "after rebalancing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k2_a_sigkill_of_a_sessions_owner_and_backup_together_keeps_the_user_logged_in() {
    let mut st = stack("2").await;
    let mut us = users(&st).await;
    let all = names(&st);
    let h = placement::holders(&all, &key(&us[0].0), 3);
    let (a, b) = (
        st.index_of(h[0]).expect("owner"),
        st.index_of(h[1]).expect("backup"),
    );
    st.kill_node(a);
    st.kill_node(b);
    all_continue(&mut us, "after SIGKILL of the owner and a backup").await;
    assert!(
        metric(
            &st,
            st.index_of(h[2]).expect("2nd backup"),
            "sessionmesh_backup_rebalances_total"
        )
        .await
        .is_some_and(|n| n >= 1.0),
        "the surviving holder rebalanced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_on_a_member_without_a_copy_fetches_only_an_id_the_client_chose() {
    // No anti-entropy pass during the test: copies left on a member that does
    // not hold them must go by themselves.
    let st = stack_with("1", &["--anti-entropy-interval-ms", "600000"]).await;
    let addr = st.cl.nodes[0].http.expect("http");
    let mut c = sessionmesh_sidecar::demo::client::Client::new(addr);
    let fetches = "sessionmesh_backup_fetches_total";
    let before = metric(&st, 0, fetches).await.expect("fetch counter");
    // Ids the sidecar makes up: most land on other members, none is fetched.
    for _ in 0..20 {
        let r = c
            .post("/v1/sessions", r#"{"attributes":{"u":"dXNlcg=="}}"#)
            .await
            .expect("create");
        assert_eq!(r.status, 201, "{}", r.text());
        assert!(
            r.text().contains("dXNlcg=="),
            "the answer holds the session: {}",
            r.text()
        );
    }
    assert_eq!(
        metric(&st, 0, fetches).await,
        Some(before),
        "a made-up id was fetched"
    );
    // Member 0 keeps no copy of those it does not hold: 2 copies each in all.
    stored_copies_within(&st, &[0, 1, 2, 3, 4], 40.0, Duration::from_secs(4)).await;
    // A client's id that member 0 does not hold: fetched once, so that a
    // second create of it is refused there as on its holders.
    let all = names(&st);
    let id = (0..)
        .map(|n| format!("chosen{n}"))
        .find(|id| !placement::holds(&all, &all[0], &SessionId::parse(id).expect("id"), 2))
        .expect("an id member 0 does not hold");
    let body = format!(r#"{{"id":"{id}"}}"#);
    let r = c.post("/v1/sessions", body.clone()).await.expect("create");
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(metric(&st, 0, fetches).await, Some(before + 1.0));
    let again = c.post("/v1/sessions", body).await.expect("create again");
    assert_eq!(
        again.status,
        409,
        "a duplicate on a member without a copy: {}",
        again.text()
    );
}
