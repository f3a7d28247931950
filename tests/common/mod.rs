//! Shared test harness: a broker on port 0 and a raw-bytes MQTT client for the cases a real
//! client library hides (malformed input, exact packet bytes, timing of the broker's own packets).
#![allow(dead_code)]

pub mod crash_load;
pub mod nats;
pub mod packets;
pub mod pki;
pub mod process;
pub mod rumqtt;
pub mod scrape;
pub mod traffic;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use telemq::{Broker, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for something that should happen; generous because CI machines are slow.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a test waits to be confident something does NOT happen.
pub const QUIET: Duration = Duration::from_millis(300);

pub struct TestBroker {
    broker: Option<Broker>,
    pub addr: SocketAddr,
    /// The RocksDB directory; kept for the life of the test (and across restarts).
    pub data_dir: std::sync::Arc<tempfile::TempDir>,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let data_dir = std::sync::Arc::new(tempfile::tempdir().expect("temp dir"));
        Self::start_in(data_dir, adjust).await
    }

    /// Starts a broker on an existing data directory (a restart).
    pub async fn start_in(
        data_dir: std::sync::Arc<tempfile::TempDir>,
        adjust: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = Config::default();
        config.listener.bind = "127.0.0.1:0".parse().unwrap();
        config.metrics.bind = "127.0.0.1:0".parse().unwrap();
        config.websocket.bind = "127.0.0.1:0".parse().unwrap();
        config.websocket.tls_bind = "127.0.0.1:0".parse().unwrap();
        config.tls.bind = "127.0.0.1:0".parse().unwrap();
        // $SYS retained messages would show up in retained counts; tests that want them say so.
        config.metrics.sys_interval = Duration::ZERO;
        config.storage.data_dir = data_dir.path().to_path_buf();
        adjust(&mut config);
        let broker = Broker::start(config).await.expect("broker starts");
        let addr = broker.mqtt_addr();
        Self {
            broker: Some(broker),
            addr,
            data_dir,
        }
    }

    /// Shuts down gracefully and starts again on the same data directory.
    pub async fn restart(self) -> Self {
        self.restart_with(|_| {}).await
    }

    /// Like `restart`, with a configuration adjusted as in `start_with`.
    pub async fn restart_with(self, adjust: impl FnOnce(&mut Config)) -> Self {
        let data_dir = self.data_dir.clone();
        self.shutdown().await;
        Self::start_in(data_dir, adjust).await
    }

    pub fn broker(&self) -> &Broker {
        self.broker.as_ref().unwrap()
    }

    pub async fn shutdown(mut self) {
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await;
        }
    }
}

/// A packet as read off the wire: first byte and body (everything after the remaining length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPacket {
    pub first_byte: u8,
    pub body: Vec<u8>,
}

impl RawPacket {
    pub fn packet_type(&self) -> u8 {
        self.first_byte >> 4
    }
}

/// A raw MQTT 5 client, connected with clean start.
pub async fn raw_v5(addr: SocketAddr, id: &str) -> RawClient {
    RawClient::handshake(addr, &packets::connect_v5(id, true, 60, &[]))
        .await
        .0
}

/// Any byte stream a raw client can speak MQTT over: TCP, TLS, WebSocket.
pub trait Duplex: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Duplex for T {}

pub struct RawClient {
    stream: Box<dyn Duplex>,
    buf: BytesMut,
}

impl RawClient {
    /// A raw client over an already connected stream (TLS, WebSocket).
    pub fn over(stream: impl Duplex + 'static) -> Self {
        Self {
            stream: Box::new(stream),
            buf: BytesMut::new(),
        }
    }

    /// Sends CONNECT and returns the broker's answer (CONNACK), or `None` if it closed.
    pub async fn connect_with(&mut self, connect: &[u8]) -> Option<RawPacket> {
        self.send(connect).await;
        self.recv().await
    }

    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        stream.set_nodelay(true).unwrap();
        Self::over(stream)
    }

    /// Connects with a 4 KiB socket receive buffer, so that a client that stops reading fills
    /// the broker's side quickly instead of after megabytes of kernel buffering.
    pub async fn connect_small_window(addr: SocketAddr) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("tcp connect");
        stream.set_nodelay(true).unwrap();
        Self::over(stream)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
        // TLS and WebSocket layers hold what they are given until flushed.
        self.stream.flush().await.expect("flush");
    }

    /// Sends without failing when the broker already closed the socket.
    pub async fn send_lenient(&mut self, bytes: &[u8]) {
        if self.stream.write_all(bytes).await.is_ok() {
            let _ = self.stream.flush().await;
        }
    }

    fn try_parse(&mut self) -> Option<RawPacket> {
        if self.buf.len() < 2 {
            return None;
        }
        let mut len = 0usize;
        let mut i = 1;
        loop {
            let byte = *self.buf.get(i)?;
            len |= usize::from(byte & 0x7F) << (7 * (i - 1));
            i += 1;
            if byte & 0x80 == 0 {
                break;
            }
        }
        if self.buf.len() < i + len {
            return None;
        }
        let first_byte = self.buf[0];
        self.buf.advance(i);
        let body = self.buf.split_to(len).to_vec();
        Some(RawPacket { first_byte, body })
    }

    /// The next packet, or `None` if the connection closed first. Panics after `WAIT`.
    pub async fn recv(&mut self) -> Option<RawPacket> {
        self.recv_within(WAIT)
            .await
            .expect("timed out waiting for a packet")
    }

    /// `Err(())` on timeout, `Ok(None)` when the connection closed.
    pub async fn recv_within(&mut self, wait: Duration) -> Result<Option<RawPacket>, ()> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(packet) = self.try_parse() {
                return Ok(Some(packet));
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await;
            match read {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Next packet of a given type, skipping others (e.g. PUBLISH while waiting for an ack).
    pub async fn recv_type(&mut self, packet_type: u8) -> RawPacket {
        loop {
            let packet = self.recv().await.expect("connection closed");
            if packet.packet_type() == packet_type {
                return packet;
            }
        }
    }

    /// Asserts the broker closes the connection within `WAIT`; returns the packets it sent first.
    pub async fn expect_closed(&mut self) -> Vec<RawPacket> {
        let mut before = Vec::new();
        loop {
            match self.recv_within(WAIT).await {
                Ok(None) => return before,
                Ok(Some(packet)) => before.push(packet),
                Err(()) => panic!("broker did not close the connection; got {before:?}"),
            }
        }
    }

    /// Publishes at QoS 1 with MQTT 5 framing; returns the PUBACK's reason code.
    pub async fn publish_qos1_v5(&mut self, topic: &str, packet_id: u16, payload: &[u8]) -> u8 {
        let acks = self
            .publish_qos1_window_v5(&[(topic, packet_id, payload)])
            .await;
        acks[0].first().copied().unwrap_or(0)
    }

    /// Publishes a window of QoS 1 messages (topic, packet id, payload) with MQTT 5 framing,
    /// then reads their PUBACKs, which must come in the same order; returns what each PUBACK
    /// says after its packet id (reason code, then properties; empty for success).
    pub async fn publish_qos1_window_v5(&mut self, window: &[(&str, u16, &[u8])]) -> Vec<Vec<u8>> {
        self.publish_window_v5(1, window).await
    }

    /// As [`RawClient::publish_qos1_window_v5`] at QoS 2: returns what each PUBREC says, and
    /// completes every accepted message (PUBREL, PUBCOMP) before it returns.
    pub async fn publish_qos2_window_v5(&mut self, window: &[(&str, u16, &[u8])]) -> Vec<Vec<u8>> {
        let recs = self.publish_window_v5(2, window).await;
        let accepted: Vec<u16> = window
            .iter()
            .zip(&recs)
            .filter(|(_, rec)| rec.first().copied().unwrap_or(0) < 0x80)
            .map(|((_, packet_id, _), _)| *packet_id)
            .collect();
        for packet_id in &accepted {
            self.send(&packets::pubrel(*packet_id)).await;
        }
        for packet_id in &accepted {
            let comp = self.recv_type(7).await;
            assert_eq!(
                &comp.body[..2],
                packet_id.to_be_bytes(),
                "PUBCOMP for another packet"
            );
        }
        recs
    }

    /// Publishes a window at `qos` (1 or 2) and reads the PUBACKs or PUBRECs in order.
    async fn publish_window_v5(&mut self, qos: u8, window: &[(&str, u16, &[u8])]) -> Vec<Vec<u8>> {
        for (topic, packet_id, payload) in window {
            self.send(&packets::publish(
                topic,
                qos,
                *packet_id,
                false,
                false,
                Some(&[]),
                payload,
            ))
            .await;
        }
        // PUBACK is packet type 4, PUBREC 5.
        let ack_type = 3 + qos;
        let mut acks = Vec::with_capacity(window.len());
        for (_, packet_id, _) in window {
            let ack = self.recv_type(ack_type).await;
            assert_eq!(
                &ack.body[..2],
                packet_id.to_be_bytes(),
                "acknowledgement for another packet"
            );
            acks.push(ack.body[2..].to_vec());
        }
        acks
    }

    /// Asserts nothing arrives for `QUIET`.
    pub async fn expect_silence(&mut self) {
        match self.recv_within(QUIET).await {
            Err(()) => {}
            Ok(other) => panic!("expected silence, got {other:?}"),
        }
    }

    /// Connects with the given CONNECT bytes and asserts a successful CONNACK; returns it.
    pub async fn handshake(addr: SocketAddr, connect: &[u8]) -> (Self, RawPacket) {
        let mut client = Self::connect(addr).await;
        client.send(connect).await;
        let connack = client.recv().await.expect("CONNACK");
        assert_eq!(
            connack.packet_type(),
            2,
            "expected CONNACK, got {connack:?}"
        );
        let reason = connack.body[1];
        assert_eq!(reason, 0, "CONNECT refused: {connack:?}");
        (client, connack)
    }
}

/// Moves the clock of this test's runtime — and so of the broker running in it, whose expiry
/// and keep-alive clocks follow tokio's — forward by `by` at once: tokio time is paused,
/// advanced and resumed, so the test waits for no wall-clock time.
pub async fn skip_time(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}
