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

pub use crate::connection::Transport;
use crate::connection::{self, Peer};
use crate::metrics;
use crate::state::BrokerState;
use admission::{Admission, Admitted};
use tls::TlsContext;

/// Accepts connections on one listener until `shutdown` is cancelled.
pub async fn accept(
    listener: TcpListener,
    transport: Transport,
    state: Arc<BrokerState>,
    tls: Option<Arc<TlsContext>>,
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
        // One task type per transport: a task is as large as its future's largest state, and a
        // plain TCP connection should reserve no room for a TLS session or WebSocket state.
        match transport {
            Transport::Tcp => {
                let peer = Peer {
                    address: peer,
                    transport,
                    cert_identity: None,
                };
                tracker.spawn(connection::serve(socket, peer, admitted, state, shutdown));
            }
            Transport::WebSocket => {
                tracker.spawn(serve_websocket(socket, peer, admitted, state, shutdown));
            }
            Transport::Tls | Transport::SecureWebSocket => {
                let Some(tls) = tls.clone() else {
                    continue;
                };
                tracker.spawn(serve_tls(
                    socket, peer, transport, tls, admitted, state, shutdown,
                ));
            }
        }
    }
}

/// Runs the WebSocket upgrade under the handshake timeout, then the MQTT connection.
async fn serve_websocket(
    socket: TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
    state: Arc<BrokerState>,
    shutdown: CancellationToken,
) {
    let transport = Transport::WebSocket;
    let deadline = state.config.tls.handshake_timeout;
    let Some(stream) = upgrade(socket, &state, transport.label(), deadline, &shutdown).await else {
        return;
    };
    let peer = Peer {
        address: peer,
        transport,
        cert_identity: None,
    };
    connection::serve(stream, peer, admitted, state, shutdown).await
}

/// Runs the TLS handshake (and for WSS the WebSocket upgrade) under the handshake timeout,
/// then the MQTT connection.
async fn serve_tls(
    socket: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    tls: Arc<TlsContext>,
    admitted: Admitted,
    state: Arc<BrokerState>,
    shutdown: CancellationToken,
) {
    let label = transport.label();
    let deadline = state.config.tls.handshake_timeout;
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
    let peer = Peer {
        address: peer,
        transport,
        cert_identity: tls.identity(stream.get_ref().1.peer_certificates()),
    };
    if transport == Transport::SecureWebSocket {
        let Some(stream) = upgrade(stream, &state, label, deadline, &shutdown).await else {
            return;
        };
        return connection::serve(stream, peer, admitted, state, shutdown).await;
    }
    connection::serve(stream, peer, admitted, state, shutdown).await
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
