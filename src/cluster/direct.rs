//! Direct delivery: a QoS 1 message that no persistent session subscribes to (see
//! `publish::Pipeline::is_logged`) is not replicated. Its subscribers are clean sessions, whose
//! queues live and die with their node, so replicas would keep nothing a subscriber could
//! still get. Its publisher is acknowledged once every other node has queued the message for
//! its subscribers, just as a single node acknowledges once it has queued one: one request per
//! batch to each node's subject `<prefix>.direct.<node>`, answered once the node delivered it.
//!
//! - **Batches.** Up to `log::ENTRY_SPAN` messages or `log::ENTRY_BYTES` go in one request,
//!   and at most [`IN_FLIGHT`] batches wait for their answers at once, answered in order.
//!   Requests leave in order on the node's one NATS connection and each node handles its
//!   subject in order, so a publisher's messages arrive in the order sent.
//! - **Which nodes.** Those listed in `<prefix>_nodes` (see `wills`), followed by a watch. A
//!   node lists itself before it serves clients, and again if it finds itself unlisted (taken
//!   for dead while cut off from NATS).
//! - **A persistent session after all.** A node that finds a persistent session matching a
//!   message (this node's view of the session records had not caught up with a subscribe)
//!   answers "log it" for that message and does not deliver it. This node then hands it to the
//!   replication log, whose answer the publisher waits for. The nodes that did deliver it get
//!   it again from the log: QoS 1 allows a duplicate.
//! - **Failure.** A listed node with no responder (dead, or cut off from NATS while its
//!   clients are still connected to it), one that does not answer within
//!   `cluster.request_timeout`, or no link to NATS: the batch goes through the replication log
//!   instead, as every QoS 1 message would without this path, so a node that was only cut off
//!   delivers it when it reads the log again, and without a quorum it is refused. Nodes that
//!   did deliver it get it again from the log (a QoS 1 duplicate). Until a dead node is
//!   unlisted (three missed liveness checks, see `wills`), every batch goes through the log.

use std::collections::VecDeque;
use std::sync::Arc;

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use futures_util::future::{join_all, BoxFuture};
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{codec, log, subject, until_shutdown, Cluster, ClusterError};
use crate::clock;
use crate::metrics;
use crate::publish::{Replicate, Stored};
use crate::router::Reach;
use crate::sync::{read, write};

/// Batches waiting for the other nodes' answers at once.
const IN_FLIGHT: usize = 32;

/// A node's answer for one message: queued for its subscribers (if any).
const QUEUED: u8 = 0;
/// A node's answer for one message: a persistent session there wants it, so it goes through
/// the replication log.
const LOG_IT: u8 = 1;

impl Cluster {
    fn direct_subject(&self, node: &str) -> String {
        format!("{}.direct.{}", self.base, subject::token(node))
    }

    /// One entry of the nodes bucket, as a node to deliver to or no longer; see `mirror`.
    pub(super) fn note_node(&self, entry: &kv::Entry) {
        let mut peers = write(&self.peers);
        match entry.operation {
            Operation::Put => match std::str::from_utf8(&entry.value) {
                Ok(node) if node != &*self.node => {
                    peers.insert(entry.key.clone(), node.into());
                }
                _ => {}
            },
            Operation::Delete | Operation::Purge => {
                peers.remove(&entry.key);
            }
        }
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
            let Some((_, received)) = log::unframe(&request.payload) else {
                // Unanswered: the sender refuses the batch.
                metrics::cluster_forward_dropped("undecodable");
                continue;
            };
            let mut answers = Vec::with_capacity(received.len());
            for received in received {
                let message = Arc::new(received.message);
                if cluster.persistent.matches(&message.topic) {
                    answers.push(LOG_IT);
                    continue;
                }
                if let Ok(lag) = clock::now().duration_since(received.sent_at) {
                    metrics::cluster_forward_lag(lag.as_secs_f64());
                }
                metrics::cluster_forwarded(metrics::IN);
                cluster.pipeline.publish_remote(message, Reach::Plain).await;
                answers.push(QUEUED);
            }
            if let Err(error) = cluster.client.publish(reply, Bytes::from(answers)).await {
                debug!(%error, "direct delivery not answered");
            }
        }
    })
}

/// Hands each QoS 1 message the log does not carry to the other nodes, and answers its
/// publisher, in order, once they all queued it (or the log stored it, see the module's
/// documentation).
pub(super) async fn send(
    cluster: Arc<Cluster>,
    mut requests: mpsc::Receiver<Replicate>,
    shutdown: CancellationToken,
) {
    let mut in_flight: FuturesOrdered<BoxFuture<'static, Settled>> = FuturesOrdered::new();
    let mut queued = VecDeque::new();
    loop {
        while !queued.is_empty() && in_flight.len() < IN_FLIGHT {
            while queued.len() < log::ENTRY_SPAN as usize {
                match requests.try_recv() {
                    Ok(request) => queued.push_back(request),
                    Err(_) => break,
                }
            }
            let batch = take_batch(&mut queued);
            in_flight.push_back(cluster.start_direct(batch));
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(settled) = in_flight.next(), if !in_flight.is_empty() => {
                cluster.settle(settled).await;
            }
            request = requests.recv(), if queued.is_empty() => {
                let Some(request) = request else { break };
                queued.push_back(request);
            }
        }
    }
    // What is still waiting is answered "not stored" as its senders drop.
}

/// A batch and, per message, whether it goes through the replication log after all.
struct Settled {
    requests: Vec<Replicate>,
    log_it: Vec<bool>,
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

impl Cluster {
    /// Sends one batch to every other node and returns the future of their answers.
    fn start_direct(
        &self,
        (requests, encoded): (Vec<Replicate>, Vec<Bytes>),
    ) -> BoxFuture<'static, Settled> {
        let peers: Vec<Arc<str>> = read(&self.peers).values().cloned().collect();
        let count = requests.len();
        if peers.is_empty() || !self.is_linked() {
            // Without NATS no other node can be told: the log refuses it at once.
            let log_it = vec![!peers.is_empty(); count];
            return futures_util::future::ready(Settled { requests, log_it }).boxed();
        }
        let payload = log::frame(&self.node, &encoded);
        let asked = peers.into_iter().map(|peer| {
            let client = self.client.clone();
            let subject = self.direct_subject(&peer);
            let payload = payload.clone();
            let timeout = self.request_timeout;
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
                    Ok(Ok(_)) => "answer not understood".to_string(),
                    Ok(Err(error)) => error.to_string(),
                    Err(_) => "no answer in time".to_string(),
                };
                // Dead, or only cut off from NATS for a while, or slow: its clients may still
                // be there, and the log brings the batch to them once it reads it.
                debug!(%peer, failure, "direct delivery goes through the log");
                let log_it = vec![true; count];
                return Settled { requests, log_it };
            }
            Settled { requests, log_it }
        }
        .boxed()
    }

    /// Answers a batch's publishers, in order: queued everywhere, or handed to the
    /// replication log, which answers instead.
    async fn settle(&self, settled: Settled) {
        for (mut request, log_it) in settled.requests.into_iter().zip(settled.log_it) {
            if log_it {
                metrics::cluster_direct(metrics::DIRECT_LOGGED);
                request.logged = true;
                // A closed link drops the request, and with it `done`: not stored.
                let _ = self.replication.send(request).await;
            } else {
                metrics::cluster_direct(metrics::DIRECT_QUEUED);
                let _ = request.done.send(Ok(Stored::New));
            }
        }
    }
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
            done: oneshot::channel().0,
        }
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
