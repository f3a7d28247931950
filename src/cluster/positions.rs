//! How far each persistent session has got in the replication log: the bucket
//! `<prefix>_positions`, one key per client id, holding a log id (see `log`) such that every
//! message of the log at or before it is either not for the session or done with (acknowledged by its
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
//! QoS 2 needs more than a floor: once its client completed a delivery (PUBREC), the message
//! must never reach it again as a new one. Such deliveries above the floor are recorded too,
//! and PUBREL waits for that record, so a replay skips them (exactly once across a move).
//!
//! Cost: one key-value write per session whose position moved, per second (sessions that are
//! idle cost nothing), and one per QoS 2 delivery.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{log, subject, Cluster};
use crate::message::Message;
use crate::metrics;
use crate::publish::{Replicate, Replicated, ReplicationError, Stored};
use crate::session::{Position, SessionHandle};

/// How often moved positions are written.
const INTERVAL: Duration = Duration::from_secs(1);

/// Writes waiting for their answers at once.
const IN_FLIGHT: usize = 256;

fn encode(position: &Position) -> Bytes {
    let mut out = Vec::with_capacity(12 + 8 * position.completed.len());
    out.put_u64(position.floor);
    out.put_u32(position.completed.len() as u32);
    for seq in &position.completed {
        out.put_u64(*seq);
    }
    out.put_u16(position.inbound.len() as u16);
    for (packet_id, id) in &position.inbound {
        out.put_u16(*packet_id);
        out.put_u64(*id);
    }
    out.into()
}

fn decode(value: &[u8]) -> Option<Position> {
    let (floor, rest) = value.split_first_chunk::<8>()?;
    let (count, mut rest) = rest.split_first_chunk::<4>()?;
    let mut completed = Vec::with_capacity(u32::from_be_bytes(*count).min(1024) as usize);
    for _ in 0..u32::from_be_bytes(*count) {
        let (seq, tail) = rest.split_first_chunk::<8>()?;
        completed.push(u64::from_be_bytes(*seq));
        rest = tail;
    }
    let (count, mut rest) = rest.split_first_chunk::<2>()?;
    let mut inbound = Vec::with_capacity(usize::from(u16::from_be_bytes(*count)));
    for _ in 0..u16::from_be_bytes(*count) {
        let (packet_id, tail) = rest.split_first_chunk::<2>()?;
        let (id, tail) = tail.split_first_chunk::<8>()?;
        inbound.push((u16::from_be_bytes(*packet_id), u64::from_be_bytes(*id)));
        rest = tail;
    }
    rest.is_empty().then_some(Position {
        floor: u64::from_be_bytes(*floor),
        completed,
        inbound,
    })
}

impl Cluster {
    /// The recorded position of `client_id`'s session, if any.
    pub(super) async fn position_of(&self, client_id: &str) -> Result<Option<Position>, String> {
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
        let position = Position {
            floor: log::last_id(self.log_applied.load(Ordering::Acquire)),
            ..Position::default()
        };
        self.positions
            .put(subject::key(client_id), encode(&position))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Writes `session`'s position now (its client completed a QoS 2 delivery, or published
    /// or released a QoS 2 packet id); the answer says when it is recorded, and, given `also`
    /// (the message's replication), when that is done too.
    pub fn record_position(
        self: &Arc<Self>,
        session: &Arc<SessionHandle>,
        also: Option<Replicated>,
    ) -> Replicated {
        let (done, recorded) = oneshot::channel();
        let cluster = self.clone();
        let session = session.clone();
        self.tracker.spawn(async move {
            let written = cluster
                .write_position(&session, true)
                .await
                .map_err(ReplicationError::replicas);
            let replicated = match also {
                Some(also) => also
                    .await
                    .unwrap_or_else(|_| Err(ReplicationError::replicas("the cluster link closed"))),
                None => Ok(Stored::New),
            };
            let _ = done.send(written.and(replicated));
        });
        recorded
    }

    /// Replicates a QoS 2 message a persistent session's client published with `packet_id`,
    /// exactly once however often the client sends it, to whichever nodes: the id the log
    /// stores it under is recorded with the session's position first, then the message is
    /// stored under that id. If this node fails before PUBREC, the client sends it again to
    /// another node, which finds the id in the position it resumes, and the log keeps the first
    /// copy ([`Stored::Again`]) within its duplicate window.
    pub fn replicate_qos2(
        self: &Arc<Self>,
        session: &Arc<SessionHandle>,
        message: &Arc<Message>,
        packet_id: u16,
    ) -> Replicated {
        let (done, replicated) = oneshot::channel();
        let cluster = self.clone();
        let session = session.clone();
        let message = message.clone();
        let (before, queued) = session.log().queue_in_order();
        self.tracker.spawn(async move {
            if let Some(before) = before {
                // Dropped unsent (that one failed) counts as done too.
                let _ = before.await;
            }
            let id = session.log().inbound_id(packet_id, || {
                cluster.fresh_ids.fetch_add(1, Ordering::Relaxed)
            });
            let (stored, answer) = oneshot::channel();
            {
                // Held until the message is queued for the log: this session's QoS 2 messages
                // reach the log in the order they were received.
                let _one_at_a_time = session.log().writing.lock().await;
                if let Err(error) = cluster.write_position_locked(&session, true).await {
                    let _ = done.send(Err(ReplicationError::replicas(error)));
                    return;
                }
                let request = Replicate {
                    message,
                    // Every QoS 2 message is logged (`Pipeline::is_logged`).
                    logged: true,
                    once: Some(format!("{}-{id:x}", subject::key(&session.client_id))),
                    sent_directly: None,
                    done: stored,
                };
                // A closed link drops the request, which answers "not stored".
                let _ = cluster.replication.send(request).await;
                let _ = queued.send(());
            }
            let outcome = answer
                .await
                .unwrap_or_else(|_| Err(ReplicationError::replicas("the cluster link closed")));
            let _ = done.send(outcome);
        });
        replicated
    }

    /// Writes `session`'s position if this node speaks for it and (unless `always`) it moved.
    /// One write at a time per session, so an older position never lands last.
    pub(super) async fn write_position(
        &self,
        session: &SessionHandle,
        always: bool,
    ) -> Result<(), String> {
        let _one_at_a_time = session.log().writing.lock().await;
        self.write_position_locked(session, always).await
    }

    /// [`Cluster::write_position`] for a caller holding the session's `writing` lock.
    async fn write_position_locked(
        &self,
        session: &SessionHandle,
        always: bool,
    ) -> Result<(), String> {
        if !session.log().is_owned_here() || !session.is_persistent() {
            return Ok(());
        }
        // Read before the session: a delivery the watermark passed is already pending in it.
        let applied = log::last_id(self.log_applied.load(Ordering::Acquire));
        let Some(position) = session.log().position(applied) else {
            // Recovered deliveries of unknown position: the recorded one still holds.
            return Ok(());
        };
        if !session.log().note_recorded(position.floor) && !always {
            return Ok(());
        }
        let written = self
            .positions
            .put(subject::key(&session.client_id), encode(&position))
            .await;
        if let Err(error) = written {
            // Written again next time.
            session.log().note_recorded(0);
            metrics::cluster_error("position");
            return Err(error.to_string());
        }
        Ok(())
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
        let mut writes = FuturesUnordered::new();
        for session in cluster.registry.persistent_sessions() {
            if !session.log().is_owned_here() {
                continue;
            }
            let cluster = &cluster;
            writes.push(async move { cluster.write_position(&session, false).await });
            if writes.len() >= IN_FLIGHT {
                finish_one(&mut writes).await;
            }
        }
        while !writes.is_empty() {
            finish_one(&mut writes).await;
        }
    }
}

async fn finish_one<F>(writes: &mut FuturesUnordered<F>)
where
    F: std::future::Future<Output = Result<(), String>>,
{
    if let Some(Err(error)) = writes.next().await {
        debug!(%error, "session position not written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_round_trips() {
        for position in [
            Position::default(),
            Position {
                floor: u64::MAX - 1,
                completed: vec![u64::MAX, 3],
                inbound: vec![(1, 7), (65535, u64::MAX)],
            },
        ] {
            assert_eq!(decode(&encode(&position)), Some(position.clone()));
            let encoded = encode(&position);
            assert_eq!(decode(&encoded[..encoded.len() - 1]), None);
        }
    }
}
