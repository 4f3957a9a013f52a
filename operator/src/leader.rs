//! Leader election on a `coordination.k8s.io/v1` Lease, so two operator
//! replicas can run and exactly one reconciles. A holder renews every
//! `duration / 3`; a lease not renewed for `duration` may be taken over.
//! Updates carry the resourceVersion, so two candidates never both win.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl Elector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    /// One attempt to take or keep the lease. `Ok(true)` means we hold it.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let secs = self.duration.as_secs().max(1) as i32;
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease: Lease = serde_json::from_value(json!({
                    "metadata": {"name": self.name},
                    "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": secs,
                             "acquireTime": MicroTime(now), "renewTime": MicroTime(now), "leaseTransitions": 0}
                }))
                .map_err(kube::Error::SerdeError)?;
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(lease) => {
                let spec = lease.spec.clone().unwrap_or_default();
                let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
                let expired = match spec.renew_time {
                    Some(MicroTime(t)) => {
                        let age = now.duration_since(t);
                        age.as_secs() >= i64::from(spec.lease_duration_seconds.unwrap_or(secs))
                    }
                    None => true,
                };
                if !mine && !expired {
                    return Ok(false);
                }
                let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
                let patch = json!({
                    "metadata": {"resourceVersion": lease.metadata.resource_version},
                    "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": secs, "renewTime": MicroTime(now),
                             "acquireTime": if mine { spec.acquire_time.unwrap_or(MicroTime(now)) } else { MicroTime(now) },
                             "leaseTransitions": transitions}
                });
                match self
                    .api
                    .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Waits until we hold the lease, then keeps renewing it; `lost` is
    /// cancelled if it is lost. Returns when leadership is acquired.
    pub async fn lead(self, stop: CancellationToken) -> Option<CancellationToken> {
        let retry = self.duration / 3;
        loop {
            match self.try_acquire().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election: cannot read the lease"),
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(retry) => {}
            }
        }
        info!(identity = %self.identity, lease = %self.name, "became the leader");
        let lost = CancellationToken::new();
        let lost2 = lost.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        self.release().await;
                        return;
                    }
                    _ = tokio::time::sleep(retry) => {}
                }
                match self.try_acquire().await {
                    Ok(true) => {}
                    Ok(false) => {
                        warn!("leadership lost");
                        lost2.cancel();
                        return;
                    }
                    Err(e) => warn!(error = %e, "leader election: renewal failed; retrying"),
                }
            }
        });
        Some(lost)
    }

    /// Gives the lease up at once so a standby can take over without waiting.
    async fn release(&self) {
        let patch = json!({"spec": {"holderIdentity": null, "renewTime": null}});
        if let Err(e) = self
            .api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            warn!(error = %e, "could not release the lease");
        }
    }
}
