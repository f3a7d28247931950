//! Direct delivery: a QoS 1/2 message for clean sessions only (no persistent session
//! subscribes to it, and it is not a persistent session's QoS 2 publish; see
//! `publish::Pipeline::is_logged`) is not replicated. Clean sessions' queues live and die with
//! their node, so replicas would keep nothing a subscriber could still get. Its publisher is
//! acknowledged once every other node has queued the message for its subscribers, just as a
//! single node acknowledges once it has queued one: one request per batch to each node's
//! subject `<prefix>.direct.<node>`, answered once the node delivered it to its sessions that
//! are not persistent.
//!
//! - **Batches.** Up to `log::ENTRY_SPAN` messages or `log::ENTRY_BYTES` go in one request,
//!   and at most [`IN_FLIGHT`] batches wait for their answers at once, answered in order.
//! - **Which nodes.** Those listed in `<prefix>_nodes` (see `wills`), followed by a watch. A
//!   node lists itself before it serves clients, and again if it finds itself unlisted (taken
//!   for dead while cut off from NATS).
//! - **A persistent session after all.** A node that finds a persistent session matching a
//!   message (this node's view of the session records had not caught up with a subscribe)
//!   answers "log it" for that message. This node then hands it to the replication log, whose
//!   answer the publisher waits for, and the persistent sessions get it from there.
//! - **A node that does not answer** (no responder: dead, or cut off from NATS while its
//!   clients are still connected to it; no answer within `cluster.request_timeout`; no link to
//!   NATS here): the batch goes through the replication log instead, so a node that was only
//!   cut off delivers it when it reads the log again, and without a quorum it is refused. Until
//!   this node takes a dead one for dead (three missed liveness checks, see `wills`), every
//!   batch goes through the log.
//! - **Order.** Requests leave in order on the node's one NATS connection and each node
//!   handles its subject in order. Each batch is numbered within the sender's epoch (within
//!   its run, random at each start), and a receiver takes only the next number: after a gap (a
//!   request lost while it was cut off) it refuses the batch, which then goes through the log
//!   too. Once a batch went through the log, every later one does, and no new one leaves, until
//!   the log answered them all. Then the sender starts a new epoch, whose first batch names the
//!   position of the last log entry the sender wrote; a receiver delivers it only once its own
//!   reading of the log is past that position. So nothing delivered directly overtakes what
//!   went through the log before it.
//! - **Once.** A message that went through the log after its batch went out carries the
//!   batch in its log entry. A node that took the batch delivers that copy only to its
//!   persistent sessions ([`Taken`]); one that had not takes nothing more of that epoch. So
//!   QoS 2 is exactly once, and QoS 1 gets no duplicate from a fall-back (tests
//!   `clean_qos{1,2}_across_nodes_survives_the_death_of_a_nats_server_...`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::{join_all, BoxFuture};
use futures_util::stream::{FuturesOrdered, FuturesUnordered};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{codec, log, subject, until_shutdown, Cluster, ClusterError};
use crate::clock;
use crate::metrics;
use crate::publish::{Replicate, ReplicationError, SentDirectly, Stored};
use crate::router::Reach;
use crate::sync::{lock, read, write};

/// Batches waiting for the other nodes' answers at once.
const IN_FLIGHT: usize = 32;

/// How long a node waits, at the start of a sender's new epoch, to have delivered the log up
/// to the position the sender names, before it refuses the batch (which then goes through the
/// log as well).
const BARRIER_WAIT: Duration = Duration::from_secs(1);

/// Epochs of one sender whose batches a node remembers taking: a log copy of a batch is read
/// before the next epoch starts (its barrier), unless the log answered its sender only after
/// the sender gave up waiting.
const EPOCHS_KEPT: usize = 8;

/// A node's answer for one message: queued for its subscribers (if any).
const QUEUED: u8 = 0;
/// A node's answer for one message: a persistent session there wants it, so it goes through
/// the replication log.
const LOG_IT: u8 = 1;

impl Cluster {
    fn direct_subject(&self, node: &str) -> String {
        format!("{}.direct.{}", self.base, subject::token(node))
    }

    /// One entry of the nodes bucket: a node listed (to deliver to, unless it is this one) or
    /// no longer; see `mirror`. The liveness checks go through the list too (see `wills`).
    pub(super) fn note_node(&self, entry: &kv::Entry) {
        let mut listed = write(&self.listed);
        let mut peers = write(&self.peers);
        match entry.operation {
            Operation::Put => {
                if let Ok(node) = std::str::from_utf8(&entry.value) {
                    let node: Arc<str> = node.into();
                    if node != self.node {
                        peers.insert(entry.key.clone(), node.clone());
                    }
                    listed.insert(entry.key.clone(), node);
                }
            }
            Operation::Delete | Operation::Purge => {
                peers.remove(&entry.key);
                listed.remove(&entry.key);
            }
        }
    }
}

/// What a request says before its messages: the sender's run (random at each start), its
/// epoch, the batch's number in it, and the log position the receiver must have delivered
/// first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    run: u64,
    epoch: u64,
    batch: u64,
    barrier: u64,
}

impl Header {
    const LEN: usize = 32;

    fn encode(self, frame: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(Self::LEN + frame.len());
        out.put_u64(self.run);
        out.put_u64(self.epoch);
        out.put_u64(self.batch);
        out.put_u64(self.barrier);
        out.put_slice(frame);
        out.freeze()
    }

    fn decode(data: &[u8]) -> Option<(Self, &[u8])> {
        let (run, rest) = data.split_first_chunk::<8>()?;
        let (epoch, rest) = rest.split_first_chunk::<8>()?;
        let (batch, rest) = rest.split_first_chunk::<8>()?;
        let (barrier, rest) = rest.split_first_chunk::<8>()?;
        let header = Self {
            run: u64::from_be_bytes(*run),
            epoch: u64::from_be_bytes(*epoch),
            batch: u64::from_be_bytes(*batch),
            barrier: u64::from_be_bytes(*barrier),
        };
        Some((header, rest))
    }
}

/// Where a receiving node is in one sender's epoch: the batches before `next` it took;
/// `closed` once the log brought a batch it had not taken (the sender gave up on the epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Received {
    run: u64,
    epoch: u64,
    next: u64,
    closed: bool,
}

/// What this node took of the other nodes' direct batches, by sender, latest epoch last. The
/// task answering them and the log's reader share it: a batch's log copy reaches only the
/// persistent sessions of a node that took the batch (it delivered the rest), and once the log
/// brought a batch a node had not taken, the node takes no more of that epoch.
#[derive(Debug, Default)]
pub(super) struct Taken(HashMap<String, VecDeque<Received>>);

impl Taken {
    /// Whether the batch `header` from `origin` is the next one to take (see [`takes`]).
    fn would_take(&self, origin: &str, header: Header) -> bool {
        takes(
            self.0.get(origin).and_then(|epochs| epochs.back().copied()),
            header,
        )
    }

    /// Takes the batch `header` from `origin` if it is the next one; returns whether it did.
    fn take(&mut self, origin: &str, header: Header) -> bool {
        if !self.would_take(origin, header) {
            return false;
        }
        let epochs = self.0.entry(origin.to_owned()).or_default();
        match epochs.back_mut() {
            Some(at) if at.run == header.run && at.epoch == header.epoch => at.next += 1,
            _ => remember(
                epochs,
                Received {
                    run: header.run,
                    epoch: header.epoch,
                    next: header.batch + 1,
                    closed: false,
                },
            ),
        }
        true
    }

    /// Whether this node took the batch `sent` from `origin`, whose copy the log brings. If it
    /// did not, it never will: that epoch is closed here.
    pub(super) fn took(&mut self, origin: &str, sent: SentDirectly) -> bool {
        let epochs = self.0.entry(origin.to_owned()).or_default();
        let same = |at: &&mut Received| at.run == sent.run && at.epoch == sent.epoch;
        if let Some(at) = epochs.iter_mut().find(same) {
            if sent.batch < at.next {
                return true;
            }
            at.closed = true;
            return false;
        }
        let newer_known = epochs
            .iter()
            .any(|at| at.run == sent.run && at.epoch > sent.epoch);
        if !newer_known {
            remember(
                epochs,
                Received {
                    run: sent.run,
                    epoch: sent.epoch,
                    next: 0,
                    closed: true,
                },
            );
        }
        false
    }
}

/// Adds a sender's newest epoch, forgetting its oldest past [`EPOCHS_KEPT`].
fn remember(epochs: &mut VecDeque<Received>, at: Received) {
    epochs.push_back(at);
    if epochs.len() > EPOCHS_KEPT {
        epochs.pop_front();
    }
}

/// Whether a receiver takes the batch `header` from a sender it is at `at` with: the next
/// batch of the same epoch, or the first batch of a newer epoch (or of any, from a sender it
/// has not heard of, or that started again). Anything else is refused: after a gap (a batch
/// lost on its way, or not sent while this node was cut off) the sender sends the missing
/// batch through the log, and nothing delivered here may overtake it.
fn takes(at: Option<Received>, header: Header) -> bool {
    match at {
        Some(at) if at.run == header.run && at.epoch == header.epoch => {
            !at.closed && header.batch == at.next
        }
        Some(at) if at.run == header.run => header.epoch > at.epoch && header.batch == 0,
        _ => header.batch == 0,
    }
}

/// Answers the other nodes' direct deliveries. Subscribed before this node lists itself among
/// the nodes, so no node sends to it before it listens.
pub(super) async fn serve(
    cluster: Arc<Cluster>,
    shutdown: CancellationToken,
) -> Result<impl std::future::Future<Output = ()>, ClusterError> {
    let mut requests = cluster
        .subscribe_own(cluster.direct_subject(&cluster.node))
        .await?;
    Ok(async move {
        while let Some(request) = until_shutdown(&shutdown, requests.next()).await {
            let Some(reply) = request.reply else {
                continue;
            };
            let answers = cluster
                .receive_direct(&request.payload, &shutdown)
                .await
                // Not one answer per message: the sender sends the batch through the log.
                .unwrap_or_default();
            if let Err(error) = cluster.client.publish(reply, Bytes::from(answers)).await {
                debug!(%error, "direct delivery not answered");
            }
        }
    })
}

impl Cluster {
    /// Delivers one direct batch here, in order after what its sender sent before, to the
    /// sessions that are not persistent; returns the answer per message, or `None` if the
    /// batch is refused.
    async fn receive_direct(
        &self,
        payload: &[u8],
        shutdown: &CancellationToken,
    ) -> Option<Vec<u8>> {
        let Some((header, (origin, received))) = Header::decode(payload)
            .and_then(|(header, frame)| Some((header, log::unframe(frame)?)))
        else {
            metrics::cluster_forward_dropped("undecodable");
            return None;
        };
        if !lock(&self.direct_taken).would_take(origin, header) {
            debug!(%origin, ?header, "direct batch out of sequence: through the log");
            return None;
        }
        if header.batch == 0 && !self.applied(header.barrier, shutdown).await {
            debug!(%origin, ?header, "log not delivered up to the barrier: through the log");
            return None;
        }
        // Again: meanwhile the log may have brought a batch of this epoch this node had not
        // taken.
        if !lock(&self.direct_taken).take(origin, header) {
            debug!(%origin, ?header, "direct batch's epoch closed: through the log");
            return None;
        }
        let mut answers = Vec::with_capacity(received.len());
        for received in received {
            let message = Arc::new(received.message);
            // Persistent sessions get it from the log, where it then goes; the others here
            // get it now, and not again from the log.
            answers.push(if self.persistent.matches(&message.topic) {
                LOG_IT
            } else {
                QUEUED
            });
            if let Ok(lag) = clock::now().duration_since(received.sent_at) {
                metrics::cluster_forward_lag(lag.as_secs_f64());
            }
            metrics::cluster_forwarded(metrics::IN);
            self.pipeline
                .publish_remote(message, Reach::PlainNotPersistent)
                .await;
        }
        Some(answers)
    }

    /// Waits until this node delivered the log up to `position` (a sender's entries that must
    /// come before its next direct batch), for at most [`BARRIER_WAIT`].
    async fn applied(&self, position: u64, shutdown: &CancellationToken) -> bool {
        let deadline = tokio::time::Instant::now() + BARRIER_WAIT;
        loop {
            let advanced = self.log_advanced.notified();
            tokio::pin!(advanced);
            advanced.as_mut().enable();
            if self.log_applied.load(Ordering::Acquire) >= position {
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep_until(deadline) => return false,
                _ = advanced => {}
            }
        }
    }
}

/// Hands each QoS 1/2 message the log does not carry to the other nodes, and answers its
/// publisher, in order, once they all queued it (or the log stored it, see the module's
/// documentation).
pub(super) async fn send(
    cluster: Arc<Cluster>,
    mut requests: mpsc::Receiver<Replicate>,
    shutdown: CancellationToken,
) {
    let mut link = Link {
        cluster,
        in_flight: FuturesOrdered::new(),
        logging: FuturesUnordered::new(),
        falling_back: false,
        run: super::random_start(),
        epoch: 0,
        batch: 0,
        barrier: 0,
    };
    let mut queued = VecDeque::new();
    loop {
        while !link.falling_back && !queued.is_empty() && link.in_flight.len() < IN_FLIGHT {
            while queued.len() < log::ENTRY_SPAN as usize {
                match requests.try_recv() {
                    Ok(request) => queued.push_back(request),
                    Err(_) => break,
                }
            }
            let batch = take_batch(&mut queued);
            let started = link.start(batch);
            link.in_flight.push_back(started);
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(settled) = link.in_flight.next(), if !link.in_flight.is_empty() => {
                link.settle(settled).await;
            }
            Some(()) = link.logging.next(), if !link.logging.is_empty() => {}
            request = requests.recv(), if queued.is_empty() && !link.falling_back => {
                let Some(request) = request else { break };
                queued.push_back(request);
            }
        }
        link.resume_when_logged();
    }
    // What is still waiting is answered "not stored" as its senders drop.
}

/// This node's side of direct delivery: the batches waiting for answers, and, after a batch
/// went through the log for want of an answer, those log writes.
struct Link {
    cluster: Arc<Cluster>,
    in_flight: FuturesOrdered<BoxFuture<'static, Settled>>,
    /// Batches sent through the log because a node did not answer, until the log answered.
    logging: FuturesUnordered<BoxFuture<'static, ()>>,
    /// A batch went through the log for want of an answer: every later one does too, and no
    /// new batch goes out, until the log answered them all. Then a new epoch starts, whose
    /// first batch carries the log position the receivers must have delivered first.
    falling_back: bool,
    run: u64,
    epoch: u64,
    batch: u64,
    barrier: u64,
}

impl Link {
    /// Sends one batch to every other node and returns the future of their answers.
    fn start(
        &mut self,
        (requests, encoded): (Vec<Replicate>, Vec<Bytes>),
    ) -> BoxFuture<'static, Settled> {
        let cluster = &self.cluster;
        let peers: Vec<Arc<str>> = read(&cluster.peers).values().cloned().collect();
        let count = requests.len();
        if peers.is_empty() || !cluster.is_linked() {
            // Without NATS no other node can be told: the log refuses it at once.
            let outcome = if peers.is_empty() {
                Outcome::Queued
            } else {
                Outcome::Unanswered
            };
            return futures_util::future::ready(Settled {
                requests,
                sent: None,
                outcome,
            })
            .boxed();
        }
        let header = Header {
            run: self.run,
            epoch: self.epoch,
            batch: self.batch,
            barrier: self.barrier,
        };
        self.batch += 1;
        let sent = Some(SentDirectly {
            run: header.run,
            epoch: header.epoch,
            batch: header.batch,
        });
        let payload = header.encode(&log::frame(&cluster.node, &encoded));
        let asked = peers.into_iter().map(|peer| {
            let client = cluster.client.clone();
            let subject = cluster.direct_subject(&peer);
            let payload = payload.clone();
            let timeout = cluster.request_timeout;
            async move {
                let answer = tokio::time::timeout(timeout, client.request(subject, payload)).await;
                (peer, answer)
            }
        });
        let asked = join_all(asked);
        async move {
            let mut log_it = vec![false; count];
            for (peer, answer) in asked.await {
                let failure = match answer {
                    Ok(Ok(reply)) if reply.payload.len() == count => {
                        for (wanted, answer) in log_it.iter_mut().zip(reply.payload.iter()) {
                            *wanted |= *answer == LOG_IT;
                        }
                        continue;
                    }
                    Ok(Ok(_)) => "batch refused".to_string(),
                    Ok(Err(error)) => error.to_string(),
                    Err(_) => "no answer in time".to_string(),
                };
                // Dead, or only cut off from NATS for a while, or slow: its clients may still
                // be there, and the log brings the batch to them once it reads it.
                debug!(%peer, failure, "direct delivery goes through the log");
                return Settled {
                    requests,
                    sent,
                    outcome: Outcome::Unanswered,
                };
            }
            let outcome = if log_it.contains(&true) {
                Outcome::LogSome(log_it)
            } else {
                Outcome::Queued
            };
            Settled {
                requests,
                sent,
                outcome,
            }
        }
        .boxed()
    }

    /// Answers a batch's publishers, in order: queued everywhere, or handed to the
    /// replication log, which answers instead.
    async fn settle(&mut self, settled: Settled) {
        let Settled {
            requests,
            sent,
            outcome,
        } = settled;
        if !matches!(outcome, Outcome::Queued) {
            // Also when only some messages go through the log: the nodes' memory of the
            // batches they took then spans the epochs whose log copies they may still read.
            self.falling_back = true;
        }
        let log_it = match outcome {
            _ if self.falling_back => vec![true; requests.len()],
            Outcome::Queued => vec![false; requests.len()],
            Outcome::LogSome(log_it) => log_it,
            Outcome::Unanswered => vec![true; requests.len()],
        };
        for (mut request, log_it) in requests.into_iter().zip(log_it) {
            if !log_it {
                metrics::cluster_direct(metrics::DIRECT_QUEUED);
                let _ = request.done.send(Ok(Stored::New));
                continue;
            }
            metrics::cluster_direct(metrics::DIRECT_LOGGED);
            request.logged = true;
            request.sent_directly = sent;
            if self.falling_back {
                // Its answer is awaited here too, to know when the log has them all.
                let (done, answered) = oneshot::channel();
                let publisher = std::mem::replace(&mut request.done, done);
                self.logging.push(
                    async move {
                        let outcome = answered.await.unwrap_or_else(|_| {
                            Err(ReplicationError::replicas("the cluster link closed"))
                        });
                        let _ = publisher.send(outcome);
                    }
                    .boxed(),
                );
            }
            // A closed link drops the request, and with it `done`: not stored.
            let _ = self.cluster.replication.send(request).await;
        }
    }

    /// Once every batch of the old epoch is answered and the log holds what went through it,
    /// direct delivery resumes in a new epoch, behind those log entries.
    fn resume_when_logged(&mut self) {
        if self.falling_back && self.in_flight.is_empty() && self.logging.is_empty() {
            self.falling_back = false;
            self.epoch += 1;
            self.batch = 0;
            self.barrier = self.cluster.log_written.load(Ordering::Acquire);
        }
    }
}

/// What the other nodes answered for a batch.
enum Outcome {
    /// Every node queued every message.
    Queued,
    /// Every node answered; those marked go through the log (a node has a persistent session
    /// for them).
    LogSome(Vec<bool>),
    /// Some node did not answer, or refused the batch: all of it goes through the log.
    Unanswered,
}

/// A batch and what the other nodes answered.
struct Settled {
    requests: Vec<Replicate>,
    /// The batch as it went out, if it did.
    sent: Option<SentDirectly>,
    outcome: Outcome,
}

/// Takes from the front of `queued` what one request carries, encoded.
fn take_batch(queued: &mut VecDeque<Replicate>) -> (Vec<Replicate>, Vec<Bytes>) {
    let now = clock::now();
    let mut requests = Vec::new();
    let mut encoded = Vec::new();
    let mut bytes = 0;
    while let Some(next) = queued.front() {
        let message = codec::encode(&next.message, now);
        let full = encoded.len() as u64 >= log::ENTRY_SPAN
            || (!encoded.is_empty() && bytes + message.len() > log::ENTRY_BYTES);
        if full {
            break;
        }
        bytes += message.len();
        encoded.push(message);
        requests.extend(queued.pop_front());
    }
    (requests, encoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::protocol::QoS;
    use tokio::sync::oneshot;

    fn request(payload_len: usize) -> Replicate {
        let message = Message::new(
            "t".into(),
            vec![0; payload_len].into(),
            QoS::AtLeastOnce,
            false,
            Default::default(),
            None,
        );
        Replicate {
            message: Arc::new(message),
            logged: false,
            once: None,
            sent_directly: None,
            done: oneshot::channel().0,
        }
    }

    #[test]
    fn a_header_round_trips_ahead_of_its_frame() {
        let header = Header {
            run: 3,
            epoch: 1 << 60,
            batch: 7,
            barrier: 12_345,
        };
        let encoded = header.encode(b"frame");
        assert_eq!(Header::decode(&encoded), Some((header, &b"frame"[..])));
        assert_eq!(Header::decode(&encoded[..Header::LEN - 1]), None);
    }

    #[test]
    fn a_receiver_takes_the_next_batch_or_the_start_of_a_newer_epoch_only() {
        let header = |epoch, batch| Header {
            run: 1,
            epoch,
            batch,
            barrier: 0,
        };
        let at = Some(Received {
            run: 1,
            epoch: 5,
            next: 3,
            closed: false,
        });
        assert!(takes(at, header(5, 3)));
        assert!(!takes(at, header(5, 4)), "a gap: batch 3 was lost");
        assert!(!takes(at, header(5, 2)), "already delivered");
        assert!(takes(at, header(6, 0)));
        assert!(
            !takes(at, header(6, 1)),
            "a newer epoch starts at its first batch"
        );
        assert!(!takes(at, header(4, 0)), "an older epoch");
        let restarted = |batch| Header {
            run: 2,
            ..header(0, batch)
        };
        assert!(takes(at, restarted(0)), "a sender that started again");
        assert!(!takes(at, restarted(4)));
        let closed = at.map(|at| Received { closed: true, ..at });
        assert!(
            !takes(closed, header(5, 3)),
            "the log brought a later batch"
        );
        assert!(takes(closed, header(6, 0)));
        assert!(takes(None, header(9, 0)));
        assert!(
            !takes(None, header(9, 2)),
            "a sender first heard of mid-epoch"
        );
    }

    fn header(run: u64, epoch: u64, batch: u64) -> Header {
        Header {
            run,
            epoch,
            batch,
            barrier: 0,
        }
    }

    fn sent(run: u64, epoch: u64, batch: u64) -> SentDirectly {
        SentDirectly { run, epoch, batch }
    }

    #[test]
    fn a_log_copy_of_a_batch_taken_directly_is_known_and_others_close_their_epoch() {
        let mut taken = Taken::default();
        assert!(taken.take("a", header(1, 0, 0)));
        assert!(taken.take("a", header(1, 0, 1)));
        assert!(!taken.take("a", header(1, 0, 1)), "taken once");
        assert!(taken.took("a", sent(1, 0, 0)));
        assert!(taken.took("a", sent(1, 0, 1)));
        assert!(!taken.took("b", sent(1, 0, 1)), "another sender's");
        // The log brings batch 3 first: batch 2 was sent, 3 fell back, and neither is taken
        // after that, or this node would have both copies.
        assert!(!taken.took("a", sent(1, 0, 3)));
        assert!(!taken.take("a", header(1, 0, 2)));
        assert!(!taken.took("a", sent(1, 0, 2)));
        assert!(taken.took("a", sent(1, 0, 1)), "still known");
        // The next epoch starts afresh; the old one is still known.
        assert!(taken.take("a", header(1, 1, 0)));
        assert!(taken.took("a", sent(1, 1, 0)));
        assert!(taken.took("a", sent(1, 0, 0)));
        // A copy from an epoch not seen yet closes it before its first batch arrives.
        assert!(!taken.took("a", sent(1, 2, 0)));
        assert!(!taken.take("a", header(1, 2, 0)));
        assert!(taken.take("a", header(1, 3, 0)));
        // A late copy of an epoch older than the known ones changes nothing.
        if let Some(epochs) = taken.0.get_mut("a") {
            epochs.retain(|at| at.epoch != 0);
        }
        assert!(!taken.took("a", sent(1, 0, 0)));
        assert!(taken.take("a", header(1, 3, 1)));
    }

    #[test]
    fn a_node_remembers_a_bounded_number_of_epochs_per_sender() {
        let mut taken = Taken::default();
        for epoch in 0..100 {
            assert!(taken.take("a", header(1, epoch, 0)));
            assert!(!taken.took("a", sent(2, epoch, 0)));
        }
        assert_eq!(taken.0["a"].len(), EPOCHS_KEPT);
        assert!(taken.took("a", sent(1, 99, 0)));
        assert!(
            !taken.took("a", sent(1, 0, 0)),
            "forgotten: the log delivers it again"
        );
    }

    #[test]
    fn a_batch_takes_what_queued_up_to_its_limits() {
        let mut queued: VecDeque<_> = (0..100).map(|_| request(10)).collect();
        let (requests, encoded) = take_batch(&mut queued);
        assert_eq!((requests.len(), encoded.len()), (64, 64));
        assert_eq!(queued.len(), 36);
        let mut queued: VecDeque<_> = (0..3).map(|_| request(200 * 1024)).collect();
        let (requests, _) = take_batch(&mut queued);
        assert_eq!(
            requests.len(),
            1,
            "256 KiB at most, but one goes whatever its size"
        );
        let (requests, _) = take_batch(&mut VecDeque::new());
        assert!(requests.is_empty());
    }
}
