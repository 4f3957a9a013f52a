//! The `SessionCluster` resource. Field docs become the CRD's descriptions
//! (`kubectl explain sessioncluster.spec`). What the schema cannot express is
//! checked by `SessionClusterSpec::validate` and reported as a condition.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A cluster of sessionmesh sidecars sharing HTTP sessions. Pods join it with
/// the annotation `sessionmesh.io/cluster: <name>` in the same namespace.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sessionmesh.io",
    version = "v1alpha1",
    kind = "SessionCluster",
    namespaced,
    status = "SessionClusterStatus",
    shortname = "smc",
    doc = "SessionCluster: a cluster of sessionmesh sidecars that share HTTP sessions. Pods join with the annotation sessionmesh.io/cluster.",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.replication.mode"}"#,
    printcolumn = r#"{"name":"Members","type":"integer","jsonPath":".status.memberCount"}"#,
    printcolumn = r#"{"name":"Ready Members","type":"integer","jsonPath":".status.readyMembers"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Degraded","type":"string","jsonPath":".status.conditions[?(@.type==\"Degraded\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SessionClusterSpec {
    /// How sessions are replicated between members.
    #[serde(default)]
    pub replication: Replication,
    /// The range receiver (replication) ports are assigned from. Each member
    /// gets a port unique among the members sharing its IP address (pods with
    /// hostNetwork on one node).
    #[serde(default)]
    pub receiver_ports: PortRange,
    /// How jvmRoutes are assigned: `<prefix><n>` with the lowest free n,
    /// unique among live members, stable for a pod's life.
    #[serde(default)]
    pub jvm_route: JvmRouteSpec,
    /// Failure detection timings, passed to every sidecar.
    #[serde(default)]
    pub failure_detection: FailureDetection,
    /// Session limits, passed to every sidecar.
    #[serde(default)]
    pub sessions: Sessions,
    /// The injected sidecar container.
    #[serde(default)]
    pub sidecar: SidecarSpec,
    /// Peer authentication: members prove they hold the shared secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_auth: Option<PeerAuth>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Replication {
    /// `all`: every member holds every session. `backup`: an owner plus
    /// `backups` copies chosen by hashing.
    #[serde(default = "default_mode")]
    pub mode: ReplicationMode,
    /// Copies besides the owner in `backup` mode.
    #[serde(default = "default_backups")]
    #[schemars(range(min = 1, max = 5))]
    pub backups: u8,
    /// `async`: an app write returns after the local apply. `sync`: after every
    /// live replica acknowledged it.
    #[serde(default = "default_send")]
    pub send: SendMode,
}

impl Default for Replication {
    fn default() -> Self {
        Replication {
            mode: default_mode(),
            backups: default_backups(),
            send: default_send(),
        }
    }
}

fn default_mode() -> ReplicationMode {
    ReplicationMode::All
}
fn default_backups() -> u8 {
    1
}
fn default_send() -> SendMode {
    SendMode::Async
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationMode {
    All,
    Backup,
}

/// When a write returns: the one type the CRD, the operator and the sidecar share.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SendMode {
    /// After the local apply.
    Async,
    /// After every live member acknowledged it.
    Sync,
}

impl SendMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SendMode::Async => "async",
            SendMode::Sync => "sync",
        }
    }
}

impl std::fmt::Display for SendMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ReplicationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationMode::All => "all",
            ReplicationMode::Backup => "backup",
        }
    }
}

impl std::str::FromStr for ReplicationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(ReplicationMode::All),
            "backup" => Ok(ReplicationMode::Backup),
            _ => Err(format!("replication mode must be all or backup, not {s:?}")),
        }
    }
}

impl std::str::FromStr for SendMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "async" => Ok(SendMode::Async),
            "sync" => Ok(SendMode::Sync),
            _ => Err(format!("send mode must be async or sync, not {s:?}")),
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub struct PortRange {
    /// First port of the range.
    #[serde(default = "default_first")]
    #[schemars(range(min = 1024, max = 65535))]
    pub first: u16,
    /// Last port of the range (inclusive).
    #[serde(default = "default_last")]
    #[schemars(range(min = 1024, max = 65535))]
    pub last: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange {
            first: default_first(),
            last: default_last(),
        }
    }
}
fn default_first() -> u16 {
    4000
}
fn default_last() -> u16 {
    4099
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct JvmRouteSpec {
    /// Prefix of every route; routes are `<prefix><n>` and must match
    /// `^[a-z][a-z0-9]{0,15}$`.
    #[serde(default = "default_prefix")]
    #[schemars(regex(pattern = r"^[a-z][a-z0-9]{0,11}$"))]
    pub prefix: String,
}

impl Default for JvmRouteSpec {
    fn default() -> Self {
        JvmRouteSpec {
            prefix: default_prefix(),
        }
    }
}
fn default_prefix() -> String {
    "node".into()
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureDetection {
    /// Heartbeat period, e.g. `100ms`.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval: String,
    /// Silence before a member is suspected, e.g. `500ms`.
    #[serde(default = "default_suspect")]
    pub suspect_after: String,
    /// Time for probes before a suspect is declared dead, e.g. `300ms`.
    #[serde(default = "default_probe")]
    pub probe_timeout: String,
}

impl Default for FailureDetection {
    fn default() -> Self {
        FailureDetection {
            heartbeat_interval: default_heartbeat(),
            suspect_after: default_suspect(),
            probe_timeout: default_probe(),
        }
    }
}
fn default_heartbeat() -> String {
    "100ms".into()
}
fn default_suspect() -> String {
    "500ms".into()
}
fn default_probe() -> String {
    "300ms".into()
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sessions {
    /// Default lifetime since last access, e.g. `30m`.
    #[serde(default = "default_inactive")]
    pub max_inactive_interval: String,
    /// Largest session in bytes (names and values).
    #[serde(default = "default_session_bytes")]
    #[schemars(range(min = 1024))]
    pub max_session_bytes: u64,
    /// Most sessions per member.
    #[serde(default = "default_max_sessions")]
    #[schemars(range(min = 1))]
    pub max_sessions: u64,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            max_inactive_interval: default_inactive(),
            max_session_bytes: default_session_bytes(),
            max_sessions: default_max_sessions(),
        }
    }
}
fn default_inactive() -> String {
    "30m".into()
}
fn default_session_bytes() -> u64 {
    1 << 20
}
fn default_max_sessions() -> u64 {
    10_000_000
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Sidecar image; the operator's default when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `native` (init container with restartPolicy Always, Kubernetes 1.29+) or
    /// `classic` (a regular container with a preStop wait).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(native|classic)$"))]
    pub mode: Option<String>,
    /// Resources of the sidecar container, as in a container spec
    /// (e.g. `requests: {cpu: 50m, memory: 64Mi}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<SidecarResources>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
pub struct SidecarResources {
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub requests: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub limits: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuth {
    /// Secret in the same namespace whose key `secret` holds the cluster secret.
    pub secret_name: String,
}

/// Observed state.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default)]
    pub observed_generation: i64,
    /// Members, ordered by jvmRoute index.
    #[serde(default)]
    pub members: Vec<MemberStatus>,
    #[serde(default)]
    pub member_count: u32,
    #[serde(default)]
    pub ready_members: u32,
    /// `Ready`, `Progressing`, `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    pub pod: String,
    pub uid: String,
    /// Absent until the pod has an IP. (Never an empty string: API servers
    /// of the 1.20 line read an empty string in a custom resource as null.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    pub port: u16,
    pub jvm_route: String,
    pub ready: bool,
    /// Terminating: peers treat it as having left.
    pub leaving: bool,
}

/// A status condition, as in `metav1.Condition`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
    pub observed_generation: i64,
    pub last_transition_time: String,
}

/// A spec the schema accepted but the operator cannot use. Nothing was changed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

/// Parses `100ms`, `5s`, `30m`, `1h` into milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

impl SessionClusterSpec {
    /// Checks what the schema cannot express.
    pub fn validate(&self) -> Result<(), SpecError> {
        let err = |field: &str, message: String| SpecError {
            field: field.into(),
            message,
        };
        if self.receiver_ports.first > self.receiver_ports.last {
            return Err(err(
                "spec.receiverPorts",
                format!(
                    "first ({}) is after last ({})",
                    self.receiver_ports.first, self.receiver_ports.last
                ),
            ));
        }
        let p = &self.jvm_route.prefix;
        if p.is_empty()
            || p.len() > 12
            || !p.starts_with(|c: char| c.is_ascii_lowercase())
            || !p
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(err(
                "spec.jvmRoute.prefix",
                format!("{p:?} must match ^[a-z][a-z0-9]{{0,11}}$"),
            ));
        }
        for (field, v) in [
            (
                "spec.failureDetection.heartbeatInterval",
                &self.failure_detection.heartbeat_interval,
            ),
            (
                "spec.failureDetection.suspectAfter",
                &self.failure_detection.suspect_after,
            ),
            (
                "spec.failureDetection.probeTimeout",
                &self.failure_detection.probe_timeout,
            ),
            (
                "spec.sessions.maxInactiveInterval",
                &self.sessions.max_inactive_interval,
            ),
        ] {
            if parse_duration_ms(v).is_none() {
                return Err(err(
                    field,
                    format!("{v:?} is not a duration like 250ms, 5s, 30m or 1h"),
                ));
            }
        }
        let hb = parse_duration_ms(&self.failure_detection.heartbeat_interval).unwrap_or(0);
        let sa = parse_duration_ms(&self.failure_detection.suspect_after).unwrap_or(0);
        if hb == 0 || sa < 2 * hb {
            return Err(err(
                "spec.failureDetection.suspectAfter",
                format!("must be at least twice heartbeatInterval ({hb} ms)"),
            ));
        }
        if !(1..=5).contains(&self.replication.backups) {
            return Err(err(
                "spec.replication.backups",
                format!("must be 1 to 5, not {}", self.replication.backups),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SessionClusterSpec {
        serde_json::from_str("{}").unwrap()
    }

    #[test]
    fn defaults_fill_an_empty_spec() {
        let s = spec();
        assert_eq!(
            s.receiver_ports,
            PortRange {
                first: 4000,
                last: 4099
            }
        );
        assert_eq!(s.jvm_route.prefix, "node");
        assert_eq!(s.replication.mode, ReplicationMode::All);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let mut s = spec();
        s.receiver_ports = PortRange {
            first: 5000,
            last: 4000,
        };
        assert_eq!(s.validate().unwrap_err().field, "spec.receiverPorts");
        let mut s = spec();
        s.failure_detection.suspect_after = "soon".into();
        assert_eq!(
            s.validate().unwrap_err().field,
            "spec.failureDetection.suspectAfter"
        );
        let mut s = spec();
        s.jvm_route.prefix = "Node".into();
        assert_eq!(s.validate().unwrap_err().field, "spec.jvmRoute.prefix");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        assert_eq!(parse_duration_ms("30m"), Some(1_800_000));
        assert_eq!(parse_duration_ms("5"), None);
        assert_eq!(parse_duration_ms("5 s"), None);
    }
}
