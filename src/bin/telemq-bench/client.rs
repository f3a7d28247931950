//! One MQTT client connection: the stream (plain TCP or TLS), read buffer, and the bounded
//! handshake steps.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, BytesMut};
use futures_util::FutureExt;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::codec::{self, Packet};

/// Read buffer size: large so one read returns many packets.
pub const READ_BUF: usize = 256 * 1024;

/// The connection's byte stream. An enum rather than a boxed trait object so the plain-TCP
/// scenarios keep direct `TcpStream` calls (and `try_read_buf`) behind one predictable branch.
pub enum Stream {
    Plain(TcpStream),
    /// Boxed: a rustls connection is a few kilobytes, and clients are moved between tasks.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// Reads what is available without waiting; `WouldBlock` when nothing is.
    pub fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.try_read_buf(buf),
            // tokio-rustls has no try_read: poll a read once with a waker that does nothing.
            // The socket's readiness is registered again with the task's real waker at the
            // next awaited read, so no wake-up is lost.
            Stream::Tls(s) => s
                .read_buf(buf)
                .now_or_never()
                .unwrap_or_else(|| Err(io::ErrorKind::WouldBlock.into())),
        }
    }

    /// Writes all of `data` and, over TLS, flushes: tokio-rustls may keep encrypted bytes it
    /// could not write yet, and a publisher that then waits for PUBACKs would wait forever.
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(data).await,
            Stream::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
        }
    }

    /// The negotiated TLS parameters (version, cipher suite, key exchange), if TLS.
    pub fn tls_description(&self) -> Option<String> {
        let Stream::Tls(s) = self else { return None };
        let (_, conn) = s.get_ref();
        Some(format!(
            "{:?} {:?} {:?}",
            conn.protocol_version()?,
            conn.negotiated_cipher_suite()?.suite(),
            conn.negotiated_key_exchange_group()?.name()
        ))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// Verifies the broker's certificate chain with webpki the first time it is presented, and after
/// that only checks that the same chain comes for the same name. The generator has one core, as
/// the broker does, and a full chain verification (parsing plus an ECDSA verification) on every
/// handshake would make it, not the broker, the limit of the handshake rate. The handshake's own
/// signature (CertificateVerify, the proof that the broker holds the key) is still verified
/// every time, so each connection stays authenticated.
#[derive(Debug)]
struct CachedChainVerifier {
    inner: Arc<WebPkiServerVerifier>,
    /// The last chain (end entity first) and name that verified.
    verified: Mutex<Option<(Vec<Vec<u8>>, ServerName<'static>)>>,
}

impl CachedChainVerifier {
    fn chain(
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Vec<Vec<u8>> {
        std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.as_ref().to_vec())
            .collect()
    }
}

impl ServerCertVerifier for CachedChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = Self::chain(end_entity, intermediates);
        {
            let verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((c, name)) = verified.as_ref() {
                if *c == chain && name == server_name {
                    return Ok(ServerCertVerified::assertion());
                }
            }
        }
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        *self.verified.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((chain, server_name.to_owned()));
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What every TLS connection of a run shares.
#[derive(Clone)]
pub struct Tls {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

impl Tls {
    /// TLS 1.3 only, `ring`, trusting the CA certificates in `ca_file`, and with session
    /// resumption disabled so every connection pays a full handshake (what a fleet of devices
    /// reconnecting after a broker restart costs).
    pub fn new(ca_file: &Path, server_name: &str) -> anyhow::Result<Self> {
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca_file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("cannot read {}", ca_file.display()))?;
        if certs.is_empty() {
            bail!("{} holds no certificate", ca_file.display());
        }
        for cert in certs {
            roots.add(cert)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = CachedChainVerifier {
            inner: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()?,
            verified: Mutex::new(None),
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        config.resumption = rustls::client::Resumption::disabled();
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| anyhow!("--tls-server-name {server_name:?}: {e}"))?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}

pub struct Client {
    pub stream: Stream,
    pub rbuf: BytesMut,
    pub id: String,
}

pub struct ConnectOptions<'a> {
    pub addr: SocketAddr,
    pub client_id: &'a str,
    pub clean_session: bool,
    pub keep_alive: u16,
    pub timeout: Duration,
    /// TLS over the TCP connection, or plain MQTT.
    pub tls: Option<&'a Tls>,
}

impl Client {
    /// TCP connect (+ TLS handshake) + CONNECT + CONNACK, all under `opts.timeout`. Returns the
    /// client and the CONNACK's session-present flag. Bytes the broker sends after CONNACK stay
    /// in `rbuf`.
    pub async fn connect(opts: &ConnectOptions<'_>) -> anyhow::Result<(Self, bool)> {
        let work = async {
            let tcp = TcpStream::connect(opts.addr)
                .await
                .with_context(|| format!("cannot connect to {}", opts.addr))?;
            tcp.set_nodelay(true)?;
            let stream = match opts.tls {
                None => Stream::Plain(tcp),
                Some(tls) => Stream::Tls(Box::new(
                    tls.connector
                        .connect(tls.server_name.clone(), tcp)
                        .await
                        .context("TLS handshake")?,
                )),
            };
            let mut client = Client {
                stream,
                rbuf: BytesMut::with_capacity(4096),
                id: opts.client_id.to_string(),
            };
            let mut out = BytesMut::new();
            codec::encode_connect(
                &mut out,
                opts.client_id,
                opts.clean_session,
                opts.keep_alive,
            );
            client.stream.send(&out).await?;
            loop {
                if let Some((packet, used)) = codec::decode(&client.rbuf)? {
                    let Packet::Connack {
                        session_present,
                        code,
                    } = packet
                    else {
                        bail!("expected CONNACK, got {packet:?}");
                    };
                    client.rbuf.advance(used);
                    if code != 0 {
                        bail!("CONNACK refused the connection (return code {code})");
                    }
                    return Ok((client, session_present));
                }
                if client.stream.read_buf(&mut client.rbuf).await? == 0 {
                    bail!("connection closed before CONNACK");
                }
            }
        };
        match timeout(opts.timeout, work).await {
            Ok(result) => result.with_context(|| format!("client {}", opts.client_id)),
            Err(_) => bail!(
                "client {}: no CONNACK within {:?}",
                opts.client_id,
                opts.timeout
            ),
        }
    }

    /// SUBSCRIBE and wait for the SUBACK; returns its return codes. Any PUBLISH arriving first
    /// is an error (the generator subscribes before anyone publishes).
    pub async fn subscribe(
        &mut self,
        pkid: u16,
        filters: &[(&str, u8)],
        limit: Duration,
    ) -> anyhow::Result<Vec<u8>> {
        let mut out = BytesMut::new();
        codec::encode_subscribe(&mut out, pkid, filters);
        let work = async {
            self.stream.send(&out).await?;
            loop {
                if let Some((packet, used)) = codec::decode(&self.rbuf)? {
                    let result = match packet {
                        Packet::Suback { pkid: id, codes } if id == pkid => {
                            Some(Ok(codes.to_vec()))
                        }
                        Packet::Pingresp => None,
                        other => Some(Err(anyhow::anyhow!(
                            "expected SUBACK {pkid}, got {other:?}"
                        ))),
                    };
                    self.rbuf.advance(used);
                    match result {
                        Some(r) => return r,
                        None => continue,
                    }
                }
                if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                    bail!("connection closed before SUBACK");
                }
            }
        };
        match timeout(limit, work).await {
            Ok(result) => result.with_context(|| format!("client {}", self.id)),
            Err(_) => bail!("client {}: no SUBACK within {limit:?}", self.id),
        }
    }

    /// PINGREQ and wait for PINGRESP (`Ok(false)` on timeout or a closed connection).
    pub async fn ping(&mut self, limit: Duration) -> bool {
        let mut out = BytesMut::new();
        codec::encode_pingreq(&mut out);
        let work = async {
            self.stream.send(&out).await?;
            loop {
                while let Some((packet, used)) = codec::decode(&self.rbuf)? {
                    let pong = packet == Packet::Pingresp;
                    self.rbuf.advance(used);
                    if pong {
                        return Ok::<bool, anyhow::Error>(true);
                    }
                }
                if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                    return Ok(false);
                }
            }
        };
        matches!(timeout(limit, work).await, Ok(Ok(true)))
    }

    /// DISCONNECT and close, bounded; errors are ignored (the broker may be gone already).
    pub async fn disconnect(mut self, limit: Duration) {
        let mut out = BytesMut::new();
        codec::encode_disconnect(&mut out);
        let _ = timeout(limit, async {
            self.stream.send(&out).await?;
            self.stream.shutdown().await
        })
        .await;
    }

    /// Reads what arrives within `wait` into `rbuf`: `Ok(false)` when nothing came in time, an
    /// error when the broker closed the connection.
    pub async fn read_within(&mut self, wait: Duration) -> anyhow::Result<bool> {
        self.reserve_read();
        match timeout(wait, self.stream.read_buf(&mut self.rbuf)).await {
            Err(_) => Ok(false),
            Ok(Ok(0)) => bail!("connection closed by the broker"),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) => Err(e.into()),
        }
    }

    /// Makes room for a large read.
    pub fn reserve_read(&mut self) {
        if self.rbuf.capacity() - self.rbuf.len() < READ_BUF / 4 {
            self.rbuf.reserve(READ_BUF);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> CachedChainVerifier {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter("certs/ca.pem").unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        CachedChainVerifier {
            inner: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap(),
            verified: Mutex::new(None),
        }
    }

    fn cert(path: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).unwrap()
    }

    fn name(n: &str) -> ServerName<'static> {
        ServerName::try_from(n.to_string()).unwrap()
    }

    #[test]
    fn cached_verifier_still_rejects_another_name_or_certificate() {
        let v = verifier();
        let server = cert("certs/server.pem");
        let now = UnixTime::now();
        assert!(v
            .verify_server_cert(&server, &[], &name("localhost"), &[], now)
            .is_ok());
        // Cached for localhost: a second handshake passes, another name still fails.
        assert!(v
            .verify_server_cert(&server, &[], &name("localhost"), &[], now)
            .is_ok());
        assert!(v
            .verify_server_cert(&server, &[], &name("example.com"), &[], now)
            .is_err());
        // A certificate that does not verify (a client certificate, not for serverAuth and
        // not for localhost) is not let through by the cache.
        let client = cert("certs/client.pem");
        assert!(v
            .verify_server_cert(&client, &[], &name("localhost"), &[], now)
            .is_err());
        assert!(v
            .verify_server_cert(&server, &[], &name("localhost"), &[], now)
            .is_ok());
    }

    #[test]
    fn tls_settings_need_a_readable_ca() {
        assert!(Tls::new(Path::new("certs/ca.pem"), "localhost").is_ok());
        assert!(Tls::new(Path::new("certs/no-such-file.pem"), "localhost").is_err());
        assert!(Tls::new(Path::new("certs/ca.pem"), "not a name!").is_err());
    }
}
