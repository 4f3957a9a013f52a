//! The webhook's TLS: a self-managed CA and serving certificate, kept in a
//! Secret so every replica serves the same one, with the CA bundle patched into
//! the MutatingWebhookConfiguration. (With cert-manager, mount its Secret and
//! pass `--webhook-cert-dir` instead.)

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
use std::sync::Arc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A new CA and a serving certificate for `hosts` (DNS names or IPs), valid ten years.
pub fn generate(hosts: &[String]) -> anyhow::Result<WebhookTls> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "sessionmesh webhook CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
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
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok(WebhookTls {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn from_secret(s: &Secret) -> Option<WebhookTls> {
    let d = s.data.as_ref()?;
    let get = |k: &str| d.get(k).and_then(|b| String::from_utf8(b.0.clone()).ok());
    Some(WebhookTls {
        ca_pem: get("ca.crt")?,
        cert_pem: get("tls.crt")?,
        key_pem: get("tls.key")?,
    })
}

/// The shared certificate: read from the Secret, or created there (the first
/// replica to create it wins; the others read it).
pub async fn load_or_create(
    client: &Client,
    ns: &str,
    name: &str,
    hosts: &[String],
) -> anyhow::Result<WebhookTls> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    if let Some(tls) = api.get_opt(name).await?.as_ref().and_then(from_secret) {
        return Ok(tls);
    }
    let tls = generate(hosts)?;
    let mut data = BTreeMap::new();
    for (k, v) in [
        ("ca.crt", &tls.ca_pem),
        ("tls.crt", &tls.cert_pem),
        ("tls.key", &tls.key_pem),
    ] {
        data.insert(k.to_owned(), k8s_openapi::ByteString(v.as_bytes().to_vec()));
    }
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("kubernetes.io/tls".into()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(secret = %name, "created the webhook certificate");
            Ok(tls)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => api
            .get(name)
            .await
            .ok()
            .as_ref()
            .and_then(from_secret)
            .ok_or_else(|| anyhow::anyhow!("webhook Secret {name} is unusable")),
        Err(e) => Err(e.into()),
    }
}

pub fn server_config(tls: &WebhookTls) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes())?;
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    Ok(Arc::new(cfg))
}

/// Sets every webhook's `clientConfig.caBundle` in the configuration to our
/// CA. Returns false when the configuration does not exist (yet).
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

/// Keeps the CA bundle patched (a chart upgrade may reset it).
pub async fn keep_ca_bundle(
    client: Client,
    config: String,
    ca_pem: String,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut delay = std::time::Duration::from_millis(500);
    loop {
        match patch_ca_bundle(&client, &config, &ca_pem).await {
            Ok(true) => delay = std::time::Duration::from_secs(30),
            Ok(false) => delay = std::time::Duration::from_secs(1),
            Err(e) => warn!(error = %e, config = %config, "cannot patch the webhook CA bundle"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_load_into_rustls() {
        let tls = generate(&[
            "sessionmesh-webhook.sessionmesh.svc".into(),
            "127.0.0.1".into(),
        ])
        .unwrap();
        assert!(tls.ca_pem.contains("BEGIN CERTIFICATE"));
        assert!(server_config(&tls).is_ok());
    }
}
