//! Which node a client id is connected to, and the persistent session's subscriptions.
//!
//! One key per client id in the sessions bucket, changed only by compare-and-set on the key's
//! revision. A CONNECT claims the key for its node; of two nodes claiming at once exactly one
//! write succeeds, and the other refuses its client (Server Busy / Server Unavailable), so a
//! client id is never connected to two nodes. The winner asks the previous owner, on that node's
//! control subject, to close the client's connection (DISCONNECT 0x8E) and stop routing to its
//! session; a previous owner that does not answer is gone, and the claim stands.
//!
//! The owning connection keeps the revision it wrote; its later writes (subscriptions,
//! disconnect) carry it, so a connection that lost its session cannot overwrite its successor's.

use std::sync::Arc;
use std::time::SystemTime;

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation};
use bytes::{BufMut, Bytes};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{subject, Cluster, ClusterError};
use crate::clock::{self, from_unix_ms, unix_ms};
use crate::metrics;
use crate::protocol::SubscriptionOptions;
use crate::session::NEVER_EXPIRES;
use crate::storage::{decode_subscription, encode_subscription};
use crate::sync::lock;

const RECORD_VERSION: u8 = 1;

/// Reads and compare-and-sets a claim tries before a CONNECT is refused as a conflict.
const CLAIM_ATTEMPTS: u32 = 3;

/// A claim that failed faster than this is tried again (see [`Cluster::claim`]).
const QUICK_FAILURE: std::time::Duration = std::time::Duration::from_millis(500);

/// A session as the cluster knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SessionRecord {
    node: String,
    client_id: String,
    connected: bool,
    expiry_interval: u32,
    disconnected_at: Option<SystemTime>,
    subscriptions: Vec<(String, SubscriptionOptions)>,
}

impl SessionRecord {
    /// The filters a persistent session's messages must be logged for (none for a clean
    /// session); a shared group's filter is what its messages match.
    fn persistent_filters(&self) -> Vec<String> {
        if self.expiry_interval == 0 {
            return Vec::new();
        }
        self.subscriptions
            .iter()
            .map(|(filter, _)| {
                filter
                    .strip_prefix("$share/")
                    .and_then(|rest| rest.split_once('/'))
                    .map_or(filter.as_str(), |(_, filter)| filter)
                    .to_owned()
            })
            .collect()
    }

    fn has_expired(&self, now: SystemTime) -> bool {
        if self.connected || self.expiry_interval == NEVER_EXPIRES {
            return false;
        }
        let Some(at) = self.disconnected_at else {
            return false;
        };
        at + std::time::Duration::from_secs(u64::from(self.expiry_interval)) <= now
    }

    fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(64);
        out.put_u8(RECORD_VERSION);
        put_string(&mut out, &self.node);
        put_string(&mut out, &self.client_id);
        out.put_u8(u8::from(self.connected));
        out.put_u32(self.expiry_interval);
        out.put_u64(self.disconnected_at.map_or(0, unix_ms));
        out.put_u32(self.subscriptions.len() as u32);
        for (filter, options) in &self.subscriptions {
            put_string(&mut out, filter);
            let options = encode_subscription(options);
            out.put_u16(options.len() as u16);
            out.extend_from_slice(&options);
        }
        out.into()
    }

    fn decode(data: &[u8]) -> Option<Self> {
        let mut r = data;
        if take(&mut r, 1)?[0] != RECORD_VERSION {
            return None;
        }
        let node = get_string(&mut r)?;
        let client_id = get_string(&mut r)?;
        let connected = take(&mut r, 1)?[0] != 0;
        let expiry_interval = u32::from_be_bytes(take(&mut r, 4)?.try_into().ok()?);
        let at = u64::from_be_bytes(take(&mut r, 8)?.try_into().ok()?);
        let count = u32::from_be_bytes(take(&mut r, 4)?.try_into().ok()?);
        let mut subscriptions = Vec::new();
        for _ in 0..count {
            let filter = get_string(&mut r)?;
            let len = u16::from_be_bytes(take(&mut r, 2)?.try_into().ok()?);
            let options = decode_subscription(take(&mut r, usize::from(len))?).ok()?;
            subscriptions.push((filter, options));
        }
        r.is_empty().then_some(Self {
            node,
            client_id,
            connected,
            expiry_interval,
            disconnected_at: (at != 0).then(|| from_unix_ms(at)),
            subscriptions,
        })
    }
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    out.put_u16(text.len() as u16);
    out.extend_from_slice(text.as_bytes());
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (head, tail) = data.split_at(n);
    *data = tail;
    Some(head)
}

fn get_string(data: &mut &[u8]) -> Option<String> {
    let len = u16::from_be_bytes(take(data, 2)?.try_into().ok()?);
    String::from_utf8(take(data, usize::from(len))?.to_vec()).ok()
}

/// A connection's hold on its session's key: the revision it last wrote.
#[derive(Debug)]
pub struct Ownership {
    key: String,
    revision: u64,
    /// The revision its claim wrote, which names the claim in [`Cluster::settle_claim`].
    claimed: u64,
}

impl Ownership {
    pub fn claimed_revision(&self) -> u64 {
        self.claimed
    }
}

/// A claim this node made, until its connection ends: what a takeover request from another
/// node is checked against.
#[derive(Debug)]
pub(super) struct LocalClaim {
    /// The revision the claim wrote; `None` while its write is on its way. A request that
    /// arrives then (another node read the write before this node heard it succeed) waits.
    revision: Option<u64>,
    /// Whether the connection has attached its session (before, there is nothing to close).
    attached: bool,
}

/// A successful claim.
#[derive(Debug)]
pub struct Claimed {
    pub ownership: Ownership,
    /// The subscriptions of the session the cluster knows for this client id, when it is to be
    /// resumed (not expired, no Clean Start).
    pub subscriptions: Option<Vec<(String, SubscriptionOptions)>>,
    /// Whether another node held the session: what this node has of it is from an earlier
    /// visit and out of date.
    pub moved: bool,
    /// The session's recorded position in the replication log, when it is resumed: what
    /// comes after it is replayed if this node does not hold the session's queue.
    pub position: Option<crate::session::Position>,
}

#[derive(Debug, PartialEq, Eq)]
enum TakeoverAction {
    Ignore,
    /// This node's claim is still attaching its session: wait for it, then give up.
    WaitForAttach,
    GiveUp,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("another node claimed the client id at the same time")]
    Conflict,
    #[error("the cluster cannot be reached: {0}")]
    Unavailable(String),
}

impl Cluster {
    /// A record naming this node as the owner; connected unless `disconnected_at` is given.
    fn record(
        &self,
        client_id: &str,
        expiry_interval: u32,
        disconnected_at: Option<SystemTime>,
        subscriptions: Vec<(String, SubscriptionOptions)>,
    ) -> SessionRecord {
        SessionRecord {
            node: self.node.to_string(),
            client_id: client_id.to_string(),
            connected: disconnected_at.is_none(),
            expiry_interval,
            disconnected_at,
            subscriptions,
        }
    }

    fn control_subject(&self, node: &str) -> String {
        format!("{}.ctl.{}", self.base, subject::token(node))
    }

    /// Makes this node the owner of `client_id`'s session; see the module documentation.
    pub async fn claim(
        &self,
        client_id: &str,
        clean_start: bool,
        expiry_interval: u32,
    ) -> Result<Claimed, ClaimError> {
        // A conflict is often a write that just finished: the previous connection recording its
        // disconnect, or another node's claim. Read again and retry, a few times, before the
        // client is told the server is busy.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let started = tokio::time::Instant::now();
            match self
                .claim_once(client_id, clean_start, expiry_interval)
                .await
            {
                Err(ClaimError::Conflict) if attempts < CLAIM_ATTEMPTS => continue,
                // A quick error is often a passing one (a stream leader changing, an answer
                // crossed with the previous connection's last write); one that took long is
                // an outage, which the client is told of at once.
                Err(ClaimError::Unavailable(error))
                    if attempts < CLAIM_ATTEMPTS && started.elapsed() < QUICK_FAILURE =>
                {
                    debug!(%client_id, %error, "claim failed quickly; trying again");
                    tokio::time::sleep(QUICK_FAILURE / 10 * attempts).await;
                    continue;
                }
                Err(ClaimError::Conflict) => {
                    metrics::cluster_ownership_conflict();
                    return Err(ClaimError::Conflict);
                }
                other => return other,
            }
        }
    }

    async fn claim_once(
        &self,
        client_id: &str,
        clean_start: bool,
        expiry_interval: u32,
    ) -> Result<Claimed, ClaimError> {
        if !self.is_linked() {
            return Err(ClaimError::Unavailable("NATS link down".into()));
        }
        let unavailable = |e: &dyn std::fmt::Display| {
            metrics::cluster_error("claim");
            ClaimError::Unavailable(e.to_string())
        };
        let key = subject::key(client_id);
        let now = clock::now();
        let current = self
            .sessions
            .entry(&key)
            .await
            .map_err(|e| unavailable(&e))?;
        let previous = current
            .as_ref()
            .filter(|entry| entry.operation == Operation::Put)
            .and_then(|entry| SessionRecord::decode(&entry.value))
            .filter(|record| record.client_id == client_id);
        let carried = previous
            .as_ref()
            .filter(|record| !clean_start && !record.has_expired(now))
            .map(|record| record.subscriptions.clone());
        let record = self.record(
            client_id,
            expiry_interval,
            None,
            carried.clone().unwrap_or_default(),
        );
        // Registered before the write: see `LocalClaim::revision`.
        lock(&self.claims).insert(
            client_id.into(),
            LocalClaim {
                revision: None,
                attached: false,
            },
        );
        let written = match &current {
            None => self
                .sessions
                .create(&key, record.encode())
                .await
                .map_err(|e| {
                    if e.kind() == CreateErrorKind::AlreadyExists {
                        ClaimError::Conflict
                    } else {
                        unavailable(&e)
                    }
                }),
            Some(entry) => self
                .sessions
                .update(&key, record.encode(), entry.revision)
                .await
                .map_err(|e| {
                    if e.kind() == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision {
                        ClaimError::Conflict
                    } else {
                        unavailable(&e)
                    }
                }),
        };
        {
            let mut claims = lock(&self.claims);
            let pending = claims
                .get_mut(client_id)
                .filter(|claim| claim.revision.is_none());
            match (&written, pending) {
                (Ok(revision), Some(claim)) => claim.revision = Some(*revision),
                (Err(_), Some(_)) => {
                    claims.remove(client_id);
                }
                _ => {}
            }
        }
        self.claims_settled.notify_waiters();
        let revision = written?;
        let from_elsewhere = previous.as_ref().filter(|p| *p.node != *self.node);
        if let Some(previous) = from_elsewhere {
            metrics::cluster_takeover("from");
            self.tell_previous_owner(&previous.node, client_id, revision, clean_start)
                .await;
            // Back before the previous node's will was published: it is not [MQTT-3.1.3-9].
            self.drop_will_of(&previous.node, client_id).await;
        }
        // Read once the previous owner has let go: its last write of the position is in.
        let position = match &carried {
            Some(_) => self
                .position_of(client_id)
                .await
                .map_err(|e| unavailable(&e))?,
            None => None,
        };
        if position.is_none() && expiry_interval > 0 {
            self.start_position(client_id)
                .await
                .map_err(|e| unavailable(&e))?;
        }
        Ok(Claimed {
            ownership: Ownership {
                key,
                revision,
                claimed: revision,
            },
            subscriptions: carried,
            moved: from_elsewhere.is_some(),
            position,
        })
    }

    /// Whether `client_id` is connected again since `node` held it: its record names another
    /// node and says connected.
    pub(super) async fn came_back(&self, client_id: &str, node: &str) -> bool {
        let Ok(Some(entry)) = self.sessions.entry(subject::key(client_id)).await else {
            return false;
        };
        SessionRecord::decode(&entry.value)
            .is_some_and(|record| record.connected && record.node != node)
    }

    /// Called once the claiming connection has attached its session: a takeover request that
    /// arrived in between (see [`takeover`]) may now close it.
    pub fn settle_claim(&self, client_id: &str, claimed: u64) {
        if let Some(claim) = lock(&self.claims).get_mut(client_id) {
            if claim.revision == Some(claimed) {
                claim.attached = true;
            }
        }
        self.claims_settled.notify_waiters();
    }

    /// Closes the client's connection here (DISCONNECT 0x8E) and stops routing to its
    /// session: another node owns it now. With `discard` (the new connection asked for a Clean
    /// Start) the session ends here too, queue included [MQTT-3.1.2-4]; otherwise what it
    /// queued stays, for the client to collect if it comes back to this node.
    pub async fn give_up_session(&self, client_id: &str, discard: bool) {
        if let Some((session, filters)) = self.registry.hand_to_other_node(client_id).await {
            // Its connection is closed: a last write of its position, which the new owner
            // reads once this returns, and from then on the position is the new owner's.
            if let Err(error) = self.write_position(&session, true).await {
                debug!(%error, %client_id, "last position not written");
            }
            session.log().set_owned_here(false);
            // A pending will of the session is the new owner's to cancel or keep.
            self.forget_will(client_id).await;
            for filter in &filters {
                self.router.unsubscribe_session(&session, filter);
            }
            metrics::cluster_takeover("to");
            info!(%client_id, discard, "session taken over by another node");
        }
        if discard {
            if let Some(ended) = self.registry.discard(client_id) {
                self.pipeline.finish_ended_sessions(vec![ended]).await;
            }
        }
    }

    /// A takeover request for `client_id` from the node whose claim wrote `revision`: what this
    /// node must do about it.
    fn takeover_requested(&self, client_id: &str, revision: u64) -> TakeoverAction {
        let mut claims = lock(&self.claims);
        match claims.get_mut(client_id) {
            // This node claimed the client id again after that claim: the request is stale.
            Some(claim) if claim.revision.is_some_and(|own| own > revision) => {
                TakeoverAction::Ignore
            }
            Some(claim) if !claim.attached => TakeoverAction::WaitForAttach,
            Some(_) => {
                claims.remove(client_id);
                TakeoverAction::GiveUp
            }
            None => TakeoverAction::GiveUp,
        }
    }

    async fn tell_previous_owner(&self, node: &str, client_id: &str, revision: u64, discard: bool) {
        let mut payload = Vec::with_capacity(9 + client_id.len());
        payload.put_u64(revision);
        payload.put_u8(u8::from(discard));
        payload.extend_from_slice(client_id.as_bytes());
        let request = self
            .client
            .request(self.control_subject(node), payload.into());
        match tokio::time::timeout(self.request_timeout, request).await {
            Ok(Ok(_)) => debug!(%client_id, %node, "previous owner released the session"),
            // No responders: that node is gone; its clients reconnect elsewhere.
            Ok(Err(error)) => debug!(%error, %client_id, %node, "previous owner did not answer"),
            Err(_) => {
                warn!(%client_id, %node, "previous owner did not release the session in time")
            }
        }
    }

    /// Records the session's subscriptions (a persistent session's, after SUBSCRIBE or
    /// UNSUBSCRIBE). Fails quietly when the session was taken over meanwhile.
    pub async fn record_subscriptions(
        &self,
        client_id: &str,
        ownership: &mut Ownership,
        expiry_interval: u32,
        subscriptions: Vec<(String, SubscriptionOptions)>,
    ) {
        let record = self.record(client_id, expiry_interval, None, subscriptions);
        // Known here before SUBACK, not only once the record's watch brings it back: this
        // node logs what matches from the start (other nodes follow within the watch's delay).
        self.persistent
            .set(&ownership.key, record.persistent_filters());
        self.update(ownership, record).await;
    }

    /// The connection ended: a session that ends with it is removed, a persistent one is
    /// recorded as disconnected (its expiry counts from now).
    pub async fn disconnected(
        &self,
        client_id: &str,
        mut ownership: Ownership,
        expiry_interval: u32,
        subscriptions: Vec<(String, SubscriptionOptions)>,
    ) {
        {
            let mut claims = lock(&self.claims);
            if claims
                .get(client_id)
                .is_some_and(|claim| claim.revision == Some(ownership.claimed))
            {
                claims.remove(client_id);
            }
        }
        if expiry_interval == 0 {
            if let Err(error) = self
                .sessions
                .delete_expect_revision(&ownership.key, Some(ownership.revision))
                .await
            {
                debug!(%error, %client_id, "session record not removed (taken over?)");
            }
            return;
        }
        let record = self.record(
            client_id,
            expiry_interval,
            Some(clock::now()),
            subscriptions,
        );
        self.update(&mut ownership, record).await;
    }

    async fn update(&self, ownership: &mut Ownership, record: SessionRecord) {
        match self
            .sessions
            .update(&ownership.key, record.encode(), ownership.revision)
            .await
        {
            Ok(revision) => ownership.revision = revision,
            Err(error) => {
                debug!(%error, client_id = %record.client_id, "session record not updated (taken over?)")
            }
        }
    }
}

/// Hands `client_id`'s session to the node whose claim wrote `revision`. The requester
/// answers its client only after this returns, so the connection here is closed before the
/// new one is acknowledged, also when the request arrives while this node's own claim is
/// still attaching its session.
async fn takeover(cluster: &Cluster, client_id: &str, revision: u64, discard: bool) {
    let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
    loop {
        let settled = cluster.claims_settled.notified();
        let mut settled = std::pin::pin!(settled);
        settled.as_mut().enable();
        match cluster.takeover_requested(client_id, revision) {
            TakeoverAction::Ignore => return,
            TakeoverAction::GiveUp => break,
            TakeoverAction::WaitForAttach => {
                if tokio::time::timeout_at(deadline, settled).await.is_err() {
                    lock(&cluster.claims).remove(client_id);
                    break;
                }
            }
        }
    }
    cluster.give_up_session(client_id, discard).await;
}

/// How long a takeover request waits for a claim of this node to attach its session.
const TAKEOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Answers other nodes' takeovers: closes the client's connection here and stops routing to
/// its session.
pub(super) async fn serve_control(
    cluster: Arc<Cluster>,
    shutdown: CancellationToken,
) -> Result<impl std::future::Future<Output = ()>, ClusterError> {
    let mut requests = cluster
        .subscribe_own(cluster.control_subject(&cluster.node))
        .await?;
    Ok(async move {
        // Takeovers of different client ids go on side by side: one waiting for a connection
        // to close must not hold up the others. Dropped (and aborted) with this task.
        let mut running = tokio::task::JoinSet::new();
        loop {
            let request = tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(_) = running.join_next(), if !running.is_empty() => continue,
                request = requests.next() => match request {
                    Some(request) => request,
                    None => return,
                },
            };
            // The new owner's claim revision, whether it started clean, the client id.
            let Some((revision, rest)) = request.payload.split_first_chunk::<8>() else {
                continue;
            };
            let Some((&discard, id)) = rest.split_first() else {
                continue;
            };
            let Ok(client_id) = std::str::from_utf8(id).map(str::to_owned) else {
                continue;
            };
            let revision = u64::from_be_bytes(*revision);
            let cluster = cluster.clone();
            running.spawn(async move {
                takeover(&cluster, &client_id, revision, discard != 0).await;
                if let Some(reply) = request.reply {
                    if let Err(error) = cluster.client.publish(reply, Bytes::new()).await {
                        debug!(%error, "takeover reply not sent");
                    }
                }
            });
        }
    })
}

impl Cluster {
    /// One session record, as the filters of a persistent session (none for a clean one, or
    /// a deleted record); see `mirror`.
    pub(super) fn note_session_record(&self, entry: &kv::Entry) {
        let filters = match entry.operation {
            Operation::Put => SessionRecord::decode(&entry.value)
                .map(|record| record.persistent_filters())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        self.persistent.set(&entry.key, filters);
    }
}

/// After a restart this node holds again, from its storage, the persistent sessions it had.
/// Those the cluster's record shows on another node now moved while this one was down: they
/// leave the router here (their stale queue stays until their client comes back here, which
/// replaces it), so that a session queues on one node only and its bounds hold cluster-wide.
/// Sessions a client of this node claimed since the start are left alone.
pub(super) async fn release_moved_sessions(cluster: Arc<Cluster>, shutdown: CancellationToken) {
    let mut released = 0usize;
    for session in cluster.registry.persistent_sessions() {
        if shutdown.is_cancelled() {
            return;
        }
        let record = match cluster
            .sessions
            .entry(subject::key(&session.client_id))
            .await
        {
            Ok(Some(entry)) => SessionRecord::decode(&entry.value),
            _ => None,
        };
        let Some(record) = record.filter(|record| record.client_id == *session.client_id) else {
            continue;
        };
        let claimed_here = session.is_online()
            || session.log_if_any().is_some_and(|log| log.is_owned_here())
            || lock(&cluster.claims).contains_key(&*session.client_id);
        if record.node == *cluster.node || claimed_here {
            continue;
        }
        if let Some((session, filters)) = cluster
            .registry
            .hand_to_other_node(&session.client_id)
            .await
        {
            for filter in &filters {
                cluster.router.unsubscribe_session(&session, filter);
            }
            released += 1;
        }
    }
    if released > 0 {
        info!(
            released,
            "stored sessions that moved to other nodes meanwhile no longer queue here"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{QoS, RetainHandling};

    #[test]
    fn a_record_round_trips_and_expires_after_its_interval() {
        let options = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: RetainHandling::SendIfNewSubscription,
            subscription_id: Some(7),
        };
        let at = clock::now();
        let record = SessionRecord {
            node: "n1".into(),
            client_id: "client/ü".into(),
            connected: false,
            expiry_interval: 60,
            disconnected_at: Some(at),
            subscriptions: vec![("a/#".into(), options.clone()), ("b".into(), options)],
        };
        let decoded = SessionRecord::decode(&record.encode()).expect("decodes");
        assert_eq!(decoded.subscriptions, record.subscriptions);
        assert_eq!(decoded.client_id, record.client_id);
        assert!(!decoded.has_expired(at + std::time::Duration::from_secs(59)));
        assert!(decoded.has_expired(at + std::time::Duration::from_secs(61)));
        let mut truncated = record.encode().to_vec();
        truncated.pop();
        assert_eq!(SessionRecord::decode(&truncated), None);
    }
}
