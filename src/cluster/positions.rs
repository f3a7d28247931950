//! How far each persistent session has got in the replication log: the bucket
//! `<prefix>_positions`, one key per client id, holding a log position such that every log
//! entry at or before it is either not for the session or done with (acknowledged by its
//! client, sent at QoS 0, dropped). Whichever node the session moves to replays the log after
//! it (see `consume`), so a session's queue survives the loss of the node that held it.
//!
//! The node that owns a session writes its position: at the claim (a new session starts at the
//! node's watermark), and then once a second when it moved. A session's position is the
//! lowest log position it still has a delivery of, less one, or the node's watermark when it
//! has none. A position is never ahead of the truth: the consumer counts a delivery as pending
//! before its watermark passes it, and a session whose recovered deliveries (after a restart)
//! have unknown positions keeps the position it had. Behind the truth only costs duplicates
//! on a move (QoS 1 allows them, and the client was told with DUP).
//!
//! Cost: one key-value write per session whose position moved, per second; sessions that are
//! idle cost nothing.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{subject, Cluster};
use crate::metrics;

/// How often moved positions are written.
const INTERVAL: Duration = Duration::from_secs(1);

/// Writes waiting for their answers at once.
const IN_FLIGHT: usize = 256;

fn encode(position: u64) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(&position.to_be_bytes())
}

fn decode(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.try_into().ok()?))
}

impl Cluster {
    /// The recorded position of `client_id`'s session, if any.
    pub(super) async fn position_of(&self, client_id: &str) -> Result<Option<u64>, String> {
        let entry = self
            .positions
            .entry(subject::key(client_id))
            .await
            .map_err(|e| e.to_string())?;
        Ok(entry.and_then(|entry| decode(&entry.value)))
    }

    /// A new session starts where this node's delivery of the log is: nothing before it is
    /// owed to it.
    pub(super) async fn start_position(&self, client_id: &str) -> Result<(), String> {
        let position = self.log_applied.load(Ordering::Acquire);
        self.positions
            .put(subject::key(client_id), encode(position))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Writes the positions of the sessions this node owns that moved since the last write.
pub(super) async fn record(cluster: Arc<Cluster>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
        if !cluster.is_linked() {
            continue;
        }
        // Read before the sessions: a delivery the watermark passed is already pending in
        // its session.
        let applied = cluster.log_applied.load(Ordering::Acquire);
        let mut writes = FuturesUnordered::new();
        for session in cluster.registry.persistent_sessions() {
            if !session.is_owned_here() || !session.is_persistent() {
                continue;
            }
            let position = match session.log_floor() {
                // Recovered deliveries of unknown position: the recorded one still holds.
                Some(0) => continue,
                Some(floor) => floor - 1,
                None => applied,
            };
            if !session.note_position(position) {
                continue;
            }
            let key = subject::key(&session.client_id);
            let positions = cluster.positions.clone();
            writes.push(async move {
                let written = positions.put(key, encode(position)).await;
                if written.is_err() {
                    // Written again next time.
                    session.note_position(0);
                }
                written
            });
            if writes.len() >= IN_FLIGHT {
                finish_one(&mut writes).await;
            }
        }
        while !writes.is_empty() {
            finish_one(&mut writes).await;
        }
    }
}

async fn finish_one<F, T, E: std::fmt::Display>(writes: &mut FuturesUnordered<F>)
where
    F: std::future::Future<Output = Result<T, E>>,
{
    if let Some(Err(error)) = writes.next().await {
        metrics::cluster_error("position");
        debug!(%error, "session position not written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_round_trips() {
        assert_eq!(decode(&encode(0)), Some(0));
        assert_eq!(decode(&encode(u64::MAX - 1)), Some(u64::MAX - 1));
        assert_eq!(decode(b"short"), None);
    }
}
