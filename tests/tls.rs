//! TLS and mTLS on both listeners, with certificates made in the test.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio_rustls::rustls;

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["client".to_owned()])
        .unwrap()
        .signed_by(&client_key, &ca)
        .unwrap();
    Pki {
        ca: ca.pem(),
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

fn start(dir: &Path, pki: &Pki, mtls: bool) -> common::Daemon {
    std::fs::write(dir.join("server.pem"), &pki.server_cert).unwrap();
    std::fs::write(dir.join("server-key.pem"), &pki.server_key).unwrap();
    std::fs::write(dir.join("ca.pem"), &pki.ca).unwrap();
    let mut toml = "[tls]\ncert = \"server.pem\"\nkey = \"server-key.pem\"\n".to_owned();
    if mtls {
        toml.push_str("client_ca = \"ca.pem\"\n");
    }
    std::fs::write(dir.join("evdb.toml"), toml).unwrap();
    common::Daemon::start_in(
        &dir.join("data"),
        &["--config", dir.join("evdb.toml").to_str().unwrap()],
    )
}

/// GET /health over HTTPS; Err when the handshake or request fails.
async fn https_health(addr: &str, pki: &Pki, client_cert: bool) -> Result<u16, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = if client_cert {
        builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(pki.client_cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(pki.client_key.as_bytes()).unwrap(),
            )
            .unwrap()
    } else {
        builder.with_no_client_auth()
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri("/health")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

async fn grpc_health(addr: &str, pki: &Pki, client_cert: bool) -> Result<(), String> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    if client_cert {
        tls = tls.identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[tokio::test]
async fn tls_on_both_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let d = start(dir.path(), &pki, false);
    assert_eq!(https_health(&d.http, &pki, false).await, Ok(200));
    grpc_health(&d.grpc, &pki, false).await.unwrap();
    // Plain HTTP gets no answer.
    let plain = reqwest::Client::new().get(d.url("/health")).send().await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
}

#[tokio::test]
async fn mtls_requires_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let d = start(dir.path(), &pki, true);
    assert_eq!(https_health(&d.http, &pki, true).await, Ok(200));
    assert!(https_health(&d.http, &pki, false).await.is_err());
    grpc_health(&d.grpc, &pki, true).await.unwrap();
    assert!(grpc_health(&d.grpc, &pki, false).await.is_err());
}

fn hangup(d: &common::Daemon) {
    let pid = d.child.as_ref().unwrap().id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn sighup_reloads_the_certificates_of_both_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let old = pki();
    let d = start(dir.path(), &old, false);
    assert_eq!(https_health(&d.http, &old, false).await, Ok(200));
    // A connection opened before the reload keeps working after it.
    let channel = {
        use tonic::transport::{Certificate, Channel, ClientTlsConfig};
        Channel::from_shared(format!("https://{}", d.grpc))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&old.ca))
                    .domain_name("localhost"),
            )
            .unwrap()
            .connect()
            .await
            .unwrap()
    };
    let new = pki();
    std::fs::write(dir.path().join("server.pem"), &new.server_cert).unwrap();
    std::fs::write(dir.path().join("server-key.pem"), &new.server_key).unwrap();
    hangup(&d);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while https_health(&d.http, &new, false).await != Ok(200) {
        assert!(std::time::Instant::now() < deadline, "never reloaded");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(https_health(&d.http, &old, false).await.is_err());
    grpc_health(&d.grpc, &new, false).await.unwrap();
    assert!(grpc_health(&d.grpc, &old, false).await.is_err());
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    // A broken file: the reload fails and the certificates in use stay.
    std::fs::write(dir.path().join("server.pem"), "not a certificate").unwrap();
    hangup(&d);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(https_health(&d.http, &new, false).await, Ok(200));
    grpc_health(&d.grpc, &new, false).await.unwrap();
}

#[tokio::test]
async fn sighup_without_tls_does_not_stop_the_daemon() {
    let d = common::Daemon::start();
    hangup(&d);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let r = reqwest::get(d.url("/health")).await.unwrap();
    assert_eq!(r.status(), 200);
}
