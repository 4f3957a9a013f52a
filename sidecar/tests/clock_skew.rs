//! Members with wrong clocks (libfaketime): no write of the others is lost,
//! and a member whose clock stepped back rejoins.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::too_many_lines)]

mod common;

use common::*;
use sessionmesh_sidecar::demo::client::Client;
use sessionmesh_sidecar::demo::localcluster::{faketime_env, metric, wait_for, LocalCluster};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_ten_minutes_ahead_is_reported_and_loses_no_write_of_the_others() {
    let mut cl = LocalCluster::new(&bin(), 3, &["--send", "sync"]).expect("cluster");
    cl.start(0).expect("start");
    cl.start(1).expect("start");
    ready(&cl, 0).await;
    ready(&cl, 1).await;
    let mut c0 = cl.client(0);
    assert_eq!(
        c0.post("/v1/sessions", r#"{"id":"SKEW"}"#)
            .await
            .expect("create")
            .status,
        201
    );
    let env = faketime_env("+10m");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    cl.start_with_env(2, &[], &env).expect("start ahead");
    let mut c2 = cl.client(2);
    // The fast member learns from its peers that its clock is off, and says so.
    let reported = wait_for(Duration::from_secs(10), || {
        let mut c = Client::new(http(&cl, 2));
        async move {
            c.get("/v1/cluster")
                .await
                .is_ok_and(|r| r.json()["me"]["clockSkewMs"].as_i64().unwrap_or(0) > 500_000)
        }
    })
    .await;
    assert!(
        reported,
        "node3 never reported its clock skew: {}",
        c2.get("/v1/cluster")
            .await
            .map(|r| r.text())
            .unwrap_or_default()
    );
    assert_eq!(
        c2.get("/readyz").await.expect("readyz").status,
        503,
        "a member with a wrong clock must not take traffic"
    );
    assert_eq!(metric(&mut c2, "sessionmesh_clock_skewed").await, 1.0);
    // A write there is refused with a reason, not stamped 10 minutes ahead.
    let r = c2
        .put(
            "/v1/sessions/SKEW/attributes/a?send=sync",
            "from-the-future",
        )
        .await
        .expect("put");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("clock_skew"), "{}", r.text());
    // A touch from its reads is stamped ahead and refused by the others.
    let _ = c2.get("/v1/sessions/SKEW").await;
    // The others keep serving: every later write wins everywhere.
    assert_eq!(c0.get("/readyz").await.expect("readyz").status, 200);
    later_writes_win(&cl, &[0, 1], &[0, 1], "SKEW", 10).await;
    let shown = wait_for(Duration::from_secs(5), || {
        let mut c = Client::new(http(&cl, 1));
        async move {
            c.get("/v1/cluster").await.is_ok_and(|r| {
                r.json()["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| {
                        m["name"] == "node3" && m["clockOffsetMs"].as_i64().unwrap_or(0) > 500_000
                    })
            })
        }
    })
    .await;
    assert!(shown, "node2 does not show node3's clock offset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_after_its_clock_stepped_back_rejoins() {
    let mut cl = LocalCluster::new(&bin(), 3, &["--send", "sync"]).expect("cluster");
    cl.start(0).expect("start");
    cl.start(1).expect("start");
    ready(&cl, 0).await;
    ready(&cl, 1).await;
    // It starts an hour ahead, is seen by its peers, then dies; its clock is
    // corrected and it starts again, an hour "earlier" than its last start.
    let env = faketime_env("+1h");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    cl.start_with_env(2, &[], &env).expect("start ahead");
    let seen = wait_for(Duration::from_secs(10), || {
        let mut c = Client::new(http(&cl, 0));
        async move {
            c.get("/v1/cluster").await.is_ok_and(|r| {
                r.json()["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| {
                        m["name"] == "node3" && m["state"] == "alive" && m["connected"] == true
                    })
            })
        }
    })
    .await;
    assert!(seen, "node1 never saw node3");
    cl.kill(2);
    let mut c0 = cl.client(0);
    assert_eq!(
        c0.post(
            "/v1/sessions?send=sync",
            r#"{"id":"BACK","attributes":{"a":"MQ=="}}"#
        )
        .await
        .expect("create")
        .status,
        201
    );
    cl.start(2).expect("restart");
    ready(&cl, 2).await;
    let mut c2 = cl.client(2);
    assert_eq!(
        value(&mut c2, "BACK", "a").await.as_deref(),
        Some("1"),
        "the restarted member lacks what was written meanwhile"
    );
    later_writes_win(&cl, &[0, 1, 2], &[0, 1, 2], "BACK", 6).await;
}
