//! jvmRoute and receiver-port assignment: pure functions over the member pods.
//!
//! Invariants of the result: no two live members share a route; no two members
//! that can share an IP (hostNetwork pods) share a port; a pod that already has
//! a valid, unique assignment keeps it (stable for the pod's life); new pods get
//! the lowest free route index. When two pods claim the same route (a race at
//! admission), the older pod keeps it and the newer one is reassigned.

use sessionmesh_api::PortRange;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub name: String,
    pub uid: String,
    /// Creation time as RFC 3339 (sorts chronologically) for tie-breaking.
    pub created: String,
    pub ip: Option<String>,
    pub host_network: bool,
    pub node: Option<String>,
    pub ready: bool,
    pub terminating: bool,
    pub route: Option<String>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub pod: String,
    pub route: String,
    pub port: u16,
    /// True when the pod's recorded assignment must be written.
    pub changed: bool,
}

/// Why assignment failed for some pods. The others are assigned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignError {
    #[error("receiver port range {first}-{last} is exhausted for pods sharing an address ({pods} left without a port)")]
    PortsExhausted { first: u16, last: u16, pods: usize },
}

fn route_index(prefix: &str, route: &str) -> Option<u32> {
    let n = route.strip_prefix(prefix)?;
    if n.is_empty() || n.starts_with('0') {
        return None;
    }
    n.parse().ok().filter(|i| *i >= 1)
}

/// The key of the address space a pod's port must be unique in.
fn port_space(p: &PodInfo) -> String {
    if p.host_network {
        // hostNetwork pods share their node's IP; before scheduling the node is
        // unknown, so all of them share one space.
        "host".to_owned()
    } else {
        format!("pod/{}", p.uid)
    }
}

pub fn assign(
    prefix: &str,
    ports: PortRange,
    pods: &[PodInfo],
) -> (Vec<Assignment>, Option<AssignError>) {
    let mut order: Vec<&PodInfo> = pods.iter().collect();
    order.sort_by(|a, b| {
        (a.created.as_str(), a.name.as_str()).cmp(&(b.created.as_str(), b.name.as_str()))
    });
    let mut used_routes: BTreeSet<u32> = BTreeSet::new();
    let mut used_ports: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    let mut kept: BTreeMap<&str, (Option<u32>, Option<u16>)> = BTreeMap::new();
    // Pass 1: oldest first, keep valid unique assignments.
    for p in &order {
        let r = p
            .route
            .as_deref()
            .and_then(|r| route_index(prefix, r))
            .filter(|i| used_routes.insert(*i));
        let space = used_ports.entry(port_space(p)).or_default();
        let port = p
            .port
            .filter(|x| (ports.first..=ports.last).contains(x))
            .filter(|x| space.insert(*x));
        kept.insert(p.name.as_str(), (r, port));
    }
    // Pass 2: fill the gaps with the lowest free values.
    let mut out = Vec::with_capacity(order.len());
    let mut starved = 0;
    for p in &order {
        let (r, port) = kept[p.name.as_str()];
        let idx = r.unwrap_or_else(|| {
            let mut i = 1;
            while used_routes.contains(&i) {
                i += 1;
            }
            used_routes.insert(i);
            i
        });
        let space = used_ports.entry(port_space(p)).or_default();
        let port = match port {
            Some(x) => Some(x),
            None => {
                let free = (ports.first..=ports.last).find(|x| !space.contains(x));
                if let Some(x) = free {
                    space.insert(x);
                }
                free
            }
        };
        let Some(port) = port else {
            starved += 1;
            continue;
        };
        let route = format!("{prefix}{idx}");
        let changed = p.route.as_deref() != Some(route.as_str()) || p.port != Some(port);
        out.push(Assignment {
            pod: p.name.clone(),
            route,
            port,
            changed,
        });
    }
    let err = (starved > 0).then_some(AssignError::PortsExhausted {
        first: ports.first,
        last: ports.last,
        pods: starved,
    });
    (out, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, created: &str) -> PodInfo {
        PodInfo {
            name: name.into(),
            uid: format!("uid-{name}"),
            created: created.into(),
            ip: None,
            host_network: false,
            node: None,
            ready: false,
            terminating: false,
            route: None,
            port: None,
        }
    }
    const RANGE: PortRange = PortRange {
        first: 4000,
        last: 4099,
    };

    #[test]
    fn new_pods_get_the_lowest_free_route_and_keep_it() {
        let mut a = pod("a", "1");
        a.route = Some("node2".into());
        a.port = Some(4000);
        let pods = vec![a, pod("b", "2"), pod("c", "3")];
        let (out, err) = assign("node", RANGE, &pods);
        assert!(err.is_none());
        let routes: Vec<(&str, &str, bool)> = out
            .iter()
            .map(|x| (x.pod.as_str(), x.route.as_str(), x.changed))
            .collect();
        assert_eq!(
            routes,
            vec![
                ("a", "node2", false),
                ("b", "node1", true),
                ("c", "node3", true)
            ]
        );
        // Non-hostNetwork pods have their own IPs: the first port for everyone.
        assert!(out.iter().all(|x| x.port == 4000));
    }

    #[test]
    fn a_duplicate_route_is_repaired_in_favour_of_the_older_pod() {
        let mut old = pod("old", "2026-01-01T00:00:00Z");
        old.route = Some("node1".into());
        old.port = Some(4000);
        let mut young = pod("young", "2026-01-02T00:00:00Z");
        young.route = Some("node1".into());
        young.port = Some(4000);
        let (out, _) = assign("node", RANGE, &[young, old]);
        assert_eq!(
            out[0],
            Assignment {
                pod: "old".into(),
                route: "node1".into(),
                port: 4000,
                changed: false
            }
        );
        assert_eq!(out[1].route, "node2");
        assert!(out[1].changed);
    }

    #[test]
    fn host_network_pods_get_distinct_ports_and_the_range_can_run_out() {
        let pods: Vec<PodInfo> = (0..3)
            .map(|i| {
                let mut p = pod(&format!("h{i}"), &format!("{i}"));
                p.host_network = true;
                p
            })
            .collect();
        let (out, err) = assign(
            "node",
            PortRange {
                first: 4000,
                last: 4001,
            },
            &pods,
        );
        assert_eq!(
            out.iter().map(|x| x.port).collect::<Vec<_>>(),
            vec![4000, 4001]
        );
        assert_eq!(
            err,
            Some(AssignError::PortsExhausted {
                first: 4000,
                last: 4001,
                pods: 1
            })
        );
    }

    #[test]
    fn fifty_pods_have_fifty_distinct_routes_and_invalid_ones_are_replaced() {
        let mut pods: Vec<PodInfo> = (0..50)
            .map(|i| pod(&format!("p{i:02}"), &format!("{i:03}")))
            .collect();
        pods[7].route = Some("Node-7".into());
        pods[8].route = Some("node007".into());
        let (out, _) = assign("node", RANGE, &pods);
        let set: BTreeSet<&str> = out.iter().map(|x| x.route.as_str()).collect();
        assert_eq!(set.len(), 50);
        assert!(set.iter().all(|r| r.len() <= 16 && r.starts_with("node")));
        assert!(out.iter().all(|x| x.changed));
    }

    #[test]
    fn reassigning_is_idempotent() {
        let pods: Vec<PodInfo> = (0..5)
            .map(|i| pod(&format!("p{i}"), &format!("{i}")))
            .collect();
        let (first, _) = assign("node", RANGE, &pods);
        let again: Vec<PodInfo> = pods
            .iter()
            .zip(&first)
            .map(|(p, a)| PodInfo {
                route: Some(a.route.clone()),
                port: Some(a.port),
                ..p.clone()
            })
            .collect();
        let (second, _) = assign("node", RANGE, &again);
        assert!(second.iter().all(|x| !x.changed));
    }
}
