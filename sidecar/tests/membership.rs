//! The member file as operators edit it: hot reload that keeps the last good
//! list, size limits, and a taken receiver port.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

mod common;

use common::*;
use sessionmesh_sidecar::demo::localcluster::{wait_for, LocalCluster};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_file_reload_keeps_last_good_membership_on_error() {
    let mut cl = started(2, &["--reload-interval-ms", "100"]).await;
    let mut c = cl.client(0);
    let good = cl.members_yaml();
    cl.write_members_text(&good.replace(&cl.nodes[1].replication.to_string(), "not-an-address"))
        .expect("write");
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) && !cl.log_text(0).contains("members[1].address") {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        cl.log_text(0).contains("members[1].address"),
        "{}",
        cl.log_tail(0, 10)
    );
    assert_eq!(
        member_state(&mut c, "node2").await.as_deref(),
        Some("alive")
    );
    // A valid change is picked up: a third member appears.
    let i = cl.add_node(true).expect("add");
    cl.write_members().expect("write");
    let t = Instant::now();
    let mut seen = None;
    while t.elapsed() < Duration::from_secs(5) {
        seen = member_state(&mut c, "node3").await;
        if seen.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen.is_some(), "node3 never appeared after reload");
    cl.start(i).expect("start node3");
    assert!(cl.wait_ready(i, Duration::from_secs(10)).await);
    assert!(wait_state(&mut c, "node3", "alive", Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_receiver_port_is_a_clear_startup_error() {
    let mut cl = LocalCluster::new(&bin(), 2, &[]).expect("cluster");
    let _squatter = std::net::TcpListener::bind(cl.nodes[1].replication).expect("bind");
    cl.start(0).expect("start");
    let r = cl.start(1);
    assert!(r.is_err(), "node2 started on a taken port");
    let log = cl.log_text(1);
    assert!(log.contains("cannot bind the replication port"), "{log}");
    assert!(log.contains("own receiver port"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_member_file_is_refused_by_name_and_the_last_good_one_kept() {
    let cl = started(2, &["--reload-interval-ms", "50"]).await;
    let mut c = cl.client(0);
    let mut text = cl.members_yaml();
    text.push_str(&format!("# {}\n", "SECRETCONTENT".repeat(200_000)));
    cl.write_members_text(&text).expect("write");
    assert!(
        wait_for(Duration::from_secs(5), || {
            let cl = &cl;
            async move { cl.log_text(0).contains("a member file may have at most") }
        })
        .await,
        "{}",
        cl.log_tail(0, 5)
    );
    assert!(
        !cl.log_text(0).contains("SECRETCONTENT"),
        "the file's content went into the log"
    );
    assert_eq!(
        member_state(&mut c, "node2").await.as_deref(),
        Some("alive")
    );
    assert_eq!(c.get("/readyz").await.expect("readyz").status, 200);
}
