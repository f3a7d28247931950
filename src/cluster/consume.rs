//! Reading the replication log: how QoS 1/2 messages reach this node's plain subscriptions,
//! and how a session that moved here gets what it is still owed.
//!
//! - **Delivery.** Each node reads the whole log through one durable JetStream consumer of its
//!   own (`node-<name>`), in log order, and delivers each message through the router: to every
//!   plain subscription here for a message published elsewhere, to persistent sessions only for
//!   one published here (the rest it delivered when it was published). It acknowledges a batch
//!   to JetStream once the batch is written for its persistent sessions and queued, so a
//!   message between nodes is never lost: a node that stops reads on from where it
//!   acknowledged. The number of consumers is the number of nodes, whatever the number of
//!   sessions or subscriptions.
//! - **The watermark.** The position of the last message the consumer delivered
//!   (`log_applied`): every message up to it has reached this node's sessions. A session's log
//!   position (see `positions`) is the watermark while it has nothing pending.
//! - **Replay.** A persistent session that comes from another node (or that this node lost)
//!   is owed the log's messages after its recorded position that match its subscriptions.
//!   Under [`LogHold`] the consumer is stopped at the watermark; the session's subscriptions
//!   go into the router, so the consumer delivers what comes after; and the log between the
//!   position and the watermark is read into its queue first. The queue is in log order, with
//!   no gap and no message twice.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::stream;
use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{log, subject, Cluster, ClusterError};
use crate::message::{Delivery, Message};
use crate::metrics;
use crate::protocol::QoS;
use crate::router::Reach;
use crate::session::{Position, SessionHandle};
use crate::sync::lock;

/// Messages delivered (and written for persistent sessions) in one batch at most.
const BATCH: usize = 512;

/// Bytes one pull asks for at most: entries carry up to 256 KiB each (`log::ENTRY_BYTES`).
const PULL_BYTES: usize = 8 << 20;

/// Messages the node's consumer may have delivered and not yet had acknowledged.
const MAX_ACK_PENDING: i64 = 65_536;

/// How long one pull request stays open, and how often an idle one is confirmed alive.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);

/// Pause before reading the log again after the consumer failed (NATS unreachable).
const RETRY: Duration = Duration::from_secs(1);

/// The consumer stopped at the watermark, while a moved session's subscriptions are put in
/// place and its missed messages are replayed (see the module documentation).
pub struct LogHold<'a> {
    _held: tokio::sync::MutexGuard<'a, ()>,
    applied: u64,
}

/// Opens (or creates) this node's consumer of the log and returns it with the position it has
/// delivered up to.
pub(super) async fn open(
    log: &stream::Stream,
    node: &str,
    stored_applied: u64,
) -> Result<(PullConsumer, u64), ClusterError> {
    let name = consumer_name(node);
    let failed = |e: &dyn std::fmt::Display| ClusterError::Bucket {
        bucket: format!("consumer {name}"),
        reason: e.to_string(),
    };
    // A new node starts at the end: it has no session yet that could be owed anything older.
    let consumer: PullConsumer = log
        .get_or_create_consumer(&name, config(&name, DeliverPolicy::New))
        .await
        .map_err(|e| failed(&e))?;
    let info = consumer.get_info().await.map_err(|e| failed(&e))?;
    // Everything up to the acknowledged floor was delivered; a new consumer's floor is the
    // log's end when it was created.
    // The node's own record may be ahead: delivered and written, acknowledgement lost.
    let applied = info.ack_floor.stream_sequence.max(stored_applied);
    info!(consumer = %name, applied, "reading the replication log");
    Ok((consumer, applied))
}

/// Makes this node's consumer start again at `from`: it is deleted and created anew.
async fn rewind(log: &stream::Stream, node: &str, from: u64) -> Result<PullConsumer, String> {
    let name = consumer_name(node);
    let _ = log.delete_consumer(&name).await;
    log.create_consumer(config(
        &name,
        DeliverPolicy::ByStartSequence {
            start_sequence: from,
        },
    ))
    .await
    .map_err(|e| e.to_string())
}

fn consumer_name(node: &str) -> String {
    format!("node-{}", subject::token(node))
}

fn config(name: &str, deliver_policy: DeliverPolicy) -> pull::Config {
    pull::Config {
        durable_name: Some(name.to_string()),
        deliver_policy,
        ack_policy: AckPolicy::All,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: MAX_ACK_PENDING,
        ..Default::default()
    }
}

/// Delivers the log to this node's sessions, in order, batch by batch.
pub(super) async fn run(
    cluster: Arc<Cluster>,
    mut consumer: PullConsumer,
    shutdown: CancellationToken,
) {
    let mut restored = cluster.sessions_restored.subscribe();
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = restored.wait_for(|restored| *restored) => {}
    }
    loop {
        // Short pulls with frequent heartbeats: after a NATS server fails, the pull is renewed
        // against the consumer's new leader within seconds.
        let pulled = consumer
            .stream()
            .max_messages_per_batch(BATCH * 2)
            .max_bytes_per_batch(PULL_BYTES)
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_HEARTBEAT)
            .messages()
            .await;
        let mut messages = match pulled {
            Ok(messages) => messages,
            Err(error) => {
                metrics::cluster_error("log_read");
                debug!(%error, "cannot read the replication log; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => continue,
                }
            }
        };
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = messages.next() => next,
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match messages.next().now_or_never() {
                    Some(Some(next)) => batch.push(next),
                    _ => break,
                }
            }
            if let Some(from) = cluster.deliver_batch(batch).await {
                warn!(
                    from,
                    "replication log entries missing: reading again from the first"
                );
                metrics::cluster_error("log_read");
                loop {
                    match rewind(&cluster.log, &cluster.node, from).await {
                        Ok(rewound) => {
                            consumer = rewound;
                            break;
                        }
                        Err(error) => {
                            debug!(%error, "cannot rewind the log consumer; retrying");
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = tokio::time::sleep(RETRY) => {}
                            }
                        }
                    }
                }
                break;
            }
        }
    }
}

impl Cluster {
    /// Delivers a batch in log order. Returns the position to read from again when an entry
    /// is missing: acknowledging past it (acknowledgements are cumulative) would lose it. A
    /// consumer's new leader, after a NATS server failed, may count as delivered what never
    /// arrived here.
    async fn deliver_batch(
        &self,
        batch: Vec<Result<async_nats::jetstream::Message, pull::MessagesError>>,
    ) -> Option<u64> {
        let _held = self.log_lock.lock().await;
        let applied = self.log_applied.load(Ordering::Acquire);
        let mut expected = applied + 1;
        let mut gap = None;
        let mut entries = Vec::with_capacity(batch.len());
        let mut last = None;
        for item in batch {
            let message = match item {
                Ok(message) => message,
                Err(error) => {
                    // Missed heartbeats and the like: the stream goes on or ends.
                    debug!(%error, "replication log");
                    continue;
                }
            };
            let Ok(seq) = message.info().map(|info| info.stream_sequence) else {
                continue;
            };
            // Delivered again (an acknowledgement lost): already here.
            if seq <= applied {
                last = Some((message, seq));
                continue;
            }
            if seq > expected {
                // Without an answer (NATS failing over), the entries are taken to be there.
                let first = match self.log.get_info().await {
                    Ok(info) => info.state.first_sequence,
                    Err(_) => expected,
                };
                if first <= expected {
                    // Still in the log: read again from it.
                    gap = Some(expected);
                    break;
                }
                // Expired from the log (`log_max_age`, `log_max_bytes`) before this node read it.
                metrics::cluster_error("log_gap");
                warn!(
                    from = expected,
                    to = seq - 1,
                    "replication log entries expired before this node read them"
                );
            }
            expected = seq + 1;
            match log::unframe(&message.payload) {
                Some((origin, received)) => {
                    let own = origin == &*self.node;
                    for (index, received) in received.into_iter().enumerate() {
                        // What this node published, or took directly before, its sessions that
                        // are not persistent have.
                        let had = own
                            || received
                                .sent_directly
                                .is_some_and(|sent| lock(&self.direct_taken).took(origin, sent));
                        let reach = if had {
                            Reach::PlainPersistent
                        } else {
                            Reach::Plain
                        };
                        metrics::cluster_forwarded(metrics::IN);
                        entries.push((Arc::new(received.message), reach, log::log_id(seq, index)));
                    }
                }
                None => {
                    metrics::cluster_forward_dropped("undecodable");
                    warn!(seq, "replication log entry not understood");
                }
            }
            last = Some((message, seq));
        }
        let Some((message, seq)) = last else {
            return gap;
        };
        if let Err(error) = self
            .pipeline
            .deliver_logged(entries, false, Some(seq))
            .await
        {
            // Not acknowledged: JetStream delivers the batch again after its ack wait.
            metrics::message_dropped(metrics::DROP_STORAGE_FAILED);
            tracing::error!(%error, "messages from the replication log not delivered: storage failed");
            return gap;
        }
        self.log_applied.fetch_max(seq, Ordering::AcqRel);
        self.log_advanced.notify_waiters();
        if let Err(error) = message.ack().await {
            debug!(%error, "replication log acknowledgement not sent");
        }
        gap
    }

    /// Stops the delivery of the log at the watermark until the hold is dropped.
    pub async fn hold_log(&self) -> LogHold<'_> {
        let held = self.log_lock.lock().await;
        LogHold {
            _held: held,
            applied: self.log_applied.load(Ordering::Acquire),
        }
    }

    /// Reads the log after `position` up to the hold's watermark into `session`'s queue: the
    /// messages its subscriptions (already in the router; none if not `subscribed`) match. Returns how many entries were
    /// read. A position older than the log's first entry (expired by `log_max_age` or
    /// `log_max_bytes`) replays what is left, and is counted.
    pub async fn replay(
        &self,
        hold: &LogHold<'_>,
        session: &Arc<SessionHandle>,
        subscribed: bool,
        recorded: &Position,
    ) -> Result<usize, ClusterError> {
        // Whatever this node's consumer still brings up to the floor, or completed, the
        // session had.
        session.log().skip(recorded);
        let floor = recorded.floor;
        self.release_completed(session, recorded).await;
        if floor >= log::last_id(hold.applied) || !subscribed {
            return Ok(0);
        }
        // The entry holding the first message after the floor.
        let start = log::entry_of(floor + 1);
        let failed = |e: &dyn std::fmt::Display| ClusterError::Bucket {
            bucket: format!("replay of {}", session.client_id),
            reason: e.to_string(),
        };
        let first = self
            .log
            .get_info()
            .await
            .map_err(|e| failed(&e))?
            .state
            .first_sequence;
        if first > start {
            metrics::cluster_error("replay_truncated");
            warn!(client_id = %session.client_id, floor, first, "part of the session's missed messages expired from the replication log");
        }
        // The whole range, not only the subjects of the session's filters: the reader then
        // ends at the watermark itself, which a filtered one cannot tell from the last
        // matching entry (and its pending count, right after NATS recovered, once said none
        // while there were some). The router picks what the session's filters match.
        let consumer: PullConsumer = self
            .log
            .create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(|e| failed(&e))?;
        // Read in a block of its own: the reader goes on every way out, or it would stay until
        // its inactivity threshold.
        let read = async {
            let mut replayed = 0;
            let mut messages = consumer.messages().await.map_err(|e| failed(&e))?;
            let mut batch = Vec::new();
            loop {
                let next = tokio::time::timeout(self.request_timeout, messages.next()).await;
                // Short of the watermark the replay has not brought everything: the session would
                // be recorded as having what it lacks.
                let message = match next {
                    Ok(Some(Ok(message))) => message,
                    Ok(Some(Err(error))) => return Err(failed(&error)),
                    Ok(None) => return Err(failed(&"the log's reader stopped")),
                    Err(_) => return Err(failed(&"the log did not answer in time")),
                };
                let Ok(info) = message.info() else { continue };
                let seq = info.stream_sequence;
                if seq > hold.applied {
                    break;
                }
                replayed += 1;
                let received = log::unframe(&message.payload).map_or_else(Vec::new, |(_, m)| m);
                for (index, received) in received.into_iter().enumerate() {
                    let id = log::log_id(seq, index);
                    // Had before the move: at or below the floor, or completed (QoS 2).
                    if id <= floor || recorded.completed.binary_search(&id).is_ok() {
                        continue;
                    }
                    batch.push((
                        Arc::new(received.message),
                        Reach::Session(&session.client_id),
                        id,
                    ));
                }
                if batch.len() >= BATCH {
                    self.pipeline
                        .deliver_logged(std::mem::take(&mut batch), true, None)
                        .await
                        .map_err(|e| failed(&e))?;
                }
                if seq == hold.applied {
                    break;
                }
            }
            self.pipeline
                .deliver_logged(batch, true, None)
                .await
                .map_err(|e| failed(&e))?;
            Ok(replayed)
        }
        .await;
        let name = consumer.cached_info().name.clone();
        let log = self.log.clone();
        // Not waited for: with NATS failing it would hold the refusal up.
        self.tracker.spawn(async move {
            if let Err(error) = log.delete_consumer(&name).await {
                debug!(%error, "replay consumer not deleted; it expires by itself");
            }
        });
        let replayed = read?;
        metrics::cluster_replayed(replayed);
        Ok(replayed)
    }
}

impl Cluster {
    /// The client may still hold the packet ids of QoS 2 deliveries it completed (PUBREC) on
    /// the node the session came from, waiting for PUBREL [MQTT-4.4.0-1]: PUBREL is sent for
    /// each, under the packet id every node gives that log entry. (A client that had them
    /// released answers PUBCOMP all the same.)
    async fn release_completed(&self, session: &Arc<SessionHandle>, recorded: &Position) {
        let releases = recorded
            .completed
            .iter()
            .map(|&log_seq| {
                let placeholder = Arc::new(Message::new(
                    "".into(),
                    Default::default(),
                    QoS::ExactlyOnce,
                    false,
                    Default::default(),
                    None,
                ));
                let mut delivery = Delivery::new(
                    placeholder,
                    QoS::ExactlyOnce,
                    false,
                    Vec::new(),
                    session.next_seq_for_log(log_seq),
                );
                delivery.awaiting_pubcomp = true;
                delivery
            })
            .collect();
        self.pipeline.enqueue(session, releases).await;
    }
}
