//! The settings a SessionCluster hands to every sidecar: one type for both
//! ends. The webhook builds it from the spec (`from_spec`) and renders it as
//! flags (`to_args`); the sidecar parses the same flags into the same type
//! (it is a `clap::Args`), and both call `validate`.

use crate::cluster::{parse_duration_ms, ReplicationMode, SendMode, SessionClusterSpec, SpecError};
use serde::{Deserialize, Serialize};

#[derive(clap::Args, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSettings {
    /// async: a write returns after the local apply; sync: after every live member acknowledged it.
    #[arg(long, env = "SESSIONMESH_SEND", default_value = "async")]
    pub send: SendMode,
    /// all: every member holds every session; backup: an owner plus --backups copies.
    #[arg(long, env = "SESSIONMESH_REPLICATION", default_value = "all")]
    pub replication: ReplicationMode,
    /// Copies besides the owner in backup mode (1 to 5).
    #[arg(long, default_value_t = 1)]
    pub backups: u8,
    /// Heartbeat period.
    #[arg(long, default_value_t = 100)]
    pub heartbeat_interval_ms: u64,
    /// Silence after which a member is suspected (at least twice the heartbeat).
    #[arg(long, default_value_t = 500)]
    pub suspect_after_ms: u64,
    /// How long probes may take before a suspect is declared dead.
    #[arg(long, default_value_t = 300)]
    pub probe_timeout_ms: u64,
    /// Default session lifetime since last access, in whole seconds.
    #[arg(long, default_value_t = 1800)]
    pub max_inactive_seconds: u64,
    /// Largest session (names and values), in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_session_bytes: u64,
    /// Most sessions this member holds.
    #[arg(long, default_value_t = 10_000_000)]
    pub max_sessions: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            send: SendMode::Async,
            replication: ReplicationMode::All,
            backups: 1,
            heartbeat_interval_ms: 100,
            suspect_after_ms: 500,
            probe_timeout_ms: 300,
            max_inactive_seconds: 1800,
            max_session_bytes: 1 << 20,
            max_sessions: 10_000_000,
        }
    }
}

fn err(field: &str, message: String) -> SpecError {
    SpecError {
        field: field.into(),
        message,
    }
}

impl ClusterSettings {
    /// The settings of a cluster's spec; the spec is validated first.
    pub fn from_spec(spec: &SessionClusterSpec) -> Result<ClusterSettings, SpecError> {
        spec.validate()?;
        let ms = |field: &str, v: &str| {
            parse_duration_ms(v).ok_or_else(|| err(field, format!("{v:?} is not a duration")))
        };
        let fd = &spec.failure_detection;
        let inactive = ms(
            "spec.sessions.maxInactiveInterval",
            &spec.sessions.max_inactive_interval,
        )?;
        let s = ClusterSettings {
            send: spec.replication.send,
            replication: spec.replication.mode,
            backups: spec.replication.backups,
            heartbeat_interval_ms: ms(
                "spec.failureDetection.heartbeatInterval",
                &fd.heartbeat_interval,
            )?,
            suspect_after_ms: ms("spec.failureDetection.suspectAfter", &fd.suspect_after)?,
            probe_timeout_ms: ms("spec.failureDetection.probeTimeout", &fd.probe_timeout)?,
            max_inactive_seconds: inactive / 1000,
            max_session_bytes: spec.sessions.max_session_bytes,
            max_sessions: spec.sessions.max_sessions,
        };
        if inactive % 1000 != 0 {
            return Err(err(
                "spec.sessions.maxInactiveInterval",
                format!("{inactive} ms is not a whole number of seconds"),
            ));
        }
        s.validate()?;
        Ok(s)
    }

    /// What both ends check; the field names are the spec's.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !(1..=5).contains(&self.backups) {
            return Err(err(
                "spec.replication.backups",
                format!("must be 1 to 5, not {}", self.backups),
            ));
        }
        if self.heartbeat_interval_ms == 0 {
            return Err(err(
                "spec.failureDetection.heartbeatInterval",
                "must be more than 0".into(),
            ));
        }
        if self.suspect_after_ms < 2 * self.heartbeat_interval_ms {
            return Err(err(
                "spec.failureDetection.suspectAfter",
                format!(
                    "must be at least twice heartbeatInterval ({} ms)",
                    self.heartbeat_interval_ms
                ),
            ));
        }
        if self.probe_timeout_ms == 0 {
            return Err(err(
                "spec.failureDetection.probeTimeout",
                "must be more than 0".into(),
            ));
        }
        if self.max_inactive_seconds == 0 {
            return Err(err(
                "spec.sessions.maxInactiveInterval",
                "must be at least 1s".into(),
            ));
        }
        if self.max_session_bytes < 1024 {
            return Err(err(
                "spec.sessions.maxSessionBytes",
                "must be at least 1024".into(),
            ));
        }
        if self.max_sessions == 0 {
            return Err(err(
                "spec.sessions.maxSessions",
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The sidecar flags that give these settings.
    pub fn to_args(&self) -> Vec<String> {
        [
            ("--send", self.send.as_str().to_owned()),
            ("--replication", self.replication.as_str().to_owned()),
            ("--backups", self.backups.to_string()),
            (
                "--heartbeat-interval-ms",
                self.heartbeat_interval_ms.to_string(),
            ),
            ("--suspect-after-ms", self.suspect_after_ms.to_string()),
            ("--probe-timeout-ms", self.probe_timeout_ms.to_string()),
            (
                "--max-inactive-seconds",
                self.max_inactive_seconds.to_string(),
            ),
            ("--max-session-bytes", self.max_session_bytes.to_string()),
            ("--max-sessions", self.max_sessions.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v])
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        s: ClusterSettings,
    }

    fn parse(args: &[String]) -> ClusterSettings {
        Cli::try_parse_from(std::iter::once("sidecar".to_owned()).chain(args.iter().cloned()))
            .expect("the sidecar parses what the webhook renders")
            .s
    }

    #[test]
    fn every_spec_field_survives_the_round_trip_through_flags() {
        let spec: SessionClusterSpec = serde_json::from_value(serde_json::json!({
            "replication": {"send": "sync", "mode": "backup", "backups": 2},
            "failureDetection": {"heartbeatInterval": "150ms", "suspectAfter": "2s", "probeTimeout": "450ms"},
            "sessions": {"maxInactiveInterval": "45m", "maxSessionBytes": 65536, "maxSessions": 1234},
        }))
        .expect("spec");
        let s = ClusterSettings::from_spec(&spec).expect("valid");
        assert_eq!(
            s,
            ClusterSettings {
                send: SendMode::Sync,
                replication: ReplicationMode::Backup,
                backups: 2,
                heartbeat_interval_ms: 150,
                suspect_after_ms: 2000,
                probe_timeout_ms: 450,
                max_inactive_seconds: 2700,
                max_session_bytes: 65536,
                max_sessions: 1234,
            }
        );
        assert_eq!(parse(&s.to_args()), s);
        // The defaults agree at both ends.
        let empty: SessionClusterSpec = serde_json::from_str("{}").expect("spec");
        assert_eq!(
            ClusterSettings::from_spec(&empty).expect("valid"),
            ClusterSettings::default()
        );
        assert_eq!(parse(&[]), ClusterSettings::default());
    }

    #[test]
    fn invalid_settings_are_refused_at_both_ends_with_the_field() {
        let mut spec: SessionClusterSpec = serde_json::from_str("{}").expect("spec");
        spec.failure_detection.heartbeat_interval = "0ms".into();
        assert_eq!(
            ClusterSettings::from_spec(&spec).unwrap_err().field,
            "spec.failureDetection.suspectAfter"
        );
        let mut spec: SessionClusterSpec = serde_json::from_str("{}").expect("spec");
        spec.sessions.max_inactive_interval = "1500ms".into();
        assert_eq!(
            ClusterSettings::from_spec(&spec).unwrap_err().field,
            "spec.sessions.maxInactiveInterval"
        );
        let s = ClusterSettings {
            probe_timeout_ms: 0,
            ..ClusterSettings::default()
        };
        assert_eq!(
            parse(&s.to_args()).validate().unwrap_err().field,
            "spec.failureDetection.probeTimeout"
        );
        let mut spec: SessionClusterSpec = serde_json::from_str("{}").expect("spec");
        spec.replication.backups = 0;
        assert_eq!(
            ClusterSettings::from_spec(&spec).unwrap_err().field,
            "spec.replication.backups"
        );
        let s = ClusterSettings {
            backups: 9,
            ..ClusterSettings::default()
        };
        assert_eq!(
            parse(&s.to_args()).validate().unwrap_err().field,
            "spec.replication.backups"
        );
    }
}
