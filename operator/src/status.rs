//! A SessionCluster's status: conditions, the invalid-spec and forbidden
//! cases, events, and writing it (server-side apply).

use crate::assign::{AssignError, Assignment};
use crate::reconcile::{backoff_key, now_rfc3339, Ctx, Error, MANAGER};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use sessionmesh_api::{Condition, MemberStatus, SessionCluster, SessionClusterStatus};
use std::time::Duration;
use tracing::warn;

pub(crate) fn condition(
    prev: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: i64,
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_owned();
    let last = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(now_rfc3339);
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: last,
    }
}

pub(crate) async fn event(
    ctx: &Ctx,
    sc: &SessionCluster,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &sc.object_ref(&())).await {
        warn!(error = %e, "could not record an event");
    }
}

pub(crate) async fn write_status(
    api: &Api<SessionCluster>,
    name: &str,
    status: &SessionClusterStatus,
) -> Result<(), Error> {
    // Server-side apply: the operator owns the status fields it sets, and
    // a field it no longer sets is removed.
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(json!({
            "apiVersion": "sessionmesh.io/v1alpha1",
            "kind": "SessionCluster",
            "status": status,
        })),
    )
    .await?;
    Ok(())
}

/// The operator lacks a right in the cluster's namespace (its writes are
/// granted per namespace): say so in the status, where `kubectl get smc`
/// shows it, rather than only in the operator's log.
pub(crate) async fn report_forbidden(ctx: &Ctx, sc: &SessionCluster, message: &str) {
    let Some(ns) = sc.namespace() else { return };
    let generation = sc.metadata.generation.unwrap_or(0);
    let prev = sc.status.clone().unwrap_or_default();
    let msg = format!(
        "the operator may not act in namespace {ns} (add it to the chart's operator.memberNamespaces): {message}"
    );
    let mut status = prev.clone();
    status.conditions = blocked(&prev.conditions, "Forbidden", &msg, &msg, generation);
    if Some(&status) != sc.status.as_ref() {
        event(ctx, sc, EventType::Warning, "Forbidden", msg).await;
        let api: Api<SessionCluster> = Api::namespaced(ctx.client.clone(), &ns);
        if let Err(e) = write_status(&api, &sc.name_any(), &status).await {
            warn!(error = %e, "cannot write the Forbidden condition");
        }
    }
}

/// The conditions of a cluster the operator cannot act on: not ready, not
/// progressing, degraded, all for `reason`.
fn blocked(
    prev: &[Condition],
    reason: &str,
    message: &str,
    progressing: &str,
    generation: i64,
) -> Vec<Condition> {
    [
        ("Ready", false, message),
        ("Progressing", false, progressing),
        ("Degraded", true, message),
    ]
    .into_iter()
    .map(|(t, ok, m)| condition(prev, t, ok, reason, m.to_owned(), generation))
    .collect()
}

/// An invalid spec: the status says why (Ready false, Degraded true), one
/// event per new generation, and nothing else is touched.
pub(crate) async fn reject_invalid(
    ctx: &Ctx,
    sc: &SessionCluster,
    sc_api: &Api<SessionCluster>,
    prev: &SessionClusterStatus,
    e: String,
) -> Result<Action, Error> {
    let name = sc.name_any();
    let generation = sc.metadata.generation.unwrap_or(0);
    let status = SessionClusterStatus {
        observed_generation: generation,
        conditions: blocked(
            &prev.conditions,
            "InvalidSpec",
            &e,
            "waiting for a valid spec",
            generation,
        ),
        ..prev.clone()
    };
    if prev.observed_generation != generation
        || !prev.conditions.iter().any(|c| c.reason == "InvalidSpec")
    {
        event(ctx, sc, EventType::Warning, "InvalidSpec", e.clone()).await;
    }
    write_status(sc_api, &name, &status).await?;
    ctx.failures
        .lock()
        .map(|mut f| f.remove(&backoff_key(sc)))
        .ok();
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// The status for a valid spec: members, counts and the three conditions.
pub(crate) fn cluster_status(
    prev: &SessionClusterStatus,
    generation: i64,
    statuses: Vec<MemberStatus>,
    assignments: &[Assignment],
    assign_err: Option<&AssignError>,
) -> SessionClusterStatus {
    let count = statuses.len() as u32;
    let ready = statuses.iter().filter(|m| m.ready).count() as u32;
    let all_ready = count > 0 && ready == count;
    let changed = assignments.iter().any(|a| a.changed);
    SessionClusterStatus {
        observed_generation: generation,
        members: statuses,
        member_count: count,
        ready_members: ready,
        conditions: vec![
            condition(
                &prev.conditions,
                "Ready",
                all_ready,
                if count == 0 {
                    "NoMembers"
                } else if all_ready {
                    "AllMembersReady"
                } else {
                    "MembersNotReady"
                },
                format!("{ready} of {count} members ready"),
                generation,
            ),
            condition(
                &prev.conditions,
                "Progressing",
                changed || !all_ready,
                if changed {
                    "Assigning"
                } else if all_ready {
                    "Stable"
                } else {
                    "WaitingForMembers"
                },
                format!(
                    "{} assignments written",
                    assignments.iter().filter(|a| a.changed).count()
                ),
                generation,
            ),
            match assign_err {
                Some(e @ AssignError::PortsExhausted { .. }) => condition(
                    &prev.conditions,
                    "Degraded",
                    true,
                    "PortsExhausted",
                    e.to_string(),
                    generation,
                ),
                None => condition(
                    &prev.conditions,
                    "Degraded",
                    false,
                    "AsExpected",
                    "spec valid, every member assigned".into(),
                    generation,
                ),
            },
        ],
    }
}
