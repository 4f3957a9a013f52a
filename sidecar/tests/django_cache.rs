//! Django's own cache test suite (`tests/runtests.py cache` from Django's
//! source distribution, which `e2e/setup.sh` fetches) with its RedisCache
//! pointed at a member's Redis endpoint, started with `--allow-flush` (the
//! suite calls `clear()`, i.e. FLUSHDB, between tests). The other member
//! replicates everything, as in production.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use sessionmesh_sidecar::demo::localcluster::{missing, require_python};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

/// RedisCacheTests that are expected to fail against sessionmesh, with the
/// reason. Empty: every test of the class passes. (Django itself skips the
/// three culling tests for any Redis backend.)
const EXPECTED_FAILURES: &[(&str, &str)] = &[];

fn django_tests() -> PathBuf {
    let version = Command::new("python3")
        .args(["-c", "import django; print(django.__version__)"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let base = std::env::var_os("SESSIONMESH_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/sessionmesh"),
        PathBuf::from,
    );
    let dir = base.join(format!("django-{version}/tests"));
    if !dir.join("runtests.py").is_file() {
        missing(
            &format!("Django's test suite is not at {}", dir.display()),
            "pip download django --no-binary :all: --no-deps, and unpack its tests/ there",
        );
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn djangos_cache_suite_passes_against_the_redis_endpoint() {
    require_python(&["django", "redis"]);
    let tests = django_tests();
    let cl = common::started(2, &["--redis", "127.0.0.1:0", "--allow-flush"]).await;
    let port = cl.nodes[0].redis.expect("redis endpoint").port();
    let settings = cl.dir.join("sessionmesh_django_settings.py");
    std::fs::write(
        &settings,
        format!(
            "from test_sqlite import *  # noqa\n\
             CACHES = {{'default': {{'BACKEND': 'django.core.cache.backends.redis.RedisCache',\n\
             \x20   'LOCATION': 'redis://127.0.0.1:{port}'}}}}\n"
        ),
    )
    .unwrap();
    let out = Command::new("python3")
        .current_dir(&tests)
        .env("PYTHONPATH", &cl.dir)
        .args([
            "runtests.py",
            "cache",
            "--settings=sessionmesh_django_settings",
            "--parallel",
            "1",
            "-v",
            "2",
            "--noinput",
        ])
        .output()
        .expect("python3 runtests.py");
    // unittest writes its report to stderr.
    let report = String::from_utf8_lossy(&out.stderr);
    let redis_lines: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("cache.tests.RedisCacheTests."))
        .collect();
    let ran = redis_lines.len();
    let failed: BTreeSet<String> = report
        .lines()
        .filter_map(|l| {
            let l = l
                .strip_prefix("FAIL: ")
                .or_else(|| l.strip_prefix("ERROR: "))?;
            l.contains("RedisCacheTests")
                .then(|| l.split_whitespace().next().unwrap_or(l).to_owned())
        })
        .collect();
    let expected: BTreeSet<String> = EXPECTED_FAILURES
        .iter()
        .map(|(t, _)| (*t).to_owned())
        .collect();
    let summary = report.lines().rev().take(4).collect::<Vec<_>>().join(" | ");
    println!("django cache suite: {summary}; RedisCacheTests lines: {ran}; failed: {failed:?}");
    assert!(
        ran >= 50,
        "RedisCacheTests did not run ({ran} lines):\n{}",
        tail(&report)
    );
    assert_eq!(
        failed,
        expected,
        "RedisCacheTests failures differ from the expected list:\n{}",
        tail(&report)
    );
    if expected.is_empty() {
        assert!(
            out.status.success(),
            "the cache suite failed:\n{}",
            tail(&report)
        );
    }
    // The suite's writes reached the other member too (it ends with a clear(),
    // so look at what replication counted rather than at keys).
    let mut c = cl.client(1);
    let applied =
        sessionmesh_sidecar::demo::localcluster::metric(&mut c, "sessionmesh_deltas_applied_total")
            .await;
    assert!(applied > 100.0, "the other member applied {applied} deltas");
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}
