//! Retained messages of the whole cluster: a key-value bucket with one key per topic, written by
//! the node the message was published on and mirrored by every node into its router, so that a
//! subscribe is answered from memory on any node.
//!
//! Every node applies the bucket's changes in the bucket's order, its own included, so all
//! nodes end with the same retained message per topic whichever nodes wrote it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{Operation, Watch};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{codec, subject, until_shutdown, Cluster, ClusterError};
use crate::clock;
use crate::message::Message;
use crate::metrics;

/// Keys are the topic's subject under this root.
const KEY_ROOT: &str = "r";
/// Answers whether a retained change reached the bucket.
pub(super) type RetainedWritten = oneshot::Sender<Result<(), String>>;

/// Pause before watching again after the watch ended (NATS unreachable).
const REWATCH: Duration = Duration::from_secs(1);

impl Cluster {
    /// Queues a retained message (or, with an empty payload, its clearing) for the bucket;
    /// `written` answers once the bucket holds it. Waits for room in the queue.
    pub(super) async fn write_retained(&self, message: &Arc<Message>, written: RetainedWritten) {
        // A closed queue (shutting down) drops `written`, which answers "not written".
        let _ = self.retained_writes.send((message.clone(), written)).await;
    }

    /// Reads the bucket into the router and returns the watch that follows later changes.
    pub(super) async fn load_retained(&self) -> Result<Watch, ClusterError> {
        let failed = |reason: String| ClusterError::Bucket {
            bucket: self.retained.name.clone(),
            reason,
        };
        let mut watch = self
            .retained
            .watch_with_history(">")
            .await
            .map_err(|e| failed(e.to_string()))?;
        // An empty bucket sends nothing; otherwise the snapshot ends with the entry that has
        // nothing pending after it.
        let stored = self
            .retained
            .status()
            .await
            .map_err(|e| failed(e.to_string()))?
            .values();
        let mut loaded = 0u64;
        if stored > 0 {
            let deadline = tokio::time::Instant::now() + self.request_timeout * 4;
            loop {
                let entry = tokio::time::timeout_at(deadline, watch.next())
                    .await
                    .map_err(|_| failed("timed out reading retained messages".into()))?;
                let Some(entry) = entry else {
                    return Err(failed("watch ended".into()));
                };
                let entry = entry.map_err(|e| failed(e.to_string()))?;
                let last = entry.delta == 0;
                self.apply_retained(&entry.key, entry.operation, &entry.value);
                loaded += 1;
                if last {
                    break;
                }
            }
        }
        info!(
            loaded,
            retained = self.router.retained_count(),
            "retained messages loaded from the cluster"
        );
        Ok(watch)
    }

    fn apply_retained(&self, key: &str, operation: Operation, value: &[u8]) {
        let Some(topic) = subject::subject_topic(KEY_ROOT, key) else {
            warn!(%key, "retained bucket key is not a topic");
            return;
        };
        match operation {
            Operation::Put => match codec::decode(value) {
                Ok(received) if !received.message.payload.is_empty() => {
                    self.router.restore_retained(Arc::new(received.message));
                }
                Ok(_) => self.router.forget_retained(&topic),
                Err(error) => warn!(%error, %topic, "retained message from the cluster unreadable"),
            },
            Operation::Delete | Operation::Purge => self.router.forget_retained(&topic),
        }
    }
}

/// Applies the bucket's changes as they happen; watches again if the watch ends.
pub(super) async fn watch(cluster: Arc<Cluster>, mut watch: Watch, shutdown: CancellationToken) {
    let mut last_revision = 0;
    loop {
        let entry = tokio::select! {
            _ = shutdown.cancelled() => return,
            entry = watch.next() => entry,
        };
        match entry {
            Some(Ok(entry)) => {
                last_revision = entry.revision;
                cluster.apply_retained(&entry.key, entry.operation, &entry.value);
            }
            Some(Err(error)) => {
                metrics::cluster_error("retained_watch");
                warn!(%error, "retained watch");
            }
            None => loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(REWATCH) => {}
                }
                match cluster
                    .retained
                    .watch_all_from_revision(last_revision + 1)
                    .await
                {
                    Ok(renewed) => {
                        watch = renewed;
                        break;
                    }
                    Err(error) => {
                        metrics::cluster_error("retained_watch");
                        warn!(%error, "cannot watch retained messages; retrying");
                    }
                }
            },
        }
    }
}

/// Writes retained changes published on this node to the bucket, in the order they were made.
pub(super) async fn write(
    cluster: Arc<Cluster>,
    mut changes: mpsc::Receiver<(Arc<Message>, RetainedWritten)>,
    shutdown: CancellationToken,
) {
    while let Some((message, answer)) = until_shutdown(&shutdown, changes.recv()).await {
        let key = subject::topic_subject(KEY_ROOT, &message.topic);
        let written = if message.payload.is_empty() {
            cluster
                .retained
                .delete(&key)
                .await
                .map_err(|e| e.to_string())
        } else {
            let value = codec::encode(&message, clock::now());
            cluster
                .retained
                .put(&key, value)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        if let Err(error) = &written {
            metrics::cluster_error("retained_write");
            warn!(%error, topic = %message.topic, "retained message not written to the cluster");
        }
        let _ = answer.send(written);
    }
}
