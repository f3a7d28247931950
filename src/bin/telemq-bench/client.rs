//! One MQTT client connection: TCP stream, read buffer, and the bounded handshake steps.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::codec::{self, Packet};

/// Read buffer size: large so one read returns many packets.
pub const READ_BUF: usize = 256 * 1024;

pub struct Client {
    pub stream: TcpStream,
    pub rbuf: BytesMut,
    pub id: String,
}

pub struct ConnectOptions<'a> {
    pub addr: SocketAddr,
    pub client_id: &'a str,
    pub clean_session: bool,
    pub keep_alive: u16,
    pub timeout: Duration,
}

impl Client {
    /// TCP connect + CONNECT + CONNACK, all under `opts.timeout`. Returns the client and the
    /// CONNACK's session-present flag. Bytes the broker sends after CONNACK stay in `rbuf`.
    pub async fn connect(opts: &ConnectOptions<'_>) -> anyhow::Result<(Self, bool)> {
        let work = async {
            let stream = TcpStream::connect(opts.addr)
                .await
                .with_context(|| format!("cannot connect to {}", opts.addr))?;
            stream.set_nodelay(true)?;
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
            client.stream.write_all(&out).await?;
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
            self.stream.write_all(&out).await?;
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
            self.stream.write_all(&out).await?;
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
            self.stream.write_all(&out).await?;
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
