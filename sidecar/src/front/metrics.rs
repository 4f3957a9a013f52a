//! `/metrics`: OpenMetrics text from `prometheus-client`, built from the
//! member's status and I/O counters at each scrape.

use crate::node::{Handle, Status};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::Ordering;

/// The content type of `render`'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    r.register(name, help, ConstCounter::new(v));
}

/// Every metric of this member, as OpenMetrics text.
pub fn render(st: &Status, h: &Handle) -> String {
    let mut r = Registry::with_prefix("sessionmesh");
    status(&mut r, st, h);
    io(&mut r, h);
    core_stats(&mut r, st);
    if let Some(b) = &st.backup {
        backup(&mut r, b);
    }
    let members = Family::<StateLabel, Gauge>::default();
    for (state, n) in &st.states {
        let label = StateLabel {
            state: state.as_str(),
        };
        members.get_or_create(&label).set(*n as i64);
    }
    r.register(
        "members",
        "Members by state as this member sees them (itself excluded)",
        members,
    );
    let mut out = String::with_capacity(8192);
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

/// Readiness, the store and the replication queues.
fn status(r: &mut Registry, st: &Status, h: &Handle) {
    let ready = h.ready.load(Ordering::Relaxed);
    r.register(
        "ready",
        "1 when this member serves traffic (state transfer complete)",
        ConstGauge::new(ready as u8 as i64),
    );
    r.register(
        "sessions",
        "Live sessions held by this member",
        ConstGauge::new(st.sessions as i64),
    );
    r.register(
        "tombstones",
        "Invalidation tombstones not yet garbage-collected",
        ConstGauge::new(st.tombstones as i64),
    );
    r.register(
        "session_payload_bytes",
        "Sum of id, attribute name and value bytes of live sessions",
        ConstGauge::new(st.payload_bytes as i64),
    );
    r.register(
        "queue_deltas",
        "Deltas waiting for acknowledgement, all peers",
        ConstGauge::new(st.queue.0 as i64),
    );
    r.register(
        "queue_bytes",
        "Bytes of deltas waiting for acknowledgement, all peers",
        ConstGauge::new(st.queue.1 as i64),
    );
}

/// Peer connections, the local endpoints and the core task's liveness.
fn io(r: &mut Registry, h: &Handle) {
    counter(
        r,
        "bytes_received",
        "Bytes read from peer connections",
        h.io.bytes_in.load(Ordering::Relaxed),
    );
    counter(
        r,
        "bytes_sent",
        "Bytes written to peer connections",
        h.io.bytes_out.load(Ordering::Relaxed),
    );
    counter(
        r,
        "frame_errors",
        "Peer connections closed for bad frames or failed handshakes",
        h.io.frame_errors.load(Ordering::Relaxed),
    );
    counter(
        r,
        "auth_failures",
        "Peers refused for not holding the cluster secret",
        h.io.auth_failures.load(Ordering::Relaxed),
    );
    counter(
        r,
        "core_stalled_refusals",
        "Peer connections closed unanswered because the core task was stuck",
        h.io.core_stalled_refusals.load(Ordering::Relaxed),
    );
    r.register_with_unit(
        "core_silent",
        "Time since the core task last went round its loop",
        Unit::Seconds,
        ConstGauge::new(h.core_silent_ms() as f64 / 1000.0),
    );
    counter(r, "replication_pending_refused", "Replication connections closed before their handshake: too many were pending (in all, or from one address)", h.io.pending_refused.load(Ordering::Relaxed));
    counter(r, "send_queue_full", "Times deltas to a peer were held back because its writer queue was full (the peer does not read)", h.io.send_queue_full.load(Ordering::Relaxed));
    counter(
        r,
        "probes_dropped",
        "Probe requests dropped because too many probes were under way",
        h.io.probes_dropped.load(Ordering::Relaxed),
    );
    counter(
        r,
        "http_refused_connections",
        "Local HTTP connections closed at once: --http-max-connections were open",
        h.io.http_refused.load(Ordering::Relaxed),
    );
    r.register(
        "change_watchers",
        "Apps watching for changed sessions (GET /v1/changes)",
        ConstGauge::new(h.watchers.count() as i64),
    );
    counter(
        r,
        "change_watchers_dropped",
        "Change watchers dropped for falling too far behind",
        h.watchers.dropped.load(Ordering::Relaxed),
    );
    counter(
        r,
        "redis_auth_failures",
        "Failed Redis AUTH and HELLO AUTH attempts",
        h.io.redis_auth_failures.load(Ordering::Relaxed),
    );
    counter(
        r,
        "redis_output_stalls",
        "Redis clients disconnected for reading none of their replies for 30 s",
        h.io.redis_output_stalls.load(Ordering::Relaxed),
    );
    r.register(
        "redis_clients",
        "Open Redis-protocol connections",
        ConstGauge::new(h.io.redis_clients.load(Ordering::Relaxed) as i64),
    );
}

/// What the core counted.
/// Backup mode: fetches, rebalancing and copies (only in backup mode).
fn backup(r: &mut Registry, b: &crate::core::BackupStats) {
    let gauge = |r: &mut Registry, name: &str, help: &str, v: u64| {
        r.register(name, help, ConstGauge::new(v as i64));
    };
    gauge(
        r,
        "backup_under_replicated",
        "Sessions this member holds with fewer than 1 + backups copies known (copies in flight, or too few live members)",
        b.under_replicated,
    );
    gauge(
        r,
        "backup_copies_in_flight",
        "Sessions this member handed to another holder and not yet acknowledged",
        b.copies_in_flight,
    );
    counter(
        r,
        "backup_fetches",
        "Fetches of sessions this member holds no copy of",
        b.fetches,
    );
    counter(
        r,
        "backup_fetch_timeouts",
        "Fetches that gave up on a holder",
        b.fetch_timeouts,
    );
    counter(
        r,
        "backup_rebalances",
        "Rebalancing passes after a membership change",
        b.rebalances,
    );
    counter(
        r,
        "backup_copies_sent",
        "Sessions sent to their new holders",
        b.copies_sent,
    );
    counter(
        r,
        "backup_copies_acked",
        "Sessions the receiving holder acknowledged",
        b.copies_acked,
    );
    counter(
        r,
        "backup_copies_received",
        "Sessions received as a new holder",
        b.copies_received,
    );
    counter(
        r,
        "backup_surplus_dropped",
        "Copies dropped after handing them to their holders",
        b.surplus_dropped,
    );
}

fn core_stats(r: &mut Registry, st: &Status) {
    let t = &st.stats;
    counter(
        r,
        "deltas_applied",
        "Deltas from peers applied to the store",
        t.deltas_applied,
    );
    counter(
        r,
        "deltas_sent",
        "Deltas sent to peers (resends included)",
        t.deltas_sent,
    );
    counter(
        r,
        "delta_seq_gaps",
        "Gaps seen in a peer's delta stream (repaired by anti-entropy)",
        t.seq_gaps,
    );
    counter(
        r,
        "detections",
        "Members this member declared dead",
        t.detections,
    );
    transfer_and_repair(r, st);
}

/// State transfer, anti-entropy, expiry and what was refused.
fn transfer_and_repair(r: &mut Registry, st: &Status) {
    let t = &st.stats;
    r.register(
        "transfer_sessions_received",
        "Entries received by state transfer",
        ConstGauge::new(t.transfer_sessions as i64),
    );
    r.register(
        "transfer_source_entries",
        "Entries the transfer source reported holding",
        ConstGauge::new(t.transfer_total as i64),
    );
    r.register_with_unit(
        "transfer_duration",
        "Duration of the completed state transfer",
        Unit::Seconds,
        ConstGauge::new(t.transfer_ms as f64 / 1000.0),
    );
    counter(
        r,
        "transfer_retries",
        "State transfers moved to another member",
        t.transfer_retries,
    );
    counter(
        r,
        "anti_entropy_rounds",
        "Anti-entropy digest exchanges started",
        t.ae_rounds,
    );
    counter(
        r,
        "anti_entropy_repairs",
        "Entries repaired by anti-entropy",
        t.ae_repairs,
    );
    counter(
        r,
        "write_timeouts",
        "Writes whose replication was not acknowledged in time",
        t.write_timeouts,
    );
    counter(
        r,
        "queue_overflows",
        "Peer backlogs dropped past the hard bound",
        t.queue_overflows,
    );
    counter(
        r,
        "sessions_expired",
        "Sessions removed by expiry",
        t.expired,
    );
    r.register("started_empty_with_silent_peers", "1 when this member went ready with an empty store because its peers accepted connections but never answered", ConstGauge::new(t.started_empty_with_silent_peers as i64));
    counter(r, "peer_refused", "Peer deltas and states refused for breaking this member's limits (ids, attribute and session sizes, session cap)", t.peer_refused);
    counter(r, "clock_refused", "Peer deltas and states refused: their timestamp was ahead of this member's clock by more than --max-clock-skew-ms", t.clock_refused);
    counter(r, "clock_quarantined", "Entries dropped for carrying a timestamp beyond this member's clock bound (repaired by anti-entropy)", t.clock_quarantined);
    r.register("clock_skewed", "1 when this member's clock is off most of its peers' by more than --max-clock-skew-ms (it is then not ready and refuses writes)", ConstGauge::new(st.me.clock_skew_ms.is_some() as u8 as i64));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::detector::MemberState;
    use crate::core::identity::{Generation, NodeId};
    use crate::core::{Phase, Stats};
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::Arc;

    fn sample() -> (Status, Handle) {
        let me = NodeId {
            name: "a".into(),
            generation: Generation(1),
        };
        let st = Status {
            cluster: "c".into(),
            me: crate::node::MeView {
                name: "a".into(),
                generation: 1,
                jvm_route: "a".into(),
                address: "127.0.0.1:1".into(),
                phase: Phase::Ready,
                clock_skew_ms: None,
            },
            members: Vec::new(),
            stats: Stats {
                deltas_applied: 7,
                ..Stats::default()
            },
            sessions: 3,
            tombstones: 0,
            payload_bytes: 10,
            queue: (0, 0),
            states: vec![(MemberState::Alive, 2), (MemberState::Dead, 1)],
            backup: Some(crate::core::BackupStats {
                under_replicated: 4,
                rebalances: 2,
                ..Default::default()
            }),
        };
        let (cmd_tx, _) = tokio::sync::mpsc::channel(1);
        let h = Handle {
            cmd_tx,
            ready: Arc::new(AtomicBool::new(true)),
            io: Arc::default(),
            me,
            jvm_route: "a".into(),
            limits: crate::core::store::Limits::default(),
            default_max_inactive_ms: 1,
            core_beat: Arc::new(AtomicU64::new(crate::node::mono_ms())),
            test_hooks: false,
            settings: Default::default(),
            watchers: Arc::default(),
        };
        (st, h)
    }

    #[test]
    fn every_family_has_help_and_a_type_and_counters_end_in_total() {
        let (st, h) = sample();
        let text = render(&st, &h);
        assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
        assert!(
            text.contains("\nsessionmesh_backup_under_replicated 4\n"),
            "{text}"
        );
        assert!(
            text.contains("\nsessionmesh_backup_rebalances_total 2\n"),
            "{text}"
        );
        let mut types = BTreeMap::new();
        let mut helps = 0;
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("name and type");
                types.insert(name.to_owned(), kind.to_owned());
            } else if l.starts_with("# HELP ") {
                helps += 1;
            }
        }
        assert_eq!(helps, types.len(), "one HELP per family");
        assert!(types.len() > 30, "{text}");
        for (name, kind) in &types {
            assert!(name.starts_with("sessionmesh_"), "{name}");
            if kind == "gauge" {
                assert!(
                    !name.ends_with("_total"),
                    "a gauge named like a counter: {name}"
                );
            }
        }
        assert_eq!(types["sessionmesh_deltas_applied"], "counter");
        assert!(
            text.contains("\nsessionmesh_deltas_applied_total 7\n"),
            "{text}"
        );
        assert!(text.contains("\nsessionmesh_sessions 3\n"));
        assert!(text.contains("sessionmesh_members{state=\"dead\"} 1\n"));
        assert_eq!(types["sessionmesh_core_silent_seconds"], "gauge");
    }
}
