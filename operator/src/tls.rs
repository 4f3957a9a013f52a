//! The webhook's TLS: a self-managed CA and serving certificate with a bounded
//! lifetime, kept in a Secret so every replica serves the same one, with the
//! CA bundle patched into the MutatingWebhookConfiguration, and rotated
//! before expiry without a failed admission:
//!
//! 1. when less than `renew_before` is left, one replica writes a new CA and
//!    certificate to the Secret (optimistic concurrency: one write wins), with
//!    a bundle of the new CA *and* the previous one;
//! 2. every replica patches that bundle into the webhook configuration, then
//!    serves the new certificate (hot-swapped, no restart); until it does, its
//!    old certificate is still trusted through the previous CA in the bundle;
//! 3. the previous CA leaves the bundle at the next rotation.

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tracing::{info, warn};

/// Annotation on the Secret: when the certificate expires (Unix seconds).
pub const NOT_AFTER_ANNOTATION: &str = "sessionmesh.io/not-after";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookTls {
    /// The CA bundle: the current CA first, then the previous one.
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// When the CA and the certificate expire (Unix seconds); 0 if unknown.
    pub not_after: u64,
}

/// How long certificates live and when they are replaced.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub lifetime: Duration,
    pub renew_before: Duration,
}

impl Default for Validity {
    fn default() -> Self {
        Validity {
            lifetime: Duration::from_secs(365 * 86_400),
            renew_before: Duration::from_secs(30 * 86_400),
        }
    }
}

impl Validity {
    /// With `Some((lifetime, renew_before))` in seconds, that instead (tests).
    pub fn scaled(self, test_seconds: Option<(u64, u64)>) -> Validity {
        match test_seconds {
            Some((l, r)) => Validity {
                lifetime: Duration::from_secs(l),
                renew_before: Duration::from_secs(r),
            },
            None => self,
        }
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn at(unix: u64) -> anyhow::Result<time::OffsetDateTime> {
    Ok(time::OffsetDateTime::from_unix_timestamp(i64::try_from(
        unix,
    )?)?)
}

/// The first PEM block of a bundle.
fn first_pem(bundle: &str) -> Option<String> {
    let end = "-----END CERTIFICATE-----";
    let i = bundle.find(end)?;
    Some(format!("{}\n", &bundle[..i + end.len()]))
}

/// A new CA and a serving certificate for `hosts` (DNS names or IPs), valid
/// from a few minutes before `now` for `validity.lifetime`. The bundle is
/// the new CA followed by `previous_ca` (the CA being replaced), if any.
pub fn generate(
    hosts: &[String],
    validity: Validity,
    now: u64,
    previous_ca: Option<&str>,
) -> anyhow::Result<WebhookTls> {
    let not_before = at(now.saturating_sub(300))?;
    let not_after_unix = now.saturating_add(validity.lifetime.as_secs());
    let not_after = at(not_after_unix)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("sessionmesh webhook CA {now}"));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(Vec::<String>::new())?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        hosts
            .first()
            .cloned()
            .unwrap_or_else(|| "sessionmesh-webhook".into()),
    );
    for h in hosts {
        leaf.subject_alt_names
            .push(match h.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(h.clone().try_into()?),
            });
    }
    leaf.not_before = not_before;
    leaf.not_after = not_after;
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &issuer)?;
    let mut ca_pem = ca_cert.pem();
    if let Some(prev) = previous_ca.and_then(first_pem) {
        ca_pem.push_str(&prev);
    }
    Ok(WebhookTls {
        ca_pem,
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after: not_after_unix,
    })
}

fn from_secret(s: &Secret) -> Option<WebhookTls> {
    let d = s.data.as_ref()?;
    let get = |k: &str| d.get(k).and_then(|b| String::from_utf8(b.0.clone()).ok());
    Some(WebhookTls {
        ca_pem: get("ca.crt")?,
        cert_pem: get("tls.crt")?,
        key_pem: get("tls.key")?,
        // A Secret written before certificates had a bounded lifetime has no
        // expiry: it is replaced at once.
        not_after: s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(NOT_AFTER_ANNOTATION))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    })
}

fn to_secret(name: &str, tls: &WebhookTls, resource_version: Option<String>) -> Secret {
    let mut data = BTreeMap::new();
    for (k, v) in [
        ("ca.crt", &tls.ca_pem),
        ("tls.crt", &tls.cert_pem),
        ("tls.key", &tls.key_pem),
    ] {
        data.insert(k.to_owned(), k8s_openapi::ByteString(v.as_bytes().to_vec()));
    }
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            resource_version,
            annotations: Some(
                [(NOT_AFTER_ANNOTATION.to_owned(), tls.not_after.to_string())].into(),
            ),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("kubernetes.io/tls".into()),
        ..Default::default()
    }
}

/// The shared certificate, valid for at least `renew_before` more: read from
/// the Secret, created there, or rotated there (the first replica to write
/// wins; the others read what it wrote).
pub async fn load_or_create(
    client: &Client,
    ns: &str,
    name: &str,
    hosts: &[String],
    validity: Validity,
) -> anyhow::Result<WebhookTls> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    for _ in 0..5 {
        let cur = api.get_opt(name).await?;
        let now = unix_now();
        let fresh = |t: &WebhookTls| t.not_after > now + validity.renew_before.as_secs();
        let result = match cur.as_ref().map(|s| (s, from_secret(s))) {
            Some((_, Some(tls))) if fresh(&tls) => return Ok(tls),
            Some((s, old)) => {
                let tls = generate(
                    hosts,
                    validity,
                    now,
                    old.as_ref().map(|t| t.ca_pem.as_str()),
                )?;
                let rv = s.metadata.resource_version.clone();
                api.replace(name, &PostParams::default(), &to_secret(name, &tls, rv))
                    .await
                    .map(|_| tls)
            }
            None => {
                let tls = generate(hosts, validity, now, None)?;
                api.create(&PostParams::default(), &to_secret(name, &tls, None))
                    .await
                    .map(|_| tls)
            }
        };
        match result {
            Ok(tls) => {
                info!(secret = %name, not_after = tls.not_after, "wrote a new webhook certificate");
                return Ok(tls);
            }
            // Another replica wrote first: read what it wrote.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("webhook Secret {name} keeps changing")
}

/// The serving certificate, swapped in place when it is rotated.
#[derive(Debug)]
pub struct CertSlot(RwLock<(WebhookTls, Arc<CertifiedKey>)>);

fn certified(tls: &WebhookTls) -> anyhow::Result<Arc<CertifiedKey>> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes())?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)?;
    Ok(Arc::new(CertifiedKey::new(certs, signer)))
}

impl CertSlot {
    pub fn new(tls: WebhookTls) -> anyhow::Result<Arc<CertSlot>> {
        let k = certified(&tls)?;
        Ok(Arc::new(CertSlot(RwLock::new((tls, k)))))
    }

    pub fn current(&self) -> Option<WebhookTls> {
        self.0.read().ok().map(|g| g.0.clone())
    }

    /// Serves `tls` from the next handshake on.
    pub fn swap(&self, tls: WebhookTls) -> anyhow::Result<()> {
        let k = certified(&tls)?;
        if let Ok(mut g) = self.0.write() {
            *g = (tls, k);
        }
        Ok(())
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|g| g.1.clone())
    }
}

/// The webhook's TLS configuration. With `client_ca` (PEM), only clients
/// with a certificate from that CA are served: the API server, configured
/// to present one (docs/install.md), and nobody who merely reaches the port.
pub fn server_config(
    slot: Arc<CertSlot>,
    client_ca: Option<&str>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(c?)?;
            }
            anyhow::ensure!(!roots.is_empty(), "no certificate in the client CA file");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    Ok(Arc::new(builder.with_cert_resolver(slot)))
}

/// Sets every webhook's `clientConfig.caBundle` in the configuration to our
/// CA bundle. Returns false when the configuration does not exist (yet).
pub async fn patch_ca_bundle(client: &Client, config: &str, ca_pem: &str) -> anyhow::Result<bool> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(cur) = api.get_opt(config).await? else {
        return Ok(false);
    };
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let mut ops = Vec::new();
    for (i, w) in cur.webhooks.unwrap_or_default().iter().enumerate() {
        let have = w
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| base64::engine::general_purpose::STANDARD.encode(&b.0));
        if have.as_deref() != Some(bundle.as_str()) {
            ops.push(json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": bundle}));
        }
    }
    if !ops.is_empty() {
        let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))?;
        api.patch(config, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await?;
        info!(config = %config, "patched the webhook CA bundle");
    }
    Ok(true)
}

/// Where the certificate lives and how it is kept.
#[derive(Clone)]
pub struct Keeper {
    pub client: Client,
    pub namespace: String,
    pub secret: String,
    pub hosts: Vec<String>,
    pub config: String,
    pub validity: Validity,
    /// How often the Secret and the webhook configuration are checked.
    pub every: Duration,
}

impl Keeper {
    /// One round: rotate if due (or take what another replica rotated), put
    /// the bundle in the webhook configuration, then serve the certificate.
    /// Returns whether the configuration exists.
    pub async fn round(&self, slot: &CertSlot) -> anyhow::Result<bool> {
        let tls = load_or_create(
            &self.client,
            &self.namespace,
            &self.secret,
            &self.hosts,
            self.validity,
        )
        .await?;
        let configured = patch_ca_bundle(&self.client, &self.config, &tls.ca_pem).await?;
        if slot.current().as_ref() != Some(&tls) {
            slot.swap(tls)?;
            info!("serving the rotated webhook certificate");
        }
        Ok(configured)
    }

    /// Keeps the bundle patched (a chart upgrade may reset it) and the
    /// certificate fresh, until `stop`.
    pub async fn run(self, slot: Arc<CertSlot>, stop: tokio_util::sync::CancellationToken) {
        loop {
            let delay = match self.round(&slot).await {
                Ok(true) => self.every,
                Ok(false) => self.every.min(Duration::from_secs(1)),
                Err(e) => {
                    warn!(error = %e, config = %self.config, "cannot keep the webhook certificate");
                    self.every.min(Duration::from_secs(5))
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_load_into_rustls_and_expire_when_told() {
        let v = Validity::default();
        let tls = generate(
            &[
                "sessionmesh-webhook.sessionmesh.svc".into(),
                "127.0.0.1".into(),
            ],
            v,
            1_700_000_000,
            None,
        )
        .unwrap();
        assert!(tls.ca_pem.contains("BEGIN CERTIFICATE"));
        assert_eq!(tls.not_after, 1_700_000_000 + 365 * 86_400);
        let slot = CertSlot::new(tls.clone()).unwrap();
        assert!(server_config(slot.clone(), None).is_ok());
        assert!(server_config(slot.clone(), Some(&tls.ca_pem)).is_ok());
        assert!(server_config(slot.clone(), Some("not a certificate")).is_err());
        // A rotation keeps the previous CA in the bundle, and only that one.
        let next = generate(&["127.0.0.1".into()], v, 1_700_000_100, Some(&tls.ca_pem)).unwrap();
        assert_eq!(next.ca_pem.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(next.ca_pem.ends_with(&first_pem(&tls.ca_pem).unwrap()));
        let third = generate(&["127.0.0.1".into()], v, 1_700_000_200, Some(&next.ca_pem)).unwrap();
        assert_eq!(third.ca_pem.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(!third
            .ca_pem
            .contains(first_pem(&tls.ca_pem).unwrap().as_str()));
        slot.swap(next.clone()).unwrap();
        assert_eq!(slot.current(), Some(next));
    }
}
