//! Replication before acknowledgement: every QoS 1/2 message published on this node is stored
//! in the JetStream stream `<prefix>_log`, and every retained change in the retained bucket,
//! before its publisher gets PUBACK / PUBREC. JetStream answers a publish once a majority of
//! the stream's replicas (`cluster.replicas`, each on another NATS server) hold it, so what a
//! node acknowledges is on more than one machine. When no majority answers (NATS lost its
//! quorum, or this node lost NATS), the publish is refused instead and its publisher retries
//! (see `connection::pending`); the next publish tries again, so service comes back by itself
//! when the quorum does.
//!
//! Publishes are pipelined: requests are sent in the order they arrive, up to
//! [`IN_FLIGHT`] waiting for their answers at once, and answered in that order.

use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::{self, stream};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{codec, subject, Cluster, ClusterError};
use crate::clock;
use crate::config::ClusterConfig;
use crate::message::Message;
use crate::metrics;
use crate::protocol::QoS;
use crate::publish::{Replicate, ReplicationError, Stored};

/// Publishes waiting for JetStream's answer at once. Past it, requests wait in the link's
/// queue, and publishers' acknowledgements with them.
const IN_FLIGHT: usize = 4096;

/// How long the log remembers the id of a QoS 2 message (see `cluster::positions`).
const DUPLICATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// The stream's subjects are `<prefix>.log.` and the topic's subject without its prefix.
const LOG_ROOT: &str = "log";

/// Opens the log stream, creating it on first use (several nodes may race; the loser opens the
/// winner's).
pub(super) async fn open(
    jetstream: &jetstream::Context,
    config: &ClusterConfig,
    replicas: usize,
) -> Result<stream::Stream, ClusterError> {
    let name = format!("{}_log", config.prefix);
    if let Ok(stream) = jetstream.get_stream(&name).await {
        return Ok(stream);
    }
    let created = jetstream
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![log_root(&config.prefix)],
            num_replicas: replicas,
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: config.log_max_age,
            max_bytes: i64::try_from(config.log_max_bytes).unwrap_or(i64::MAX),
            // A QoS 2 publisher whose node failed before PUBREC sends the message again to
            // another node, usually within seconds; within this window the log keeps one copy.
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        })
        .await;
    match created {
        Ok(stream) => Ok(stream),
        Err(error) => jetstream
            .get_stream(&name)
            .await
            .map_err(|_| ClusterError::Bucket {
                bucket: name,
                reason: error.to_string(),
            }),
    }
}

/// The subject every log entry is under.
pub(super) fn log_root(base: &str) -> String {
    format!("{base}.{LOG_ROOT}.>")
}

/// The log subject of `topic`.
pub(super) fn log_subject(base: &str, topic: &str) -> String {
    let subject = subject::topic_subject(base, topic);
    format!("{base}.{LOG_ROOT}{}", &subject[base.len()..])
}

/// A log entry: the publishing node's name (its own messages reach only its persistent
/// sessions through the log; the rest it delivered when they were published), then the message
/// as nodes send it to each other.
fn frame(node: &str, message: &Message) -> Bytes {
    let encoded = codec::encode(message, clock::now());
    let mut out = BytesMut::with_capacity(1 + node.len() + encoded.len());
    // Node names are tokens, far shorter than 256 bytes (`config::cluster`).
    out.put_u8(node.len().min(255) as u8);
    out.put_slice(&node.as_bytes()[..node.len().min(255)]);
    out.put_slice(&encoded);
    out.freeze()
}

/// The publishing node and the message of a log entry.
pub(super) fn unframe(data: &[u8]) -> Option<(&str, codec::Received)> {
    let (&len, rest) = data.split_first()?;
    let len = usize::from(len);
    if rest.len() < len {
        return None;
    }
    let (node, message) = rest.split_at(len);
    let node = std::str::from_utf8(node).ok()?;
    Some((node, codec::decode(message).ok()?))
}

/// Answers replication requests in order, each once JetStream (and, for a retained change,
/// the retained bucket) has stored it.
pub(super) async fn replicate(
    cluster: Arc<Cluster>,
    mut requests: mpsc::Receiver<Replicate>,
    shutdown: CancellationToken,
) {
    let mut in_flight: FuturesOrdered<BoxFuture<'static, ()>> = FuturesOrdered::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            request = requests.recv(), if in_flight.len() < IN_FLIGHT => {
                let Some(request) = request else { break };
                in_flight.push_back(cluster.start_replication(request).await);
            }
        }
    }
    // What is still waiting is answered "not stored" as its senders drop: nothing is
    // acknowledged that the cluster may not hold.
}

impl Cluster {
    /// Sends the writes of one request, in arrival order, and returns the future that answers
    /// it once they are stored.
    async fn start_replication(&self, request: Replicate) -> BoxFuture<'static, ()> {
        let Replicate {
            message,
            once,
            done,
        } = request;
        let started = Instant::now();
        if !self.is_linked() {
            return answer(done, started, Err(unavailable("no link to NATS"))).boxed();
        }
        let retained = if message.retain {
            let (written, stored) = oneshot::channel();
            self.write_retained(&message, written).await;
            Some(stored)
        } else {
            None
        };
        let logged = if message.qos == QoS::AtMostOnce {
            None
        } else {
            let payload = frame(&self.node, &message);
            let subject = log_subject(&self.base, &message.topic);
            let mut publish = jetstream::message::PublishMessage::build().payload(payload);
            if let Some(id) = &once {
                publish = publish.message_id(id.clone());
            }
            match self.jetstream.send_publish(subject, publish).await {
                Ok(ack) => Some(ack),
                Err(error) => {
                    return answer(done, started, Err(unavailable(&error.to_string()))).boxed();
                }
            }
        };
        let log = self.log.clone();
        async move {
            let mut outcome = Ok(Stored::New);
            if let Some(ack) = logged {
                match ack.await {
                    // A duplicate is taken as stored only once the log shows the earlier copy
                    // at the position it names: one still being proposed (no position yet), or
                    // proposed by a leader that lost it, is not stored.
                    Ok(ack) if ack.duplicate => {
                        let stored = ack.sequence > 0
                            && log.get_raw_message(ack.sequence).await.is_ok_and(|copy| {
                                copy.headers.get("Nats-Msg-Id").map(|id| id.as_str())
                                    == once.as_deref()
                            });
                        outcome = if stored {
                            Ok(Stored::Again)
                        } else {
                            Err(unavailable("an earlier copy is not known to be stored"))
                        };
                    }
                    Ok(_) => {}
                    Err(error) => outcome = Err(unavailable(&error.to_string())),
                }
            }
            if let Some(stored) = retained {
                let written = stored
                    .await
                    .unwrap_or_else(|_| Err("the retained writer stopped".into()));
                if let (Ok(_), Err(error)) = (&outcome, written) {
                    outcome = Err(unavailable(&error));
                }
            }
            answer(done, started, outcome).await;
        }
        .boxed()
    }
}

fn unavailable(reason: &str) -> ReplicationError {
    ReplicationError(reason.into())
}

async fn answer(
    done: oneshot::Sender<Result<Stored, ReplicationError>>,
    started: Instant,
    outcome: Result<Stored, ReplicationError>,
) {
    metrics::cluster_replicated(outcome.is_ok(), started.elapsed().as_secs_f64());
    if let Err(error) = &outcome {
        tracing::debug!(%error, "not replicated");
    }
    let _ = done.send(outcome);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_subjects_sit_under_their_own_root_and_keep_the_dollar_split() {
        assert_eq!(log_subject("telemq", "a/b"), "telemq.log.t.a.b");
        assert_eq!(log_subject("telemq", "$x/y"), "telemq.log.d.=24x.y");
    }

    #[test]
    fn an_entry_names_its_node_and_carries_the_message() {
        let message = Message::new(
            "a/b".into(),
            Bytes::from_static(b"payload"),
            QoS::ExactlyOnce,
            true,
            Default::default(),
            Some("publisher".into()),
        );
        let entry = frame("node-1", &message);
        let (node, received) = unframe(&entry).unwrap();
        assert_eq!(node, "node-1");
        assert_eq!(received.message.topic, message.topic);
        assert_eq!(received.message.payload, message.payload);
        assert_eq!(received.message.qos, QoS::ExactlyOnce);
        assert!(unframe(&entry[..3]).is_none());
    }
}
