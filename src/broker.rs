//! Wiring: builds the shared state, binds listeners, runs background tasks and shuts it all down.
//! No protocol logic lives here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, ConfigError};
use crate::metrics;
use crate::router::Router;
use crate::session::SessionRegistry;
use crate::transport;

/// How often offline sessions are checked for expiry and delayed wills for being due.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How long shutdown waits for connections to say goodbye.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// State shared by every connection task.
#[derive(Debug)]
pub struct BrokerState {
    pub config: Config,
    pub router: Router,
    pub sessions: SessionRegistry,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
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
    state: Arc<BrokerState>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Broker {
    /// Validates the configuration, binds the listeners and starts serving.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        config.validate()?;
        metrics::describe();
        let bind = config.listener.bind;
        let listener = TcpListener::bind(bind)
            .await
            .map_err(|source| StartError::Bind { addr: bind, source })?;
        let mqtt_addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr: bind, source })?;

        let state = Arc::new(BrokerState {
            router: Router::new(config.mqtt.queue_qos0_offline),
            sessions: SessionRegistry::new(config.mqtt.max_queued_messages),
            config,
        });
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let permits = Arc::new(Semaphore::new(state.config.listener.max_connections));
        tracker.spawn(transport::accept_tcp(
            listener,
            state.clone(),
            permits,
            shutdown.clone(),
            tracker.clone(),
        ));
        tracker.spawn(sweep_sessions(state.clone(), shutdown.clone()));
        info!(%mqtt_addr, "listening for MQTT");
        Ok(Self {
            mqtt_addr,
            state,
            shutdown,
            tracker,
        })
    }

    /// Address of the plain MQTT listener (useful when bound to port 0).
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
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

    /// Stops accepting, disconnects every client (v5 clients with reason 0x8B) and waits for
    /// every task to finish.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            warn!("some connections did not close within the shutdown grace period");
        }
        info!("broker stopped");
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
        let expired = state.sessions.sweep(&state.router, Instant::now());
        if expired > 0 {
            metrics::sessions_expired(expired);
        }
    }
}
