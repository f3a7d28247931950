//! Listeners: accept connections and hand each to its own task.
//!
//! The accept loop stays trivial (admit, accept, spawn): anything that can stall on one client
//! (the TLS and WebSocket handshakes, CONNECT) runs in the spawned task under a deadline, never
//! here.

pub mod admission;
pub mod tls;
pub mod websocket;
mod x509;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::broker::BrokerState;
use crate::connection::{self, Peer};
use crate::metrics;
use admission::Admission;

/// What a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Tls,
    WebSocket,
    SecureWebSocket,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Self::Tcp => metrics::TCP,
            Self::Tls => metrics::TLS,
            Self::WebSocket => metrics::WS,
            Self::SecureWebSocket => metrics::WSS,
        }
    }
}

/// Accepts connections on one listener until `shutdown` is cancelled.
pub async fn accept(
    listener: TcpListener,
    transport: Transport,
    state: Arc<BrokerState>,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return,
        };
        let (socket, peer) = match accepted {
            Ok(accepted) => {
                backoff = Duration::from_millis(5);
                accepted
            }
            Err(error) => {
                // Usually out of file descriptors: wait for connections to close rather than spin.
                warn!(%error, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(admitted) = admission.admit(peer.ip()) else {
            // Closed before a byte is read: refusing must cost less than serving.
            continue;
        };
        // Small MQTT packets (acks, telemetry) must not wait for Nagle's algorithm.
        let _ = socket.set_nodelay(true);
        let state = state.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            serve(socket, peer, transport, state, shutdown).await;
            drop(admitted);
        });
    }
}

/// Runs the transport's handshakes under the handshake timeout, then the MQTT connection.
async fn serve(
    socket: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    state: Arc<BrokerState>,
    shutdown: CancellationToken,
) {
    // The future of a connection is as large as its largest state, and the TLS and WebSocket
    // ones hold a rustls session and tungstenite's state inline: boxed, they cost a plain TCP
    // connection a pointer instead of several kilobytes for its whole life.
    match transport {
        Transport::Tcp => run(socket, peer, transport, None, state, shutdown).await,
        Transport::WebSocket => Box::pin(serve_websocket(socket, peer, state, shutdown)).await,
        Transport::Tls | Transport::SecureWebSocket => {
            Box::pin(serve_tls(socket, peer, transport, state, shutdown)).await
        }
    }
}

async fn serve_websocket(
    socket: TcpStream,
    peer: SocketAddr,
    state: Arc<BrokerState>,
    shutdown: CancellationToken,
) {
    let transport = Transport::WebSocket;
    let deadline = state.config.tls.handshake_timeout;
    let Some(stream) = upgrade(socket, &state, transport.label(), deadline, &shutdown).await else {
        return;
    };
    run(stream, peer, transport, None, state, shutdown).await
}

async fn serve_tls(
    socket: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    state: Arc<BrokerState>,
    shutdown: CancellationToken,
) {
    let label = transport.label();
    let deadline = state.config.tls.handshake_timeout;
    let Some(tls) = state.tls.as_ref() else {
        return;
    };
    let handshake = tls.acceptor().accept(socket);
    let stream = tokio::select! {
        result = tokio::time::timeout(deadline, handshake) => match result {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                debug!(%peer, %error, "TLS handshake failed");
                metrics::handshake_failed(label, "tls_failed");
                return;
            }
            Err(_) => {
                debug!(%peer, "TLS handshake timed out");
                metrics::handshake_failed(label, "timeout");
                return;
            }
        },
        _ = shutdown.cancelled() => return,
    };
    let identity = tls.identity(stream.get_ref().1.peer_certificates());
    if transport == Transport::SecureWebSocket {
        let Some(stream) = upgrade(stream, &state, label, deadline, &shutdown).await else {
            return;
        };
        return run(stream, peer, transport, identity, state, shutdown).await;
    }
    run(stream, peer, transport, identity, state, shutdown).await
}

async fn upgrade<S>(
    stream: S,
    state: &BrokerState,
    label: &'static str,
    deadline: Duration,
    shutdown: &CancellationToken,
) -> Option<websocket::WsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max_packet_size = state.config.mqtt.max_packet_size as usize;
    let handshake = websocket::accept(stream, &state.config.websocket.path, max_packet_size);
    tokio::select! {
        result = tokio::time::timeout(deadline, handshake) => match result {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(error)) => {
                debug!(%error, "WebSocket handshake failed");
                metrics::handshake_failed(label, "websocket_failed");
                None
            }
            Err(_) => {
                metrics::handshake_failed(label, "timeout");
                None
            }
        },
        _ = shutdown.cancelled() => None,
    }
}

async fn run<S>(
    stream: S,
    address: SocketAddr,
    transport: Transport,
    cert_identity: Option<String>,
    state: Arc<BrokerState>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let peer = Peer {
        address,
        transport,
        cert_identity,
    };
    connection::serve(stream, peer, state, shutdown).await;
}
