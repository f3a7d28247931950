//! Wills that outlive their node. A connection's will lives on the node the connection is on;
//! if that node dies (killed, its machine lost), the connection is gone without the will being
//! published, and no other node knew of it. So each node also records the wills of its
//! connections, and its sessions' pending wills (waiting out a delay interval), in the bucket
//! `<prefix>_wills`, one key per will: `<node>.<client id>`. The node deletes the key once the
//! will is published or discarded, or the session moved away.
//!
//! Every node answers `<prefix>.alive.<node>` and lists itself in the bucket `<prefix>_nodes`.
//! Each node asks each other listed node every second; a node with no responder three times in
//! a row (its NATS connection, and so its subscriptions, are gone) is dead, and the surviving
//! nodes adopt its wills: each will goes to the node whose delete of its key succeeds
//! (compare-and-delete by revision), which publishes it once its delay interval has passed
//! from then, unless its client came back in the meantime [MQTT-3.1.3-9].
//!
//! Cost: one key write per connection with a will (at CONNECT), one delete when it ends, and
//! one small request per other node per second.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use bytes::{BufMut, Bytes};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{codec, subject, Cluster, ClusterError};
use crate::clock;
use crate::message::Message;
use crate::metrics;
use crate::sync::{read, write};

/// How often other nodes are asked whether they are alive.
const CHECK: Duration = Duration::from_secs(1);

/// Unanswered checks in a row after which a node is taken for dead.
const STRIKES: u32 = 3;

impl Cluster {
    fn will_key(&self, node: &str, client_id: &str) -> String {
        format!("{}.{}", subject::token(node), subject::key(client_id))
    }

    fn alive_subject(&self, node: &str) -> String {
        format!("{}.alive.{}", self.base, subject::token(node))
    }

    /// Records the will of `client_id`'s connection here (`None`: it has none), with its delay
    /// interval. A failure is logged and counted: the will is then published only if this node
    /// lives to see the connection end.
    pub async fn record_will(&self, client_id: &str, will: Option<(&Message, u32)>) {
        let key = self.will_key(&self.node, client_id);
        let written = match will {
            Some((message, delay)) => {
                let mut value = Vec::with_capacity(64 + message.payload.len());
                value.put_u32(delay);
                value.extend_from_slice(&codec::encode(message, clock::now()));
                self.wills
                    .put(key, Bytes::from(value))
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            None => self.wills.delete(key).await.map_err(|e| e.to_string()),
        };
        if let Err(error) = written {
            metrics::cluster_error("will");
            debug!(%error, client_id, "will not recorded in the cluster");
        }
    }

    /// The will of `client_id` recorded by this node is no longer due from another node: it
    /// was published or discarded here, or the session moved away.
    pub async fn forget_will(&self, client_id: &str) {
        self.record_will(client_id, None).await;
    }

    /// Lists this node in the nodes bucket, under its name's token.
    async fn list_self(&self) -> Result<u64, kv::PutError> {
        self.nodes
            .put(
                subject::token(&self.node),
                Bytes::from(self.node.to_string()),
            )
            .await
    }

    /// The client came back here while `node` held its will: that will is not to be published
    /// [MQTT-3.1.3-9].
    pub(super) async fn drop_will_of(&self, node: &str, client_id: &str) {
        if let Err(error) = self.wills.delete(self.will_key(node, client_id)).await {
            debug!(%error, client_id, node, "another node's will not dropped");
        }
    }
}

/// Answers the other nodes' liveness checks, and lists this node among the nodes.
pub(super) async fn serve_alive(
    cluster: Arc<Cluster>,
    shutdown: CancellationToken,
) -> Result<impl std::future::Future<Output = ()>, ClusterError> {
    let mut checks = cluster
        .subscribe_own(cluster.alive_subject(&cluster.node))
        .await?;
    if let Err(error) = cluster.list_self().await {
        warn!(%error, "this node is not listed among the cluster's nodes; its wills are not adopted if it dies");
    }
    Ok(async move {
        loop {
            let check = tokio::select! {
                _ = shutdown.cancelled() => return,
                check = checks.next() => match check {
                    Some(check) => check,
                    None => return,
                },
            };
            if let Some(reply) = check.reply {
                let _ = cluster.client.publish(reply, Bytes::new()).await;
            }
        }
    })
}

/// Checks the other nodes every second and adopts the wills of those found dead.
pub(super) async fn watch_nodes(cluster: Arc<Cluster>, shutdown: CancellationToken) {
    let mut strikes: HashMap<String, u32> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CHECK) => {}
        }
        if !cluster.is_linked() {
            // Cut off from NATS, this node cannot tell a dead node from its own isolation.
            strikes.clear();
            continue;
        }
        // The other nodes from the bucket's mirror: listing its keys here would cost JetStream
        // a consumer a second per node.
        let listed: Vec<(String, Arc<str>)> = read(&cluster.listed)
            .iter()
            .map(|(key, node)| (key.clone(), node.clone()))
            .collect();
        strikes.retain(|node, _| listed.iter().any(|(key, _)| key == node));
        // Its own key is read, not taken from the mirror: a watch renewed after this node was
        // cut off need not show what was deleted meanwhile.
        let unlisted = match cluster.nodes.entry(subject::token(&cluster.node)).await {
            Ok(Some(entry)) => entry.operation != Operation::Put,
            Ok(None) => true,
            Err(_) => false,
        };
        if unlisted {
            // Taken for dead while cut off from NATS: listed again, so that the others adopt
            // its wills if it dies and send it their direct deliveries (see `direct`).
            info!("this node was unlisted while cut off; listing it again");
            if let Err(error) = cluster.list_self().await {
                debug!(%error, "this node not listed again");
            }
        }
        for (key, node) in listed {
            if node == cluster.node {
                continue;
            }
            let check = cluster
                .client
                .request(cluster.alive_subject(&node), Bytes::new());
            let answered = tokio::time::timeout(cluster.request_timeout, check).await;
            let dead = matches!(
                answered,
                Ok(Err(error)) if error.kind() == async_nats::RequestErrorKind::NoResponders
            );
            let count = strikes.entry(key.clone()).or_default();
            *count = if dead { *count + 1 } else { 0 };
            if *count >= STRIKES {
                strikes.remove(&key);
                // The mirror may still hold a node another one unlisted while its watch was
                // being renewed.
                let entry = match cluster.nodes.entry(&key).await {
                    Ok(Some(entry)) if entry.operation == Operation::Put => entry,
                    Ok(_) => {
                        write(&cluster.listed).remove(&key);
                        continue;
                    }
                    Err(_) => continue,
                };
                info!(%node, "node gone: adopting its wills");
                // No more direct deliveries to it, which would all go through the log for want
                // of an answer and reach the other nodes twice (its wills among them). If it
                // lists itself again, the nodes bucket's watch brings it back.
                write(&cluster.peers).remove(&key);
                if cluster.adopt_wills(&node, &shutdown).await {
                    // Unlisted unless it came back meanwhile (it lists itself anew).
                    let _ = cluster
                        .nodes
                        .delete_expect_revision(&key, Some(entry.revision))
                        .await;
                }
            }
        }
    }
}

impl Cluster {
    /// Takes the wills `node` recorded; returns whether all were seen.
    async fn adopt_wills(self: &Arc<Self>, node: &str, shutdown: &CancellationToken) -> bool {
        let prefix = format!("{}.>", subject::token(node));
        let Ok(mut entries) = self.wills.watch_with_history(&prefix).await else {
            return false;
        };
        loop {
            // The history comes first; an empty one sends nothing, hence the time limit.
            let next = tokio::time::timeout(self.request_timeout, entries.next()).await;
            let entry = match next {
                Ok(Some(Ok(entry))) => entry,
                Ok(Some(Err(error))) => {
                    debug!(%error, node, "wills of a dead node not read");
                    return false;
                }
                Ok(None) | Err(_) => return true,
            };
            let last = entry.delta == 0;
            if entry.operation == Operation::Put {
                self.adopt_will(node, entry, shutdown).await;
            }
            if last {
                return true;
            }
        }
    }

    /// Publishes one adopted will once its delay has passed, if this node wins it.
    async fn adopt_will(
        self: &Arc<Self>,
        node: &str,
        entry: kv::Entry,
        shutdown: &CancellationToken,
    ) {
        let Some((delay, encoded)) = entry.value.split_first_chunk::<4>() else {
            return;
        };
        let Ok(received) = codec::decode(encoded) else {
            return;
        };
        let won = self
            .wills
            .delete_expect_revision(&entry.key, Some(entry.revision))
            .await;
        if won.is_err() {
            // Another node adopted it, or the client came back.
            return;
        }
        let delay = Duration::from_secs(u64::from(u32::from_be_bytes(*delay)));
        let message = received.message;
        let client_id = message.publisher.clone().unwrap_or_default();
        let cluster = self.clone();
        let node = node.to_string();
        let shutdown = shutdown.clone();
        self.tracker.spawn(async move {
            let started = tokio::time::Instant::now();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => {
                    // Handed on: recorded as this node's, which the others adopt once it is
                    // gone.
                    let left = delay.saturating_sub(started.elapsed()).as_secs();
                    let left = u32::try_from(left).unwrap_or(u32::MAX);
                    cluster.record_will(&client_id, Some((&message, left))).await;
                    return;
                }
            }
            if cluster.came_back(&client_id, &node).await {
                return;
            }
            metrics::cluster_will_adopted();
            info!(client_id = %client_id, from = %node, topic = %message.topic, "publishing the will of a client of a dead node");
            cluster.pipeline.publish(Arc::new(message)).await;
        });
    }
}
