//! Several telemq nodes as one broker, over NATS.
//!
//! What this module owns: the node's NATS connection and everything that crosses it.
//! - **Routing** ([`routing`]): every message published on this node goes once to its topic's
//!   subject ([`subject`]); the node subscribes to the subjects of the filters its own clients
//!   hold, so it receives only messages someone here wants, and fans them out through the
//!   router as if they were published here. Shared groups are NATS queue groups, one per
//!   `$share/<group>/<filter>`, so NATS picks one node per message and the node picks one
//!   member.
//! - **Retained messages** ([`retained`]): a JetStream key-value bucket, one key per topic,
//!   which every node mirrors into its router.
//! - **Replication** ([`log`]): a QoS 1/2 message published here that a persistent session
//!   may need is stored in a JetStream stream with `cluster.replicas` copies, and a retained
//!   change in the retained bucket, before its publisher is acknowledged; without a quorum the
//!   publish is refused. One for clean sessions only goes to the other nodes directly
//!   ([`direct`]), acknowledged once they queued it.
//! - **Session ownership** ([`ownership`]): a key-value bucket, client id → owning node and the
//!   persistent session's subscriptions, changed only by compare-and-set, so that a client id
//!   is connected to at most one node.
//! - **Wills** ([`wills`]): recorded in a bucket, so that when a node dies the others publish
//!   the wills of its clients.
//!
//! Off (`cluster.enabled = false`) none of it exists: the pipeline has no outbox and the router
//! keeps no interest set.

mod codec;
mod consume;
mod direct;
mod log;
mod ownership;
mod positions;
mod pressure;
mod retained;
mod routing;
pub mod subject;
mod wills;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::ClusterConfig;
use crate::message::Message;
use crate::metrics;
use crate::publish::{Pipeline, Replicate};
use crate::router::trie::SubscriptionTrie;
use crate::router::Router;
use crate::session::SessionRegistry;

pub use consume::LogHold;
pub use ownership::{ClaimError, Claimed, Ownership};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach NATS at {urls}: {reason}")]
    Connect { urls: String, reason: String },
    #[error("cluster.{option}: {reason}")]
    Options {
        option: &'static str,
        reason: String,
    },
    #[error("cannot set up the JetStream bucket {bucket}: {reason}")]
    Bucket { bucket: String, reason: String },
}

/// A node's membership in the cluster.
#[derive(Debug)]
pub struct Cluster {
    node: Arc<str>,
    /// Prefix of every subject and bucket.
    base: String,
    client: async_nats::Client,
    jetstream: jetstream::Context,
    /// The replication log (see `log`, `consume`).
    log: jetstream::stream::Stream,
    /// Every log entry up to this position has reached this node's sessions (`consume`).
    log_applied: AtomicU64,
    /// Woken whenever `log_applied` moves (a direct delivery may wait for it, see `direct`).
    log_advanced: Notify,
    /// The last log position of an entry this node wrote (see `direct`).
    log_written: Arc<AtomicU64>,
    /// Held while a batch of the log is delivered, and while a moved session is replayed.
    log_lock: tokio::sync::Mutex<()>,
    /// Sessions' positions in the log (see `positions`).
    positions: kv::Store,
    /// Where short tasks of the cluster (a position write) are spawned, so shutdown waits.
    tracker: TaskTracker,
    /// Messages to replicate, for QoS 2 ones this module sends itself (see `positions`).
    replication: mpsc::Sender<Replicate>,
    /// Ids a QoS 2 message is stored under in the log: from a random start, so that nodes do
    /// not hand out the same ones.
    fresh_ids: AtomicU64,
    sessions: kv::Store,
    retained: kv::Store,
    /// Wills of this node's connections and sessions, and the nodes that record them (see
    /// `wills`).
    wills: kv::Store,
    nodes: kv::Store,
    router: Arc<Router>,
    pipeline: Pipeline,
    registry: Arc<SessionRegistry>,
    request_timeout: Duration,
    link_up: Arc<AtomicBool>,
    /// The plain filters whose NATS subscriptions are active, to tell which one of several
    /// overlapping subscriptions delivers a message (see `routing`).
    active: RwLock<SubscriptionTrie<Arc<str>, ()>>,
    retained_writes: mpsc::Sender<(Arc<Message>, retained::RetainedWritten)>,
    /// The router's interest version this node's NATS subscriptions reflect.
    interest_applied: watch::Sender<u64>,
    /// Whether the sessions this node stored are back in the router: until then the log's
    /// delivery waits, or it would pass entries they are owed.
    sessions_restored: watch::Sender<bool>,
    /// Claims of this node's connections, by client id (see `ownership`).
    claims: Mutex<HashMap<String, ownership::LocalClaim>>,
    /// Wakes takeover requests waiting for a claim of this node to attach its session.
    claims_settled: Notify,
    /// Flow control between nodes (see `pressure`).
    pressure: pressure::Pressure,
    /// The filters of the cluster's persistent sessions, from the session records.
    persistent: Arc<crate::router::persistent::PersistentFilters>,
    /// The other nodes, by their key in the nodes bucket (see `direct`), but those taken for
    /// dead.
    peers: RwLock<HashMap<String, Arc<str>>>,
    /// Every node in the nodes bucket, this one included, by key: what the liveness checks
    /// go through (see `wills`).
    listed: RwLock<HashMap<String, Arc<str>>>,
    /// The other nodes' direct batches this node took (see `direct`).
    direct_taken: Mutex<direct::Taken>,
}

/// What the wiring hands over to start the cluster link.
pub struct Parts {
    pub router: Arc<Router>,
    pub pipeline: Pipeline,
    pub registry: Arc<SessionRegistry>,
    /// Messages published on this node (the pipeline's outbox).
    pub outbox: mpsc::Receiver<Arc<Message>>,
    /// Messages to store with their replicas before they are acknowledged.
    pub replication: mpsc::Receiver<Replicate>,
    /// The filters of the cluster's persistent sessions, which this node keeps up to date
    /// from the session records.
    pub persistent: Arc<crate::router::persistent::PersistentFilters>,
    /// The sending end of `replication`.
    pub replication_sender: mpsc::Sender<Replicate>,
    /// QoS 1/2 messages the log does not carry, for the other nodes to queue before they are
    /// acknowledged (see `direct`).
    pub direct: mpsc::Receiver<Replicate>,
    /// The replication log position this node's storage says it delivered up to.
    pub log_applied: u64,
}

/// Retained changes waiting to be written to the bucket.
const RETAINED_QUEUE: usize = 4096;

impl Cluster {
    /// Connects to NATS, sets up the buckets, loads the cluster's retained messages into the
    /// router and starts forwarding. Fails if NATS cannot be reached within the request timeout.
    pub async fn start(
        config: &ClusterConfig,
        parts: Parts,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Arc<Self>, ClusterError> {
        metrics::cluster_init();
        let node: Arc<str> = config.node_name().into();
        let link_up = Arc::new(AtomicBool::new(false));
        let client = connect(config, &node, &link_up, &parts.router).await?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .build(client.clone());
        let replicas = replicas(config, &client);
        info!(replicas, "cluster state is kept with this many replicas");
        let sessions = bucket(&jetstream, &format!("{}_sessions", config.prefix), replicas).await?;
        let retained = bucket(&jetstream, &format!("{}_retained", config.prefix), replicas).await?;
        let log = log::open(&jetstream, config, replicas).await?;
        let positions = bucket(
            &jetstream,
            &format!("{}_positions", config.prefix),
            replicas,
        )
        .await?;
        let wills = bucket(&jetstream, &format!("{}_wills", config.prefix), replicas).await?;
        let nodes = bucket(&jetstream, &format!("{}_nodes", config.prefix), replicas).await?;
        let (consumer, applied) = consume::open(&log, &node, parts.log_applied).await?;
        let (retained_writes, retained_rx) = mpsc::channel(RETAINED_QUEUE);
        let cluster = Arc::new(Self {
            node,
            base: config.prefix.clone(),
            client,
            jetstream,
            log,
            log_applied: AtomicU64::new(applied),
            log_advanced: Notify::new(),
            log_written: Arc::new(AtomicU64::new(0)),
            log_lock: tokio::sync::Mutex::new(()),
            positions,
            tracker: tracker.clone(),
            replication: parts.replication_sender,
            fresh_ids: AtomicU64::new(random_start()),
            sessions,
            retained,
            wills,
            nodes,
            router: parts.router,
            pipeline: parts.pipeline,
            registry: parts.registry,
            request_timeout: config.request_timeout,
            link_up,
            active: RwLock::new(SubscriptionTrie::new()),
            retained_writes,
            interest_applied: watch::Sender::new(0),
            sessions_restored: watch::Sender::new(false),
            claims: Mutex::new(HashMap::new()),
            claims_settled: Notify::new(),
            pressure: pressure::Pressure::default(),
            persistent: parts.persistent,
            peers: RwLock::new(HashMap::new()),
            listed: RwLock::new(HashMap::new()),
            direct_taken: Mutex::new(direct::Taken::default()),
        });
        // Before any publish: which QoS 1/2 messages the log must carry depends on it.
        mirror(
            &cluster,
            cluster.sessions.clone(),
            Cluster::note_session_record,
            &shutdown,
        )
        .await?;
        let watch = cluster.load_retained().await?;
        tracker.spawn(retained::watch(cluster.clone(), watch, shutdown.clone()));
        tracker.spawn(retained::write(
            cluster.clone(),
            retained_rx,
            shutdown.clone(),
        ));
        tracker.spawn(consume::run(cluster.clone(), consumer, shutdown.clone()));
        tracker.spawn(positions::record(cluster.clone(), shutdown.clone()));
        tracker.spawn(log::replicate(
            cluster.clone(),
            parts.replication,
            shutdown.clone(),
        ));
        tracker.spawn(routing::forward(
            cluster.clone(),
            parts.outbox,
            shutdown.clone(),
        ));
        tracker.spawn(pressure::run(cluster.clone(), shutdown.clone()));
        tracker.spawn(routing::follow_interest(
            cluster.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
        let control = ownership::serve_control(cluster.clone(), shutdown.clone()).await?;
        tracker.spawn(control);
        // Listening before this node is listed, and the nodes known before any publish.
        let direct = direct::serve(cluster.clone(), shutdown.clone()).await?;
        tracker.spawn(direct);
        mirror(
            &cluster,
            cluster.nodes.clone(),
            Cluster::note_node,
            &shutdown,
        )
        .await?;
        tracker.spawn(direct::send(
            cluster.clone(),
            parts.direct,
            shutdown.clone(),
        ));
        let alive = wills::serve_alive(cluster.clone(), shutdown.clone()).await?;
        tracker.spawn(alive);
        tracker.spawn(wills::watch_nodes(cluster.clone(), shutdown.clone()));
        info!(node = %cluster.node, "joined the cluster");
        Ok(cluster)
    }

    /// Waits until this node's NATS subscriptions include what the router held at `version`
    /// (see `Router::interest_version`), so that a subscription acknowledged to a client
    /// receives what other nodes publish from then on. Gives up after the request timeout or
    /// at once while NATS is unreachable (the subscription is made when it is back).
    pub async fn settle_interest(&self, version: u64) {
        if !self.is_linked() {
            return;
        }
        let mut applied = self.interest_applied.subscribe();
        let settled = applied.wait_for(|applied| *applied >= version);
        if tokio::time::timeout(self.request_timeout, settled)
            .await
            .is_err()
        {
            warn!(version, "subscriptions not yet in place on NATS");
        }
    }

    /// The sessions this node stored are restored into the router: the log's delivery starts,
    /// and those that moved to another node meanwhile stop queueing here (see
    /// [`ownership::release_moved_sessions`]).
    pub fn sessions_restored(self: &Arc<Self>, shutdown: CancellationToken) {
        self.sessions_restored.send_replace(true);
        self.tracker
            .spawn(ownership::release_moved_sessions(self.clone(), shutdown));
    }

    /// Subscribes to `subject`, a subject of this node's own (takeovers, liveness checks).
    async fn subscribe_own(&self, subject: String) -> Result<async_nats::Subscriber, ClusterError> {
        self.client
            .subscribe(subject.clone())
            .await
            .map_err(|e| ClusterError::Connect {
                urls: subject,
                reason: e.to_string(),
            })
    }

    /// Whether the node is connected to NATS now.
    pub fn is_linked(&self) -> bool {
        self.link_up.load(Ordering::Acquire)
    }
}

/// The next item from `next` (a channel or stream), or `None` once shutdown has begun: the
/// loop of every task this module runs.
async fn until_shutdown<T>(
    shutdown: &CancellationToken,
    next: impl std::future::Future<Output = Option<T>>,
) -> Option<T> {
    tokio::select! {
        _ = shutdown.cancelled() => None,
        item = next => item,
    }
}

/// Reads every key of `store` into `note`: the current values before this returns, then every
/// change until shutdown. A broken watch is opened again, and its keys' current values are
/// taken as they come (`note` sees a key's latest value last).
async fn mirror(
    cluster: &Arc<Cluster>,
    store: kv::Store,
    note: fn(&Cluster, &kv::Entry),
    shutdown: &CancellationToken,
) -> Result<(), ClusterError> {
    let failed = |e: &dyn std::fmt::Display| ClusterError::Bucket {
        bucket: store.name.clone(),
        reason: e.to_string(),
    };
    let mut watch = store
        .watch_with_history(">")
        .await
        .map_err(|e| failed(&e))?;
    let status = store.status().await.map_err(|e| failed(&e))?;
    if status.values() > 0 {
        loop {
            // Keys deleted meanwhile may leave nothing to send, hence the time limit.
            match tokio::time::timeout(cluster.request_timeout, watch.next()).await {
                Ok(Some(Ok(entry))) => {
                    note(cluster, &entry);
                    if entry.delta == 0 {
                        break;
                    }
                }
                Ok(Some(Err(error))) => return Err(failed(&error)),
                Ok(None) | Err(_) => break,
            }
        }
    }
    let cluster = cluster.clone();
    let shutdown = shutdown.clone();
    cluster.tracker.clone().spawn(async move {
        loop {
            match until_shutdown(&shutdown, watch.next()).await {
                Some(Ok(entry)) => note(&cluster, &entry),
                Some(Err(error)) => tracing::debug!(%error, bucket = %store.name, "bucket watch"),
                None if shutdown.is_cancelled() => return,
                None => loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    if let Ok(renewed) = store.watch_with_history(">").await {
                        watch = renewed;
                        break;
                    }
                },
            }
        }
    });
    Ok(())
}

async fn connect(
    config: &ClusterConfig,
    node: &Arc<str>,
    link_up: &Arc<AtomicBool>,
    router: &Arc<Router>,
) -> Result<async_nats::Client, ClusterError> {
    let urls = config.nats_urls.join(",");
    let mut addresses = Vec::new();
    for url in &config.nats_urls {
        let address: async_nats::ServerAddr =
            url.parse()
                .map_err(|e: std::io::Error| ClusterError::Options {
                    option: "nats_urls",
                    reason: format!("{url}: {e}"),
                })?;
        addresses.push(address);
    }
    let events_link = link_up.clone();
    let events_router = router.clone();
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("telemq-{node}"))
        // A node's own messages reach its clients through its router; NATS must not echo them.
        .no_echo()
        // In the order configured: an operator lists the node's nearest server first.
        .retain_servers_order()
        .max_reconnects(None)
        .subscription_capacity(config.subscription_buffer)
        // A silent partition (no reset) is noticed after two missed pings.
        .ping_interval(Duration::from_secs(10))
        .connection_timeout(config.request_timeout)
        .request_timeout(Some(config.request_timeout))
        .reconnect_delay_callback(|attempts| {
            // 0, 100 ms, 200 ms, ... capped at 5 s: a restarted NATS server is found quickly
            // and an absent one is not hammered.
            Duration::from_millis((attempts as u64 * 100).min(5_000))
        })
        .event_callback(move |event| {
            let link = events_link.clone();
            let router = events_router.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        info!("NATS link up");
                        link.store(true, Ordering::Release);
                        router.set_shares_in_cluster(true);
                        metrics::cluster_link(true);
                    }
                    async_nats::Event::Disconnected | async_nats::Event::Closed => {
                        warn!("NATS link down: serving this node's clients locally");
                        link.store(false, Ordering::Release);
                        router.set_shares_in_cluster(false);
                        metrics::cluster_link(false);
                    }
                    async_nats::Event::SlowConsumer(_) => {
                        metrics::cluster_forward_dropped("slow_consumer");
                    }
                    other => warn!(event = %other, "NATS"),
                }
            }
        });
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(path) = &config.nkey_seed_file {
        let seed = std::fs::read_to_string(path).map_err(|e| ClusterError::Options {
            option: "nkey_seed_file",
            reason: format!("{}: {e}", path.display()),
        })?;
        options = options.nkey(seed.trim().to_string());
    }
    if let Some(path) = &config.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| ClusterError::Options {
                option: "credentials_file",
                reason: format!("{}: {e}", path.display()),
            })?;
    }
    if config.tls_required {
        options = options.require_tls(true);
    }
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let client =
        options
            .connect(addresses.as_slice())
            .await
            .map_err(|e| ClusterError::Connect {
                urls: urls.clone(),
                reason: e.to_string(),
            })?;
    // The Connected event may have fired before the flag was watched; the state is the truth.
    let up = client.connection_state() == async_nats::connection::State::Connected;
    link_up.store(up, Ordering::Release);
    router.set_shares_in_cluster(up);
    metrics::cluster_link(up);
    Ok(client)
}

/// A random 64-bit number (the start of this node's log ids).
pub(super) fn random_start() -> u64 {
    let mut bytes = [0u8; 8];
    // Without randomness (never on Linux) the clock still tells nodes apart.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        return crate::clock::unix_ms(crate::clock::now()) << 16;
    }
    u64::from_be_bytes(bytes)
}

/// How many copies the buckets and the log keep: `cluster.replicas`, or with 0 (the default)
/// as many as the NATS cluster has servers, at most 3 — a majority of 3 survives the loss of
/// one machine. The servers are counted from the client URLs the connected server advertises,
/// or from `nats_urls` if it names more: right after the servers start, one may not have heard
/// of all the others yet, and a bucket created then with 2 replicas would not survive the loss
/// of one server. An existing bucket or stream keeps the replicas it was created with.
fn replicas(config: &ClusterConfig, client: &async_nats::Client) -> usize {
    if config.replicas > 0 {
        return config.replicas;
    }
    let advertised = client.server_info().connect_urls.len();
    let configured = config
        .nats_urls
        .iter()
        .collect::<std::collections::HashSet<_>>()
        .len();
    advertised.max(configured).clamp(1, 3)
}

/// Opens a key-value bucket, creating it on first use. Several nodes starting together may race
/// to create it; whoever loses opens the winner's.
async fn bucket(
    jetstream: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<kv::Store, ClusterError> {
    let failed = |reason: String| ClusterError::Bucket {
        bucket: name.to_string(),
        reason,
    };
    let store = match jetstream.get_key_value(name).await {
        Ok(store) => store,
        Err(_) => {
            let created = jetstream
                .create_key_value(kv::Config {
                    bucket: name.to_string(),
                    history: 1,
                    num_replicas: replicas,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await;
            match created {
                Ok(store) => store,
                // Another node created it meanwhile.
                Err(error) => jetstream
                    .get_key_value(name)
                    .await
                    .map_err(|_| failed(error.to_string()))?,
            }
        }
    };
    // A key-value bucket answers reads from any replica ("direct get"), and a replica that
    // has not yet applied the last write answers with the value before it. A claim or a move
    // reads a record or position just written on another node and must see it (a stale
    // position would have a moved session take QoS 2 messages it completed a second time), so
    // every read goes to the stream's leader, which answers only with what a majority holds.
    //
    // Nodes starting together each ask for the change while JetStream still places the new
    // stream; one may time out while another's change goes through. So it is asked again, on
    // the stream as it is now, for a while.
    let mut config = store.stream.cached_info().config.clone();
    for attempt in 1.. {
        if !config.allow_direct {
            break;
        }
        config.allow_direct = false;
        match jetstream.update_stream(&config).await {
            Ok(_) => break,
            Err(error) if attempt >= LEADER_READS_ATTEMPTS => {
                return Err(failed(format!("reads not moved to the leader: {error}")));
            }
            Err(error) => {
                debug!(bucket = name, %error, "reads not moved to the leader yet; asking again");
                tokio::time::sleep(LEADER_READS_PAUSE).await;
                let stream = jetstream.get_stream(&config.name).await;
                config = stream
                    .map_err(|error| failed(error.to_string()))?
                    .cached_info()
                    .config
                    .clone();
            }
        }
    }
    jetstream
        .get_key_value(name)
        .await
        .map_err(|error| failed(error.to_string()))
}

/// How often a node starting asks JetStream to move a bucket's reads to its leader, and how
/// long it waits between two asks.
const LEADER_READS_ATTEMPTS: u32 = 10;
const LEADER_READS_PAUSE: Duration = Duration::from_secs(1);
