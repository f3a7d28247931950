//! Wiring: builds the shared state, binds listeners, runs background tasks and shuts it all down.
//! No protocol logic lives here.

use crate::router::persistent::PersistentFilters;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::{Auth, AuthError};
use crate::clock;
use crate::cluster::{self, Cluster, ClusterError};
use crate::config::{Config, ConfigError, StorageEngine};
use crate::delayed::{self, DelayedMessages};
use crate::exporter;
use crate::metrics;
use crate::overload::MemoryGuard;
use crate::publish::{self, Pipeline};
use crate::router::Router;
use crate::session::{Kick, QueueLimits, SessionRegistry, Swept};
use crate::state::BrokerState;
use crate::storage::{Storage, StorageError, Store, Volatile};
use crate::sys_topics;
use crate::transport::admission::Admission;
use crate::transport::tls::{TlsContext, TlsError};
use crate::transport::{self, Transport};

/// How often offline sessions are checked for expiry and delayed wills for being due.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How often silent clients are looked for: the most a keep-alive timeout is late by.
const KEEP_ALIVE_SWEEP: Duration = Duration::from_millis(250);
/// How long shutdown waits for connections to say goodbye.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open storage in {path}: {source}")]
    Storage { path: String, source: StorageError },
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running broker. Dropping it does not stop it; call [`Broker::shutdown`].
#[derive(Debug)]
pub struct Broker {
    mqtt_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    ws_addr: Option<SocketAddr>,
    wss_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    state: Arc<BrokerState>,
    /// The TLS configuration of the TLS and WSS listeners; `None` when neither is enabled.
    tls: Option<Arc<TlsContext>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Broker {
    #[cfg(test)]
    pub(crate) fn state(&self) -> &Arc<BrokerState> {
        &self.state
    }

    /// Validates the configuration, binds the listeners and starts serving.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        if config.metrics.enabled {
            metrics::install();
        }
        let (store, recovered): (Arc<dyn Store>, _) = match config.storage.engine {
            StorageEngine::Memory => (Arc::new(Volatile::new()), None),
            StorageEngine::RocksDb => {
                let storage_config = config.storage.clone();
                let storage_error = |source| StartError::Storage {
                    path: config.storage.data_dir.display().to_string(),
                    source,
                };
                let opened =
                    tokio::task::spawn_blocking(move || Storage::open_configured(&storage_config))
                        .await
                        .map_err(|e| storage_error(StorageError::Rocks(e.to_string().into())))?
                        .map_err(storage_error)?;
                (Arc::new(opened.0), Some(opened.1))
            }
        };
        let (auth, tls) = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || -> Result<_, StartError> {
                let auth = Auth::load(&config.auth)?;
                let tls_wanted = config.tls.enabled || config.websocket.tls_enabled;
                let tls = if tls_wanted {
                    transport::tls::install_crypto_provider();
                    Some(Arc::new(TlsContext::load(&config.tls)?))
                } else {
                    None
                };
                Ok((auth, tls))
            })
            .await
            .map_err(|e| StartError::Tls(TlsError::Rustls(e.to_string())))??
        };
        let mut listeners = vec![(bind(config.listener.bind).await?, Transport::Tcp)];
        if config.tls.enabled {
            listeners.push((bind(config.tls.bind).await?, Transport::Tls));
        }
        if config.websocket.enabled {
            listeners.push((bind(config.websocket.bind).await?, Transport::WebSocket));
        }
        if config.websocket.tls_enabled {
            listeners.push((
                bind(config.websocket.tls_bind).await?,
                Transport::SecureWebSocket,
            ));
        }
        let address_of = |wanted: Transport| {
            listeners
                .iter()
                .find(|(_, transport)| *transport == wanted)
                .map(|((_, addr), _)| *addr)
        };
        let (mqtt_addr, tls_addr, ws_addr, wss_addr) = (
            listeners[0].0 .1,
            address_of(Transport::Tls),
            address_of(Transport::WebSocket),
            address_of(Transport::SecureWebSocket),
        );
        let metrics_listener = if config.metrics.enabled {
            Some(bind(config.metrics.bind).await?)
        } else {
            None
        };

        let memory = Arc::new(MemoryGuard::new(
            config.queue.memory_high_watermark,
            config.queue.memory_low_watermark,
        ));
        let limits = QueueLimits {
            max_messages: config.queue.max_messages,
            max_bytes: config.queue.max_bytes,
            qos0_first: config.queue.qos0_first,
        };
        let first_delayed_id = recovered.as_ref().map_or(1, |r| r.next_message_id);
        let router = Arc::new(Router::new(&config));
        let mut pipeline = Pipeline::new(router.clone(), store, config.dead_letter.clone());
        let sessions = Arc::new(SessionRegistry::new(limits, memory.clone()));
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let cluster = if config.cluster.enabled {
            let (outbox, forwarded) = tokio::sync::mpsc::channel(config.cluster.forward_queue);
            let (replication, to_replicate) =
                tokio::sync::mpsc::channel(config.cluster.forward_queue);
            let (direct, to_deliver) = tokio::sync::mpsc::channel(config.cluster.forward_queue);
            let persistent = Arc::new(PersistentFilters::default());
            pipeline = pipeline.with_outbox(outbox).with_replication(
                replication.clone(),
                direct,
                persistent.clone(),
            );
            let parts = cluster::Parts {
                router: router.clone(),
                pipeline: pipeline.clone(),
                registry: sessions.clone(),
                outbox: forwarded,
                replication: to_replicate,
                replication_sender: replication.clone(),
                direct: to_deliver,
                persistent,
                log_applied: recovered.as_ref().map_or(0, |r| r.log_applied),
            };
            Some(Cluster::start(&config.cluster, parts, shutdown.clone(), tracker.clone()).await?)
        } else {
            None
        };
        let state = Arc::new(BrokerState {
            started: Instant::now(),
            publish: pipeline,
            router,
            delayed: DelayedMessages::new(&config.delayed, first_delayed_id),
            sessions,
            cluster,
            memory,
            config,
            auth,
        });
        if let Some(mut recovered) = recovered {
            if state.cluster.is_some() {
                // The cluster's bucket holds the retained messages, loaded above; what this
                // node stored may have been replaced or cleared elsewhere since.
                recovered.retained.clear();
            }
            let delayed = std::mem::take(&mut recovered.delayed);
            info!(
                delayed = delayed.len(),
                "delayed messages restored from storage"
            );
            for (due, id, message) in delayed {
                state.delayed.restore(due, id, message);
            }
            let cleanup = publish::restore(&state.router, &state.sessions, recovered);
            state
                .publish
                .write(cleanup)
                .await
                .map_err(|source| StartError::Storage {
                    path: state.config.storage.data_dir.display().to_string(),
                    source,
                })?;
        }
        if let Some(cluster) = &state.cluster {
            cluster.sessions_restored(shutdown.clone());
        }
        let admission = Arc::new(Admission::new(&state.config.listener));
        for ((listener, addr), transport) in listeners {
            match transport {
                Transport::Tcp => info!(mqtt_addr = %addr, "listening for MQTT"),
                _ => info!(%addr, transport = transport.label(), "listening for MQTT"),
            }
            tracker.spawn(transport::accept(
                listener,
                transport,
                state.clone(),
                tls.clone(),
                admission.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        tracker.spawn(sweep_sessions(state.clone(), shutdown.clone()));
        tracker.spawn(close_silent_clients(state.clone(), shutdown.clone()));
        tracker.spawn({
            let (state, shutdown) = (state.clone(), shutdown.clone());
            async move { delayed::run(&state.delayed, &state.publish, shutdown).await }
        });
        tracker.spawn(sys_topics::run(state.clone(), shutdown.clone()));
        let metrics_addr = metrics_listener.map(|(listener, addr)| {
            tracker.spawn(exporter::serve(
                listener,
                state.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
            info!(%addr, "serving Prometheus metrics at /metrics");
            addr
        });
        Ok(Self {
            mqtt_addr,
            tls_addr,
            ws_addr,
            wss_addr,
            metrics_addr,
            state,
            tls,
            shutdown,
            tracker,
        })
    }

    /// Address of the plain MQTT listener (useful when bound to port 0).
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// Address of the MQTT over TLS listener, when enabled.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Address of the WebSocket listener, when enabled.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws_addr
    }

    /// Address of the secure WebSocket listener, when enabled.
    pub fn wss_addr(&self) -> Option<SocketAddr> {
        self.wss_addr
    }

    /// Re-reads the password file, the ACL and the TLS certificate files (what SIGHUP does).
    /// Connections stay up; new connections and new checks use the new files. A file that
    /// fails to load is reported (in the result and the log) and the one in force stays.
    pub async fn reload(&self) -> Result<(), Vec<String>> {
        let state = self.state.clone();
        let tls = self.tls.clone();
        let failures = tokio::task::spawn_blocking(move || {
            let mut failures = state.auth.reload();
            if let Some(tls) = &tls {
                match tls.reload() {
                    Ok(()) => {
                        info!("TLS certificates reloaded");
                        metrics::reloaded("tls", true);
                    }
                    Err(error) => {
                        warn!(%error, "TLS certificates not reloaded; the previous ones stay in force");
                        metrics::reloaded("tls", false);
                        failures.push(error.to_string());
                    }
                }
            }
            failures
        })
        .await
        .unwrap_or_else(|error| vec![error.to_string()]);
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures)
        }
    }

    /// Address of the Prometheus endpoint, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Number of sessions the broker holds, connected or not.
    pub fn session_count(&self) -> usize {
        self.state.sessions.len()
    }

    pub fn retained_count(&self) -> usize {
        self.state.router.retained_count()
    }

    pub fn subscription_count(&self) -> usize {
        self.state.router.subscription_count()
    }

    /// Delayed messages waiting to fall due.
    pub fn delayed_count(&self) -> usize {
        self.state.delayed.len()
    }

    /// Whether the memory guard has stopped reading from publishers.
    pub fn publishers_paused(&self) -> bool {
        self.state.memory.is_paused()
    }

    /// Bytes queued in every session's mailbox.
    pub fn queued_bytes(&self) -> usize {
        self.state.memory.queued_bytes()
    }

    /// Keys per storage column family (a scan; for tests and diagnostics).
    pub async fn storage_key_counts(&self) -> Vec<(&'static str, usize)> {
        let store = self.state.publish.store().clone();
        tokio::task::spawn_blocking(move || store.key_counts())
            .await
            .unwrap_or_default()
    }

    /// Stops accepting, disconnects every client (v5 clients with reason 0x8B) and waits for
    /// every task to finish.
    pub async fn shutdown(self) {
        // Connections not yet attached to a session watch the token (and check it once
        // attached); the attached ones are told through their sessions.
        self.shutdown.cancel();
        self.state.sessions.kick_all(Kick::ShuttingDown);
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            warn!("some connections did not close within the shutdown grace period");
        }
        self.state.publish.store().close().await;
        info!("broker stopped");
    }
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok((listener, local))
}

/// Closes connections whose client stayed silent past its keep alive, in passes
/// `KEEP_ALIVE_SWEEP` apart, so a connection closes at most that late.
async fn close_silent_clients(state: Arc<BrokerState>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(KEEP_ALIVE_SWEEP);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let closed = state.sessions.close_silent(clock::monotonic_ms());
        if closed > 0 {
            debug!(closed, "keep alive expired");
        }
    }
}

async fn sweep_sessions(state: Arc<BrokerState>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(SWEEP_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if state.memory.under_pressure() && state.publish.is_durable() {
            // Under memory pressure offline sessions keep only their queues' bookkeeping.
            let freed: usize = state
                .sessions
                .offline_persistent()
                .iter()
                .map(|session| session.mailbox.spill())
                .sum();
            if freed > 0 {
                info!(freed_bytes = freed, "spilled offline queues to storage");
            }
        }
        let Swept { ended, due_wills } = state.sessions.sweep(clock::now());
        if !ended.is_empty() {
            metrics::sessions_expired(ended.len());
        }
        state.publish.finish_ended_sessions(ended).await;
        for due in due_wills {
            state.publish.publish(due.message).await;
            state.publish.forget_will(&due.session).await;
            if let Some(cluster) = &state.cluster {
                cluster.forget_will(&due.session.client_id).await;
            }
        }
    }
}
