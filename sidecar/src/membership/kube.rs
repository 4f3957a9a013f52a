//! Membership from the operator: the sidecar gets and watches one ConfigMap
//! (`<cluster>-members`, key `members.yaml`) through the API server. RBAC needs
//! only `get`, `list` and `watch` on that object (by resourceName). A document
//! that does not parse keeps the last good membership, as with a file.

use crate::membership::MemberFile;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use sessionmesh_api::{MembershipDoc, MEMBERS_KEY};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

fn parse(cm: &ConfigMap, source: &str) -> Result<MemberFile, String> {
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(MEMBERS_KEY))
        .ok_or_else(|| format!("{source}: no key {MEMBERS_KEY}"))?;
    let doc: MembershipDoc = serde_yaml::from_str(text).map_err(|e| format!("{source}: {e}"))?;
    MemberFile::from_doc(&doc, source).map_err(|e| e.to_string())
}

/// Waits until the document lists `member` (the operator publishes a pod once
/// it has an IP), and returns it.
pub async fn wait_for_member(
    client: &Client,
    namespace: &str,
    name: &str,
    member: &str,
    within: Duration,
) -> anyhow::Result<MemberFile> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let source = format!("configmap {namespace}/{name}");
    let t = Instant::now();
    let mut last_log = Instant::now();
    loop {
        match api.get_opt(name).await {
            Ok(Some(cm)) => match parse(&cm, &source) {
                Ok(mf) if mf.get(member).is_some() => return Ok(mf),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "membership document not usable yet"),
            },
            Ok(None) => {}
            Err(e) => warn!(error = %e, "cannot read the membership document"),
        }
        anyhow::ensure!(
            t.elapsed() < within,
            "{member} did not appear in {source} within {within:?}: is the operator running?"
        );
        if last_log.elapsed() > Duration::from_secs(5) {
            info!(%source, %member, "waiting for the operator to publish this member");
            last_log = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Watches the document and calls `on_change` with each new, valid membership
/// until cancelled (or until `on_change` returns false).
pub async fn watch<F, Fut>(
    client: Client,
    namespace: &str,
    name: &str,
    on_change: F,
    cancel: CancellationToken,
) where
    F: Fn(MemberFile) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let source = format!("configmap {namespace}/{name}");
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut current: Option<MemberFile> = None;
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return,
            ev = stream.next() => ev,
        };
        let cm = match ev {
            None => return,
            Some(Ok(Event::Apply(cm) | Event::InitApply(cm))) => cm,
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                warn!(error = %e, %source, "membership watch failed; retrying with backoff, keeping the last good membership");
                continue;
            }
        };
        match parse(&cm, &source) {
            Ok(mf) => {
                if current.as_ref() != Some(&mf) {
                    current = Some(mf.clone());
                    if !on_change(mf).await {
                        return;
                    }
                }
            }
            Err(e) => {
                error!(error = %e, "invalid membership document; keeping the last good membership")
            }
        }
    }
}
