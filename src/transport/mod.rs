//! Listeners: accept connections and hand each to its own task.
//!
//! The accept loop stays trivial (take a connection permit, accept, spawn): anything that can
//! stall on one client (TLS or WebSocket handshakes later, CONNECT now) runs in the spawned task
//! under a deadline, never here.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::broker::BrokerState;
use crate::connection;

/// Accepts plain TCP connections until `shutdown` is cancelled.
pub async fn accept_tcp(
    listener: TcpListener,
    state: Arc<BrokerState>,
    connection_permits: Arc<Semaphore>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            permit = connection_permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = shutdown.cancelled() => return,
        };
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
        // Small MQTT packets (acks, telemetry) must not wait for Nagle's algorithm.
        let _ = socket.set_nodelay(true);
        let state = state.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            connection::serve(socket, peer, state, shutdown).await;
            drop(permit);
        });
    }
}
