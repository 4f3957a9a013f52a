//! `POST /v1/batch`: several sessions' writes in one request and one
//! transaction, each with its own result, on real members.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use sessionmesh_sidecar::demo::client::Client;

async fn etag_of(c: &mut Client, id: &str) -> Option<String> {
    let r = c
        .get(&format!("/v1/sessions/{id}?touch=false"))
        .await
        .expect("get");
    (r.status == 200).then(|| r.headers["etag"].to_str().expect("etag").to_owned())
}

async fn create(c: &mut Client, id: &str) {
    let r = c
        .post("/v1/sessions", format!(r#"{{"id":"{id}"}}"#))
        .await
        .expect("create");
    assert_eq!(r.status, 201, "{}", r.text());
}

async fn batch(c: &mut Client, query: &str, body: Value) -> (u16, Value) {
    let r = c
        .post(&format!("/v1/batch{query}"), body.to_string())
        .await
        .expect("batch");
    (r.status, r.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_applies_each_write_as_if_sent_alone_and_answers_each() {
    let cl = started(2, &["--send", "sync"]).await;
    let (mut a, mut b) = (cl.client(0), cl.client(1));
    for id in ["BA1", "BA2", "BA3"] {
        create(&mut a, id).await;
    }
    let tag1 = etag_of(&mut a, "BA1").await.expect("BA1");
    let tag2 = etag_of(&mut a, "BA2").await.expect("BA2");
    let (status, v) = batch(
        &mut a,
        "",
        json!({"writes": [
            {"id": "BA1.node1", "set": {"user": base64_of("ann")}},
            {"id": "BA2", "op": "touch"},
            {"id": "NOPE", "set": {"x": "eA=="}},
            {"id": "BA1", "set": {"cart": base64_of("3")}, "remove": ["user"], "maxInactiveSeconds": 60},
            {"id": "BA3", "set": {"n": base64_of("1")}},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let r = v["results"].as_array().expect("results");
    assert_eq!(r.len(), 5);
    // Each write reports the version it was applied to and made.
    assert_eq!(r[0]["status"], 204);
    assert_eq!(r[0]["priorEtag"], tag1.as_str());
    assert_ne!(r[0]["etag"], tag1.as_str());
    // A touch keeps the version.
    assert_eq!(r[1], json!({"status": 204}));
    assert_eq!(etag_of(&mut a, "BA2").await.as_deref(), Some(tag2.as_str()));
    // An unknown session fails alone.
    assert_eq!(r[2]["status"], 404);
    assert_eq!(r[2]["error"], "not_found");
    assert_eq!(etag_of(&mut a, "NOPE").await, None);
    // Writes to one session apply in order.
    assert_eq!(r[3]["priorEtag"], r[0]["etag"]);
    let last = r[3]["etag"].as_str().expect("etag").to_owned();
    assert_eq!(r[4]["status"], 204);
    // Sync: acknowledged means on the peer already.
    assert_eq!(etag_of(&mut b, "BA1").await.as_deref(), Some(last.as_str()));
    assert_eq!(value(&mut b, "BA1", "cart").await.as_deref(), Some("3"));
    assert_eq!(value(&mut b, "BA1", "user").await, None);
    assert_eq!(value(&mut b, "BA3", "n").await.as_deref(), Some("1"));
    let s = b.get("/v1/sessions/BA1").await.expect("get").json();
    assert_eq!(s["maxInactiveSeconds"], 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_batch_is_refused_whole_and_applies_nothing() {
    let cl = started(1, &[]).await;
    let mut a = cl.client(0);
    create(&mut a, "BM1").await;
    let before = etag_of(&mut a, "BM1").await.expect("BM1");
    let good = json!({"id": "BM1", "set": {"a": "eA=="}});
    let cases = [
        (
            json!({"writes": [good, {"id": "bad/id"}]}),
            400,
            "bad_session_id",
        ),
        (
            json!({"writes": [good, {"id": "BM1", "set": {"a": "!!"}}]}),
            400,
            "bad_base64",
        ),
        (
            json!({"writes": [good, {"id": "BM1", "op": "touch", "remove": ["a"]}]}),
            400,
            "bad_request",
        ),
        (
            json!({"writes": [good, {"id": "BM1", "op": "rename"}]}),
            400,
            "malformed_json",
        ),
        (
            json!({"writes": [good, {"id": "BM1", "extra": 1}]}),
            400,
            "malformed_json",
        ),
        (
            json!({"writes": [good, {"id": "BM1", "maxInactiveSeconds": 1u64 << 40}]}),
            400,
            "bad_request",
        ),
        (json!({"write": [good]}), 400, "malformed_json"),
        (json!({"writes": vec![good.clone(); 257]}), 413, "too_large"),
    ];
    for (body, status, code) in cases {
        let (got, v) = batch(&mut a, "", body).await;
        assert_eq!((got, v["error"].as_str()), (status, Some(code)), "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (got, v) = batch(&mut a, "?send=never", json!({"writes": [good]})).await;
    assert_eq!(got, 400, "{v}");
    // Nothing of the refused batches was applied.
    assert_eq!(
        etag_of(&mut a, "BM1").await.as_deref(),
        Some(before.as_str())
    );
    assert_eq!(value(&mut a, "BM1", "a").await, None);
    // An empty batch is no error.
    let (got, v) = batch(&mut a, "", json!({"writes": []})).await;
    assert_eq!((got, v), (200, json!({"results": []})));
    // A body too large for a batch is refused before it is parsed.
    let huge = "x".repeat(4 << 20);
    let (got, v) = batch(
        &mut a,
        "",
        json!({"writes": [{"id": "BM1", "set": {"a": huge}}]}),
    )
    .await;
    assert_eq!((got, v["error"].as_str()), (413, Some("too_large")), "{v}");
}
