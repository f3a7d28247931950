//! Session state that outlives a network connection (spec §4.1).
//!
//! A session has two parts. [`SessionHandle`] is shared: the router pushes deliveries into its
//! bounded [`Mailbox`] whether or not a client is connected, and the registry keeps it while the
//! session exists. [`SessionState`] (subscriptions, the outbound in-flight window, inbound QoS 2
//! packet ids) is owned by exactly one party at a time: the live connection task while a client is
//! connected, the handle while it is not. Both are plain data so that storage can persist them.

pub mod inflight;
pub mod mailbox;
mod registry;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::message::Message;
use crate::overload::MemoryGuard;
use crate::router::SubscriptionOptions;
use crate::sync::lock;

pub use inflight::Inflight;
pub use mailbox::{Mailbox, Pushed, QueueLimits};
pub use registry::{
    Attached, Detached, DueWill, EndedSession, QueueStats, SessionRegistry, Swept, WillWithDelay,
};

/// Session Expiry Interval value meaning "never expires" [MQTT-3.1.2-?, §3.1.2.11.2].
pub const NEVER_EXPIRES: u32 = u32::MAX;

#[derive(Clone, Debug, Default)]
pub struct SessionState {
    /// Topic filter → options, mirrored in the router's trie.
    pub subscriptions: HashMap<String, SubscriptionOptions>,
    pub inflight: Inflight,
    /// QoS 2 packet ids received and acknowledged with PUBREC, awaiting PUBREL. A PUBLISH that
    /// reuses one of them is a retransmission and is not routed again [MQTT-4.3.3-10].
    pub inbound_qos2: HashSet<u16>,
}

/// A will message waiting out its Will Delay Interval [MQTT-3.1.3-9].
#[derive(Debug)]
pub struct PendingWill {
    pub message: Arc<Message>,
    pub delay_interval: u32,
    pub publish_at: SystemTime,
}

/// The connection currently attached to a session.
#[derive(Debug)]
pub struct LiveConnection {
    pub id: u64,
    /// Cancelled to make the connection close (session takeover).
    pub kick: CancellationToken,
    /// Completes when that connection has handed the session state back.
    pub done: oneshot::Receiver<()>,
}

#[derive(Debug)]
pub struct SessionInner {
    /// `None` while a connection owns the state.
    pub state: Option<SessionState>,
    pub live: Option<LiveConnection>,
    /// Seconds after disconnect before the session is discarded.
    pub expiry_interval: u32,
    pub disconnected_at: Option<SystemTime>,
    pub pending_will: Option<PendingWill>,
    /// Protocol level (3, 4, 5) of the last connection, kept in the stored session record.
    pub protocol_level: u8,
}

impl SessionInner {
    pub fn expires_at(&self) -> Option<SystemTime> {
        if self.expiry_interval == NEVER_EXPIRES {
            return None;
        }
        self.disconnected_at
            .map(|at| at + Duration::from_secs(u64::from(self.expiry_interval)))
    }
}

#[derive(Debug)]
pub struct SessionHandle {
    pub client_id: Arc<str>,
    pub mailbox: Mailbox,
    /// Whether a client is connected; read on the publish path without taking `inner`.
    online: AtomicBool,
    /// Whether the session outlives its connection (expiry > 0), so its QoS 1/2 deliveries
    /// are persisted.
    persistent: AtomicBool,
    /// Whether the session was ever persistent, so storage may hold some of it.
    ever_persistent: AtomicBool,
    /// Set once the session is discarded: deliveries still arriving for it are released.
    ended: AtomicBool,
    /// Set when the connection is kicked for letting its queue overflow under the `disconnect`
    /// policy, so it closes as a slow consumer rather than as taken over.
    slow_consumer: AtomicBool,
    /// Next queue sequence number.
    next_seq: AtomicU64,
    inner: Mutex<SessionInner>,
}

impl SessionHandle {
    pub fn new(
        client_id: Arc<str>,
        limits: QueueLimits,
        guard: Arc<MemoryGuard>,
        first_seq: u64,
    ) -> Self {
        Self {
            client_id,
            mailbox: Mailbox::new(limits, guard),
            online: AtomicBool::new(false),
            persistent: AtomicBool::new(false),
            ever_persistent: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            slow_consumer: AtomicBool::new(false),
            next_seq: AtomicU64::new(first_seq),
            inner: Mutex::new(SessionInner {
                state: None,
                live: None,
                expiry_interval: 0,
                disconnected_at: None,
                pending_will: None,
                protocol_level: 0,
            }),
        }
    }

    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    fn set_online(&self, online: bool) {
        self.online.store(online, Ordering::Release);
    }

    pub fn is_persistent(&self) -> bool {
        self.persistent.load(Ordering::Acquire)
    }

    fn set_persistent(&self, persistent: bool) {
        if persistent {
            self.ever_persistent.store(true, Ordering::Release);
        }
        self.persistent.store(persistent, Ordering::Release);
    }

    /// Whether storage may hold anything of this session.
    pub fn may_be_stored(&self) -> bool {
        self.ever_persistent.load(Ordering::Acquire)
    }

    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    fn set_ended(&self) {
        self.ended.store(true, Ordering::Release);
    }

    /// Disconnects the live connection, if any, as a slow consumer.
    pub fn kick_slow_consumer(&self) {
        let inner = self.inner();
        if let Some(live) = &inner.live {
            self.slow_consumer.store(true, Ordering::Release);
            live.kick.cancel();
        }
    }

    /// Whether the last kick was for being a slow consumer (and forgets it).
    pub fn take_slow_consumer(&self) -> bool {
        self.slow_consumer.swap(false, Ordering::AcqRel)
    }

    /// Reserves the next queue sequence number.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    fn peek_next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed)
    }

    pub fn inner(&self) -> MutexGuard<'_, SessionInner> {
        lock(&self.inner)
    }
}
