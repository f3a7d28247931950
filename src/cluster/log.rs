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
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{codec, subject, Cluster, ClusterError};
use crate::clock;
use crate::config::ClusterConfig;
use crate::metrics;
use crate::protocol::QoS;
use crate::publish::{Replicate, ReplicationError};

/// Publishes waiting for JetStream's answer at once. Past it, requests wait in the link's
/// queue, and publishers' acknowledgements with them.
const IN_FLIGHT: usize = 4096;

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
            subjects: vec![format!("{}.{LOG_ROOT}.>", config.prefix)],
            num_replicas: replicas,
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: config.log_max_age,
            max_bytes: i64::try_from(config.log_max_bytes).unwrap_or(i64::MAX),
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

/// The log subject of `topic`.
fn log_subject(base: &str, topic: &str) -> String {
    let subject = subject::topic_subject(base, topic);
    format!("{base}.{LOG_ROOT}{}", &subject[base.len()..])
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
        let Replicate { message, done } = request;
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
            let payload = codec::encode(&message, clock::now());
            let subject = log_subject(&self.base, &message.topic);
            match self.jetstream.publish(subject, payload).await {
                Ok(ack) => Some(ack),
                Err(error) => {
                    return answer(done, started, Err(unavailable(&error.to_string()))).boxed();
                }
            }
        };
        async move {
            let mut outcome = Ok(());
            if let Some(ack) = logged {
                if let Err(error) = ack.await {
                    outcome = Err(unavailable(&error.to_string()));
                }
            }
            if let Some(stored) = retained {
                let written = stored
                    .await
                    .unwrap_or_else(|_| Err("the retained writer stopped".into()));
                if let (Ok(()), Err(error)) = (&outcome, written) {
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
    done: oneshot::Sender<Result<(), ReplicationError>>,
    started: Instant,
    outcome: Result<(), ReplicationError>,
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
}
