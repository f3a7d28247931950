//! Certificates made at test time: a CA, a server certificate for localhost, client
//! certificates from that CA and from an unrelated one, written as PEM files.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Client "sensor-1" (SAN sensor-1.devices.example), signed by `ca`.
    pub client: (PathBuf, PathBuf),
    /// Client "intruder", signed by another CA.
    pub foreign_client: (PathBuf, PathBuf),
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    common_name: &str,
    alt_names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let names: Vec<String> = alt_names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let authority = ca("telemq test CA");
        let other = ca("someone else's CA");
        let (server_cert, server_key) = leaf(
            &authority,
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(
            &authority,
            "sensor-1",
            &["sensor-1.devices.example"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let (foreign_cert, foreign_key) =
            leaf(&other, "intruder", &[], ExtendedKeyUsagePurpose::ClientAuth);
        Self {
            ca: write("ca.pem", &authority.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client: (
                write("client.pem", &client_cert),
                write("client.key", &client_key),
            ),
            foreign_client: (
                write("intruder.pem", &foreign_cert),
                write("intruder.key", &foreign_key),
            ),
            dir,
        }
    }

    /// Points the broker's TLS settings at these files.
    pub fn configure(&self, config: &mut telemq::Config) {
        config.tls.enabled = true;
        config.tls.cert_file = Some(self.server_cert.clone());
        config.tls.key_file = Some(self.server_key.clone());
        config.tls.client_ca_file = Some(self.ca.clone());
    }

    /// A client configuration trusting the test CA, presenting `identity` if given.
    pub fn client_config(&self, identity: Option<&(PathBuf, PathBuf)>) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
        let config = match identity {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = PrivateKeyDer::from_pem_file(key).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }

    /// Connects over TLS to `addr` as "localhost".
    pub async fn connect(
        &self,
        addr: std::net::SocketAddr,
        identity: Option<&(PathBuf, PathBuf)>,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        TlsConnector::from(self.client_config(identity))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
    }
}
