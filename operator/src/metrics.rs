//! `/metrics` of the operator: OpenMetrics text from `prometheus-client`.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

/// The content type of `Metrics::render`'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub namespace: String,
    pub name: String,
}

pub struct Metrics {
    registry: Registry,
    pub leader: Gauge,
    pub reconciles: Counter,
    pub failures: Counter,
    pub last_reconcile: Gauge<f64, AtomicU64>,
    pub members: Family<ClusterLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sessionmesh_operator");
        let m = Metrics {
            leader: Gauge::default(),
            reconciles: Counter::default(),
            failures: Counter::default(),
            last_reconcile: Gauge::default(),
            members: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "leader",
            "1 while this replica holds the lease and reconciles",
            m.leader.clone(),
        );
        registry.register(
            "reconciles",
            "Reconciles of SessionCluster objects that succeeded",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Reconciles that failed (retried with back-off)",
            m.failures.clone(),
        );
        registry.register_with_unit(
            "last_reconcile",
            "Duration of the last successful reconcile",
            Unit::Seconds,
            m.last_reconcile.clone(),
        );
        registry.register(
            "members",
            "Members of each SessionCluster at its last reconcile",
            m.members.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(1024);
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_help_types_and_counters_end_in_total() {
        let m = Metrics::default();
        m.reconciles.inc();
        m.leader.set(1);
        m.last_reconcile.set(0.25);
        let labels = ClusterLabels {
            namespace: "shop".into(),
            name: "web".into(),
        };
        m.members.get_or_create(&labels).set(3);
        let text = m.render();
        for family in [
            "leader",
            "reconciles",
            "reconcile_failures",
            "last_reconcile_seconds",
            "members",
        ] {
            assert!(
                text.contains(&format!("# HELP sessionmesh_operator_{family} ")),
                "{family}: {text}"
            );
            assert!(text.contains(&format!("# TYPE sessionmesh_operator_{family} ")));
        }
        assert!(
            text.contains("\nsessionmesh_operator_reconciles_total 1\n"),
            "{text}"
        );
        assert!(text.contains("\nsessionmesh_operator_reconcile_failures_total 0\n"));
        assert!(text.contains("\nsessionmesh_operator_last_reconcile_seconds 0.25\n"));
        assert!(text.contains("sessionmesh_operator_members{namespace=\"shop\",name=\"web\"} 3\n"));
        assert!(text.ends_with("# EOF\n"));
    }
}
