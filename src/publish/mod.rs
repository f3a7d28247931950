//! The publish pipeline: the one path by which a message is routed, made durable and delivered,
//! whoever publishes it — a client, a will, a delayed message, a shared-subscription hand-over,
//! `$SYS` or a dead letter.
//!
//! ```text
//! plan (router: targets, sequence numbers) ─▶ storage ops (retained change, one message
//! record listing the persistent sessions' deliveries) ─▶ write ─▶ apply (retained store,
//! each target's mailbox) ─▶ release (what could not be queued)
//! ```
//!
//! The rule everything here serves: a change the broker acknowledges to a client is written
//! before the acknowledgement leaves. A connection task plans through [`Pipeline::plan`],
//! queues the write behind its earlier ones and applies the plan once it is durable, so its
//! acknowledgements leave in order; the broker's own publishes use [`Pipeline::publish`].
//! Releases of acknowledged state are written behind, since losing one only means a
//! redelivery after a crash.
//!
//! A [`Planned`] message is what a cluster link takes too: applying it delivers to this node's
//! mailboxes, and handing it to other nodes is a second consumer of the same plan. In a cluster,
//! a QoS 1/2 or retained message is also replicated ([`Pipeline::replicate`]) while it is
//! written here (a QoS 1/2 message for clean sessions only is only queued by the other
//! nodes), and its acknowledgement waits for both.

mod restore;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::config::DeadLetterConfig;
use crate::message::{Delivery, Message, StoredMessage};
use crate::metrics;
use crate::protocol::QoS;
use crate::router::persistent::PersistentFilters;
use crate::router::{Dropped, Reach, Router, Target};
use crate::session::mailbox::is_spilled;
use crate::session::{EndedSession, SessionHandle};
use crate::storage::{ops, Completion, Op, StorageError, Store};

pub use restore::restore;

/// Topic prefix of dead letters: `$DLQ/<reason>/<original topic>`.
pub const DEAD_LETTER_PREFIX: &str = "$DLQ/";

/// Routing, durability and delivery of messages. Holds the router and the storage handle, not
/// the rest of the broker.
#[derive(Clone, Debug)]
pub struct Pipeline {
    router: Arc<Router>,
    store: Arc<dyn Store>,
    dead_letter: DeadLetterConfig,
    /// In a cluster: messages published here, for the cluster link to send to other nodes.
    outbox: Option<mpsc::Sender<Arc<Message>>>,
    /// In a cluster: messages to store on other machines before they are acknowledged.
    replication: Option<mpsc::Sender<Replicate>>,
    /// In a cluster: QoS 1/2 messages the log does not carry, to be queued by the other nodes
    /// before they are acknowledged.
    direct: Option<mpsc::Sender<Replicate>>,
    /// In a cluster: the filters of every node's persistent sessions.
    persistent: Option<Arc<PersistentFilters>>,
}

/// A message for the cluster to store with its replicas (or, not `logged`, to hand to the other
/// nodes directly); `done` answers once it is stored, or why not. With `once`, an id the cluster stores the message under at most once (a QoS 2
/// message its publisher may send again to another node).
#[derive(Debug)]
pub struct Replicate {
    pub message: Arc<Message>,
    /// Whether the message goes into the replication log (see [`Planned::logged`]); a QoS 0
    /// retained change, which does not, is still written to the retained bucket.
    pub logged: bool,
    pub once: Option<String>,
    /// Set when the message was handed to the other nodes directly before it went into the
    /// log after all: the nodes that delivered it then deliver its log copy only to persistent
    /// sessions.
    pub sent_directly: Option<SentDirectly>,
    pub done: oneshot::Sender<Result<Stored, ReplicationError>>,
}

/// The direct batch a message went out in: its sender's run (random at each start), the
/// epoch in that run and the batch's number in the epoch (see `cluster::direct`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SentDirectly {
    pub run: u64,
    pub epoch: u64,
    pub batch: u64,
}

/// How a replicated message was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Stored now: it is to be routed.
    New,
    /// Stored before under the same id, from an earlier attempt of its publisher that was not
    /// acknowledged: it was routed then, and is only acknowledged now.
    Again,
}

/// Resolves once a message handed to [`Pipeline::replicate`] is stored with its replicas.
/// A dropped sender (the link shutting down) counts as not stored.
pub type Replicated = oneshot::Receiver<Result<Stored, ReplicationError>>;

/// Why the cluster did not store a message with its replicas: the message must not be
/// acknowledged. The text is what an MQTT 5 publisher is told.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct ReplicationError(pub Arc<str>);

impl ReplicationError {
    /// The replicas could not store the message.
    pub fn replicas(reason: impl std::fmt::Display) -> Self {
        Self(format!("the cluster could not store the message with its replicas: {reason}").into())
    }
}

/// A message with the sessions it goes to and what must be written before they get it.
#[derive(Debug)]
pub struct Planned {
    pub message: Arc<Message>,
    pub targets: Vec<Target>,
    /// The retained store change and the message record; more may be added (a QoS 2 packet
    /// id) to be written in the same batch.
    pub ops: Vec<Op>,
    /// In a cluster, whether the replication log carries the message (see
    /// [`Pipeline::is_logged`]): decided once, so that the plan, the replication and the
    /// forwarding to other nodes agree.
    pub logged: bool,
}

impl Pipeline {
    pub fn new(router: Arc<Router>, store: Arc<dyn Store>, dead_letter: DeadLetterConfig) -> Self {
        Self {
            router,
            store,
            dead_letter,
            outbox: None,
            replication: None,
            direct: None,
            persistent: None,
        }
    }

    /// Has QoS 1/2 and retained messages stored by the cluster, or handed to the other nodes
    /// `direct`ly (see [`Pipeline::replicate`]); `persistent` says which topics some node's
    /// persistent session subscribes to.
    pub fn with_replication(
        mut self,
        replication: mpsc::Sender<Replicate>,
        direct: mpsc::Sender<Replicate>,
        persistent: Arc<PersistentFilters>,
    ) -> Self {
        self.replication = Some(replication);
        self.direct = Some(direct);
        self.persistent = Some(persistent);
        self
    }

    /// In a cluster, hands a planned message to the cluster before it is acknowledged; the
    /// answer says when the cluster has it. One the replication log carries, or that changes a
    /// retained message, is stored with its replicas; a QoS 1/2 message the log does not carry
    /// goes to the other nodes directly, and is answered once they queued it (see
    /// `cluster::direct`). Waits for room in the link's queue, which holds back the publisher.
    /// `None` when nothing needs waiting for: no cluster, a QoS 0 message that retains
    /// nothing, or a `$SYS` topic, which describes this node only.
    pub async fn replicate(&self, planned: &Planned) -> Option<Replicated> {
        let message = &planned.message;
        if message.topic.starts_with("$SYS/") {
            return None;
        }
        let queue = if planned.logged || message.retain {
            self.replication.as_ref()?
        } else if message.qos != QoS::AtMostOnce {
            self.direct.as_ref()?
        } else {
            return None;
        };
        let (done, replicated) = oneshot::channel();
        let request = Replicate {
            message: message.clone(),
            logged: planned.logged,
            once: None,
            sent_directly: None,
            done,
        };
        // A closed link drops the request, and with it `done`: the message is not stored.
        let _ = queue.send(request).await;
        Some(replicated)
    }

    /// Whether the cluster's replication log carries `message`, and brings it to persistent
    /// sessions, this node's included, so that publishing leaves them out. A persistent
    /// session then gets every message it is owed in log order, through one path, and its
    /// position in the log says what it still needs (see `cluster::log`).
    ///
    /// A retained QoS 1/2 message, a QoS 1/2 message whose topic some node's persistent
    /// session subscribes to, and a QoS 2 message a persistent session published
    /// (`resendable`): its client may send it again to another node if this one fails before
    /// PUBREC, and only the log keeps one copy of it however often it comes (see
    /// `cluster::positions`). Any other QoS 1/2 message is for clean sessions only and is not
    /// replicated: its publisher waits only for the other nodes to queue it (see
    /// `cluster::direct`).
    fn is_logged(&self, message: &Message, resendable: bool) -> bool {
        self.replication.is_some()
            && message.qos != QoS::AtMostOnce
            && !message.topic.starts_with("$SYS/")
            && ((message.qos == QoS::ExactlyOnce && resendable)
                || message.retain
                || self
                    .persistent
                    .as_ref()
                    .is_some_and(|filters| filters.matches(&message.topic)))
    }

    /// Delivers messages read from the cluster's replication log, in log order, each to the
    /// subscriptions its `Reach` names: one durable write for the persistent subscribers of the
    /// whole batch, then into the mailboxes. Each delivery carries its log position, and its
    /// session counts it as pending until it is done (see `session::LogPosition`).
    /// `replayed` deliveries (a session that moved here) go out with DUP: the client may have
    /// had them from another node.
    ///
    /// `applied` (the node's consumer, not a replay) is the last position of the batch: written
    /// with the deliveries, so that after a restart the node does not deliver them again.
    pub async fn deliver_logged(
        &self,
        batch: Vec<(Arc<Message>, Reach<'_>, u64)>,
        replayed: bool,
        applied: Option<u64>,
    ) -> Result<(), StorageError> {
        let mut planned = Vec::with_capacity(batch.len());
        let mut ops = Vec::new();
        for (message, reach, log_seq) in batch {
            let mut targets = self.router.plan_reaching(&message, reach);
            targets.retain(|target| replayed || !target.session.log().had(log_seq));
            if targets.is_empty() {
                continue;
            }
            for target in &mut targets {
                target.delivery.log_seq = Some(log_seq);
                target.delivery.seq = target.session.next_seq_for_log(log_seq);
                target.delivery.dup = replayed;
            }
            if self.store.is_durable() {
                ops.extend(durable_ops(&*self.store, &message, &mut targets, false));
            }
            planned.push((message, targets));
        }
        match applied {
            // Nothing persistent in the batch: losing the mark only means entries that went
            // to sessions a crash ends anyway are read again.
            Some(seq) if ops.is_empty() => self.write_behind(vec![ops::log_applied(seq)]).await,
            Some(seq) => ops.push(ops::log_applied(seq)),
            None => {}
        }
        self.write(ops).await?;
        for (message, targets) in planned {
            for target in &targets {
                if let Some(log_seq) = target.delivery.log_seq {
                    target.session.log().add(log_seq);
                }
            }
            let dropped = self.router.deliver(&message, targets);
            self.dropped(dropped).await;
        }
        Ok(())
    }

    /// Undoes the local writes of a planned message that will not be acknowledged after all
    /// (the cluster did not store it): the persistent sessions' deliveries are released, so a
    /// restart does not deliver what the publisher was told was refused.
    pub async fn abandon(&self, planned: &Planned) {
        if !self.store.is_durable() {
            return;
        }
        let ops = planned
            .targets
            .iter()
            .filter_map(|target| ops::release(target.session.store_id, &target.delivery, true))
            .collect();
        self.write_behind(ops).await;
    }

    /// Hands every message this node publishes to `outbox` as well (the cluster link), without
    /// waiting: when it is full the message is delivered here only, and counted.
    pub fn with_outbox(mut self, outbox: mpsc::Sender<Arc<Message>>) -> Self {
        self.outbox = Some(outbox);
        self
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Whether anything is stored (the `rocksdb` engine).
    pub fn is_durable(&self) -> bool {
        self.store.is_durable()
    }

    /// Finds every session `message` goes to and the operations that make it durable: the
    /// retained store change and, when persistent sessions take it at QoS 1 or 2, one message
    /// record listing those deliveries (which are marked as stored). `resendable`: a QoS 2
    /// message of a persistent session's client (see [`Pipeline::is_logged`]).
    pub fn plan(&self, message: Arc<Message>, resendable: bool) -> Planned {
        let logged = self.is_logged(&message, resendable);
        let reach = if logged {
            Reach::AllButPersistent
        } else {
            Reach::All
        };
        let mut targets = self.router.plan_reaching(&message, reach);
        let ops = if self.store.is_durable() {
            durable_ops(&*self.store, &message, &mut targets, true)
        } else {
            Vec::new()
        };
        Planned {
            message,
            targets,
            ops,
            logged,
        }
    }

    /// Whether `planned` must be refused to its publisher: its topic's policy is `refuse` and
    /// some target's queue has no room.
    pub fn must_refuse(&self, planned: &Planned) -> bool {
        self.router.must_refuse(&planned.message, &planned.targets)
    }

    /// Delivers a planned message whose operations are durable: the retained store, then each
    /// target's mailbox; what could not be queued is counted, dead-lettered and released.
    pub async fn apply(&self, planned: Planned) {
        self.forward(&planned.message).await;
        let dropped = self.router.apply(&planned.message, planned.targets);
        self.dropped(dropped).await;
    }

    /// Hands a message to the cluster link. A QoS 1 or 2 message waits for room, which holds
    /// back its publisher's acknowledgement: the link forwards at its own pace and nothing
    /// acknowledged is dropped for want of room. (While NATS is unreachable the link drains the
    /// queue, counting what it cannot send, so this never waits on a dead link.) A QoS 0 message
    /// is dropped, and counted, when the queue is full.
    async fn forward(&self, message: &Arc<Message>) {
        let Some(outbox) = &self.outbox else {
            return;
        };
        let sent = if message.qos == QoS::AtMostOnce {
            outbox
                .try_send(message.clone())
                .map_err(|error| match error {
                    mpsc::error::TrySendError::Full(_) => "queue_full",
                    mpsc::error::TrySendError::Closed(_) => "link_closed",
                })
        } else {
            outbox
                .send(message.clone())
                .await
                .map_err(|_| "link_closed")
        };
        if let Err(reason) = sent {
            metrics::cluster_forward_dropped(reason);
        }
    }

    /// Delivers a message another node published to the subscriptions `reach` names here:
    /// durably for persistent subscribers, then into the mailboxes. It is not forwarded again,
    /// and the retained store is left to the cluster, which keeps it.
    pub async fn publish_remote(&self, message: Arc<Message>, reach: Reach<'_>) {
        let mut targets = self.router.plan_reaching(&message, reach);
        if targets.is_empty() {
            return;
        }
        if self.store.is_durable() {
            let ops = durable_ops(&*self.store, &message, &mut targets, false);
            if let Err(error) = self.write(ops).await {
                metrics::message_dropped(metrics::DROP_STORAGE_FAILED);
                tracing::error!(%error, topic = %message.topic, "message from another node not delivered: storage failed");
                return;
            }
        }
        let dropped = self.router.deliver(&message, targets);
        self.dropped(dropped).await;
    }

    /// Publishes a message on the broker's own behalf (a will, a delayed message): durably for
    /// persistent subscribers, then into the mailboxes.
    pub async fn publish(&self, message: Arc<Message>) {
        // No client sends it again: a will, a delayed message.
        let mut planned = self.plan(message, false);
        let replicated = self.replicate(&planned).await;
        let ops = std::mem::take(&mut planned.ops);
        // Nobody waits for an answer: without replicas the message is still delivered here.
        if let Some(Ok(Err(error))) = match replicated {
            Some(replicated) => Some(replicated.await),
            None => None,
        } {
            tracing::warn!(%error, topic = %planned.message.topic, "message published without its replicas");
        }
        if let Err(error) = self.write(ops).await {
            metrics::message_dropped(metrics::DROP_STORAGE_FAILED);
            tracing::error!(%error, topic = %planned.message.topic, "message not published: storage failed");
            return;
        }
        self.apply(planned).await;
    }

    /// Publishes a message that is never stored (`$SYS` topics, dead letters): planned and
    /// queued like any other, for as long as the broker runs. Returns how many sessions took it.
    pub fn publish_transient(&self, message: Arc<Message>) -> usize {
        let targets = self.router.plan(&message);
        let planned = targets.len();
        let dropped = self.router.apply(&message, targets);
        for drop in &dropped {
            self.drop_one(&drop.session, &drop.delivery, drop.reason);
        }
        planned - dropped.len()
    }

    /// Queues deliveries made for one session outside of routing (retained messages sent on
    /// subscribe, whose storage [`Pipeline::store_deliveries`] wrote); what does not fit is
    /// counted, dead-lettered and released.
    pub async fn enqueue(&self, session: &Arc<SessionHandle>, deliveries: Vec<Delivery>) {
        let mut dropped = Vec::new();
        for delivery in deliveries {
            let policy = self.router.policy_for(&delivery.message.topic);
            dropped.extend(self.router.enqueue(session, delivery, policy));
        }
        self.dropped(dropped).await;
    }

    /// The operations that make deliveries made for `session` outside of routing durable
    /// (retained messages sent on subscribe to a persistent session): one message record
    /// listing each QoS 1/2 delivery, which is marked as stored.
    pub fn store_deliveries(
        &self,
        session: &SessionHandle,
        deliveries: &mut [Delivery],
    ) -> Vec<Op> {
        if !self.store.is_durable() || !session.is_persistent() {
            return Vec::new();
        }
        let mut batch = Vec::new();
        for delivery in deliveries.iter_mut().filter(|d| d.qos != QoS::AtMostOnce) {
            let stored = Arc::new(StoredMessage::new(self.store.next_message_id(), 1));
            let message = delivery.message.clone();
            batch.push(ops::message_put(
                &stored,
                &message,
                1,
                std::iter::once((session.store_id, &*delivery)),
            ));
            delivery.stored = Some(stored);
            delivery.listed = true;
        }
        batch
    }

    /// Counts a delivery that will not reach `session` and dead-letters it. A spilled
    /// delivery's message is on disk only and is counted, not dead-lettered; nor is what an
    /// ended session can no longer take.
    pub fn drop_one(&self, session: &SessionHandle, delivery: &Delivery, reason: &'static str) {
        session.log_done(delivery);
        metrics::message_dropped(reason);
        if reason != metrics::DROP_SESSION_ENDED && !is_spilled(delivery) {
            self.dead_letter(&delivery.message, reason, Some(&session.client_id));
        }
    }

    /// Republishes a dropped message to `$DLQ/<reason>/<topic>` when dead letters are enabled.
    /// Dead letters go to subscribers' queues like any message, but are never stored and a
    /// dropped dead letter is never dead-lettered again, so this cannot loop or grow.
    pub fn dead_letter(&self, message: &Message, reason: &'static str, subscriber: Option<&str>) {
        if !self.dead_letter.enabled || message.topic.starts_with(DEAD_LETTER_PREFIX) {
            return;
        }
        if reason == metrics::DROP_NO_SUBSCRIBERS && !self.dead_letter.no_subscribers {
            return;
        }
        let mut properties = message.properties.clone();
        properties
            .user_properties
            .push(("dlq-reason".into(), reason.into()));
        if let Some(publisher) = &message.publisher {
            properties
                .user_properties
                .push(("dlq-publisher".into(), publisher.to_string()));
        }
        if let Some(subscriber) = subscriber {
            properties
                .user_properties
                .push(("dlq-subscriber".into(), subscriber.into()));
        }
        let letter = Message {
            topic: format!("{DEAD_LETTER_PREFIX}{reason}/{}", message.topic).into(),
            payload: message.payload.clone(),
            qos: message.qos,
            retain: false,
            properties,
            publisher: None,
            expires_at: message.expires_at,
        };
        metrics::dead_lettered(reason);
        self.publish_transient(Arc::new(letter));
    }

    /// Starts writing `ops`; the completion resolves once they are durable. `None` when there
    /// is nothing to wait for.
    pub async fn submit(&self, ops: Vec<Op>) -> Option<Completion> {
        if ops.is_empty() || !self.store.is_durable() {
            return None;
        }
        Some(self.store.write(ops).await)
    }

    /// Writes `ops` and waits until they are durable.
    pub async fn write(&self, ops: Vec<Op>) -> Result<(), StorageError> {
        match self.submit(ops).await {
            Some(completion) => completion.await.unwrap_or(Err(StorageError::Closed)),
            None => Ok(()),
        }
    }

    /// Writes `ops` without waiting.
    pub async fn write_behind(&self, ops: Vec<Op>) {
        if !ops.is_empty() && self.store.is_durable() {
            self.store.write_behind(ops).await;
        }
    }

    /// Releases the storage of finished or dropped deliveries of session `store_id`.
    pub async fn release<'a>(
        &self,
        store_id: u64,
        deliveries: impl IntoIterator<Item = &'a Delivery>,
    ) {
        // Once per acknowledgement: nothing to build when nothing is stored.
        if !self.store.is_durable() {
            return;
        }
        let ops = deliveries
            .into_iter()
            .filter_map(|delivery| ops::release(store_id, delivery, true))
            .collect();
        self.write_behind(ops).await;
    }

    /// Counts, dead-letters and releases deliveries that were routed but could not be queued.
    pub async fn dropped(&self, dropped: Vec<Dropped>) {
        if dropped.is_empty() {
            return;
        }
        for drop in &dropped {
            self.drop_one(&drop.session, &drop.delivery, drop.reason);
        }
        let ops = dropped
            .iter()
            .filter_map(|drop| ops::release(drop.session.store_id, &drop.delivery, true))
            .collect();
        self.write_behind(ops).await;
    }

    /// Hands deliveries that came through shared subscriptions of `from` (whose client went
    /// away) to other members of their groups. Returns the deliveries no other member could
    /// take.
    ///
    /// A stored delivery's reference moves with it: the new member's own `queue` entry is
    /// written and the old delivery masked (or its entry deleted) in one batch, before the new
    /// member can see it.
    pub async fn hand_over_shared(
        &self,
        from: &SessionHandle,
        deliveries: Vec<Delivery>,
    ) -> Vec<Delivery> {
        let mut left = Vec::new();
        let mut moves = Vec::new();
        let from_store = from.store_id;
        let mut batch = Vec::new();
        for old in deliveries {
            let rerouted = old
                .share
                .as_deref()
                .and_then(|share| self.router.reroute_shared(share, &old.message, from));
            let Some((session, options)) = rerouted else {
                left.push(old);
                continue;
            };
            let mut delivery = Delivery::new(
                old.message.clone(),
                old.message.qos.min(options.qos),
                old.retain,
                options.subscription_id.into_iter().collect(),
                session.next_seq(),
            );
            delivery.share = old.share.clone();
            match &old.stored {
                Some(stored) if session.is_persistent() && delivery.qos != QoS::AtMostOnce => {
                    delivery.stored = Some(stored.clone());
                    delivery.own_entry = true;
                    batch.push(ops::queue_put(session.store_id, &delivery, false));
                    batch.extend(ops::release(from_store, &old, false));
                }
                _ => batch.extend(ops::release(from_store, &old, true)),
            }
            moves.push((session, delivery, old));
        }
        // One batch for every move: a member leaving with a long queue costs one storage round
        // trip.
        if let Err(error) = self.write(batch).await {
            tracing::error!(%error, "shared deliveries not handed over: storage failed");
            left.extend(moves.into_iter().map(|(_, _, old)| old));
            return left;
        }
        if !moves.is_empty() {
            metrics::shared_redelivered(moves.len());
        }
        let mut dropped = Vec::new();
        for (session, delivery, _) in moves {
            let policy = self.router.policy_for(&delivery.message.topic);
            dropped.extend(self.router.enqueue(&session, delivery, policy));
        }
        self.dropped(dropped).await;
        left
    }

    /// Reads back the messages of `session`'s spilled deliveries (its client is back).
    /// Deliveries whose record is gone are released.
    pub async fn unspill(&self, session: &SessionHandle) -> Result<(), StorageError> {
        let mut ids = session.mailbox.unspill();
        if ids.is_empty() || !self.store.is_durable() {
            return Ok(());
        }
        ids.sort_unstable();
        ids.dedup();
        let store = self.store.clone();
        let read = tokio::task::spawn_blocking(move || store.read_messages(&ids))
            .await
            .map_err(|error| StorageError::Rocks(error.to_string().into()))??;
        let messages = read
            .into_iter()
            .map(|(id, message)| (id, Arc::new(message)))
            .collect();
        let lost = session.mailbox.refill(&messages);
        if !lost.is_empty() {
            tracing::warn!(count = lost.len(), "queued messages missing from storage");
            self.release(session.store_id, &lost).await;
        }
        Ok(())
    }

    /// Rewrites the record of an offline session whose delayed will was just published,
    /// without the will, so a restart does not publish it again.
    pub async fn forget_will(&self, session: &SessionHandle) {
        if !self.is_durable() || !session.is_persistent() || session.is_ended() {
            return;
        }
        let op = {
            let inner = session.inner();
            ops::session_put(
                &session.client_id,
                session.store_id,
                inner.protocol_level,
                inner.expiry_interval,
                inner.disconnected_at,
                None,
            )
        };
        self.write_behind(vec![op]).await;
    }

    /// Ends sessions for good: their subscriptions leave the router, their storage goes (the
    /// message records only they still referenced included), and their wills are published.
    pub async fn finish_ended_sessions(&self, ended: Vec<EndedSession>) {
        for session in ended {
            for filter in &session.filters {
                self.router.unsubscribe_session(&session.handle, filter);
            }
            let mut batch = Vec::new();
            for delivery in &session.deliveries {
                if let Some(stored) = &delivery.stored {
                    batch.push(ops::release_reference(
                        stored,
                        session.store_id,
                        delivery.seq,
                    ));
                }
            }
            if session.was_persistent {
                ops::forget_session(&session.client_id, session.store_id, &mut batch);
            }
            self.write_behind(batch).await;
            if let Some(will) = session.will {
                self.publish(will).await;
            }
        }
    }
}

/// See [`Pipeline::plan`].
fn durable_ops(
    store: &dyn Store,
    message: &Arc<Message>,
    targets: &mut [Target],
    retained: bool,
) -> Vec<Op> {
    let mut batch = Vec::new();
    if retained && message.retain {
        batch.push(ops::retained(message));
    }
    let is_durable = |t: &Target| t.delivery.qos != QoS::AtMostOnce && t.session.is_persistent();
    let durable = targets.iter().filter(|t| is_durable(t)).count();
    if durable == 0 {
        return batch;
    }
    let stored = Arc::new(StoredMessage::new(store.next_message_id(), durable));
    batch.push(ops::message_put(
        &stored,
        message,
        durable,
        targets
            .iter()
            .filter(|t| is_durable(t))
            .map(|t| (t.session.store_id, &t.delivery)),
    ));
    for target in targets.iter_mut().filter(|t| is_durable(t)) {
        target.delivery.stored = Some(stored.clone());
        target.delivery.listed = true;
    }
    batch
}

/// The delivery reached PUBREC: after a restart only PUBREL may be re-sent, never the message
/// (the client may already have passed it on and forgotten its packet id after PUBREL). The
/// delivery gets an entry of its own recording that.
pub fn pubrec_ops(store_id: u64, delivery: &mut Delivery) -> Vec<Op> {
    if delivery.stored.is_none() {
        return Vec::new();
    }
    delivery.own_entry = true;
    vec![ops::queue_put(store_id, delivery, true)]
}
