//! Session state that outlives a network connection (spec §4.1).
//!
//! A session has two parts. [`SessionHandle`] is shared: the router pushes deliveries into its
//! bounded [`Mailbox`] whether or not a client is connected, and the registry keeps it while the
//! session exists. [`SessionState`] (subscriptions, the outbound in-flight window, inbound QoS 2
//! packet ids) is owned by exactly one party at a time: the live connection task while a client is
//! connected, the handle while it is not. Both are plain data so that storage can persist them.

pub mod inflight;
pub mod log_position;
pub mod mailbox;
mod registry;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::message::Message;
use crate::overload::MemoryGuard;
use crate::protocol::SubscriptionOptions;
use crate::small_map::SmallMap;
use crate::sync::lock;

pub use inflight::Inflight;
pub use log_position::{LogPosition, Position};
pub use mailbox::{Mailbox, Pushed, QueueLimits};
pub use registry::{
    Attached, Detached, DueWill, EndedSession, QueueStats, SessionRegistry, Swept, WillWithDelay,
};

/// Session Expiry Interval value meaning "never expires" [MQTT-3.1.2-?, §3.1.2.11.2].
pub const NEVER_EXPIRES: u32 = u32::MAX;

#[derive(Clone, Debug, Default)]
pub struct SessionState {
    /// Topic filter → options, mirrored in the router's trie. Most clients have one or two.
    pub subscriptions: SmallMap<String, SubscriptionOptions>,
    pub inflight: Inflight,
    /// QoS 2 packet ids received and acknowledged with PUBREC, awaiting PUBREL. A PUBLISH that
    /// reuses one of them is a retransmission and is not routed again [MQTT-4.3.3-10].
    pub inbound_qos2: SmallMap<u16, ()>,
}

/// A will message waiting out its Will Delay Interval [MQTT-3.1.3-9].
#[derive(Debug)]
pub struct PendingWill {
    pub message: Arc<Message>,
    pub delay_interval: u32,
    pub publish_at: SystemTime,
}

/// Why a connection is told to close by someone other than its client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kick {
    /// Another connection with the same client id took the session over.
    TakenOver = 1,
    /// Its queue overflowed under the `disconnect` policy.
    SlowConsumer = 2,
    ShuttingDown = 3,
    /// The client stayed silent past its keep alive.
    KeepAliveTimeout = 4,
}

impl Kick {
    fn from_bits(bits: u64) -> Option<Self> {
        match bits {
            1 => Some(Self::TakenOver),
            2 => Some(Self::SlowConsumer),
            3 => Some(Self::ShuttingDown),
            4 => Some(Self::KeepAliveTimeout),
            _ => None,
        }
    }
}

/// The connection currently attached to a session.
#[derive(Debug)]
pub struct LiveConnection {
    pub id: u64,
}

#[derive(Debug)]
pub struct SessionInner {
    /// `None` while a connection owns the state. Boxed: the connection holds it then, and an
    /// online session should not reserve a second copy's room here.
    pub state: Option<Box<SessionState>>,
    pub live: Option<LiveConnection>,
    /// Seconds after disconnect before the session is discarded.
    pub expiry_interval: u32,
    pub disconnected_at: Option<SystemTime>,
    /// Boxed: rare, and every session would reserve its room.
    pub pending_will: Option<Box<PendingWill>>,
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
    /// Names the session in storage (`queue` keys, message records); never reused, so a new
    /// session for the same client id is never mistaken for the old one's leftovers.
    pub store_id: u64,
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
    /// The connection told to close and why: its id shifted left by three, or'ed with the
    /// [`Kick`]. One word, so a reader never pairs one kick's connection with another's reason;
    /// the connection's own wake-up is the mailbox's notification, so an idle connection does
    /// not hold a cancellation token and a future waiting on it.
    kicked: AtomicU64,
    /// Next queue sequence number.
    next_seq: AtomicU64,
    /// The live connection's keep alive: when it last heard from its client (milliseconds of
    /// `clock::monotonic_ms`) shifted left by 16, or'ed with the Keep Alive in seconds (0: none).
    /// One word, written by the connection as packets arrive and read by the keep-alive sweep
    /// ([`SessionRegistry::close_silent`]).
    heard: AtomicU64,
    /// The highest id of this session's connections that finished closing: a takeover waits
    /// for the connection it displaces to get here.
    finished: AtomicU64,
    /// In a cluster: the session's place in the replication log. Allocated on first use, so a
    /// single node's sessions do not carry it.
    log: std::sync::OnceLock<Box<LogPosition>>,
    inner: Mutex<SessionInner>,
}

impl SessionHandle {
    pub fn new(
        client_id: Arc<str>,
        store_id: u64,
        limits: Arc<QueueLimits>,
        guard: Arc<MemoryGuard>,
        first_seq: u64,
    ) -> Self {
        Self {
            client_id,
            store_id,
            mailbox: Mailbox::new(limits, guard),
            online: AtomicBool::new(false),
            persistent: AtomicBool::new(false),
            ever_persistent: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            kicked: AtomicU64::new(0),
            next_seq: AtomicU64::new(first_seq),
            heard: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            log: std::sync::OnceLock::new(),
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

    /// The session's place in a cluster's replication log.
    pub fn log(&self) -> &LogPosition {
        self.log.get_or_init(Box::default)
    }

    /// [`SessionHandle::log`] if it was ever used.
    pub fn log_if_any(&self) -> Option<&LogPosition> {
        self.log.get().map(|log| &**log)
    }

    /// `delivery` is done with (see [`LogPosition::done_at`]); nothing to do for one that did
    /// not come through the log.
    pub fn log_done(&self, delivery: &crate::message::Delivery) {
        if let Some(seq) = delivery.log_seq {
            self.log().done_at(seq);
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

    /// Disconnects the live connection, if any, for `reason`.
    pub fn kick_live(&self, reason: Kick) {
        let inner = self.inner();
        if let Some(live) = &inner.live {
            self.kick(live.id, reason);
        }
    }

    /// Tells connection `connection_id` to close for `reason`. It notices when it next wakes,
    /// which the mailbox's notification makes happen now.
    pub fn kick(&self, connection_id: u64, reason: Kick) {
        self.kicked
            .store(connection_id << 3 | reason as u64, Ordering::Release);
        self.mailbox.wake();
    }

    /// Why connection `connection_id` was told to close, if it was.
    pub fn kicked(&self, connection_id: u64) -> Option<Kick> {
        let kicked = self.kicked.load(Ordering::Acquire);
        if kicked >> 3 != connection_id {
            return None;
        }
        Kick::from_bits(kicked & 0b111)
    }

    /// Records that the live connection, with Keep Alive `keep_alive` seconds, heard from its
    /// client at `now_ms`.
    pub fn heard_from_client(&self, keep_alive: u16, now_ms: u64) {
        self.heard
            .store(now_ms << 16 | u64::from(keep_alive), Ordering::Relaxed);
    }

    /// Whether the live connection's client stayed silent for one and a half keep-alive
    /// periods as of `now_ms` [MQTT-3.1.2-24].
    fn is_silent(&self, now_ms: u64) -> bool {
        let heard = self.heard.load(Ordering::Relaxed);
        let keep_alive = heard & 0xFFFF;
        keep_alive > 0 && now_ms.saturating_sub(heard >> 16) >= keep_alive * 1500
    }

    fn set_finished(&self, connection_id: u64) {
        self.finished.fetch_max(connection_id, Ordering::AcqRel);
    }

    /// Whether connection `connection_id` (or a later one) finished closing.
    fn has_finished(&self, connection_id: u64) -> bool {
        self.finished.load(Ordering::Acquire) >= connection_id
    }

    /// Reserves the next queue sequence number.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// The next queue sequence number whose packet identifier is the one a delivery at log
    /// position `log_seq` gets on every node ([`inflight::packet_id_for`] of both agree): a
    /// session replayed on another node re-sends a message it had in flight with the packet
    /// identifier the client knows it by, so a QoS 2 message is not taken twice
    /// [MQTT-4.3.3-9]. Sequence numbers stay increasing; they skip ahead.
    pub fn next_seq_for_log(&self, log_seq: u64) -> u64 {
        let modulus = u64::from(u16::MAX);
        let mut current = self.next_seq.load(Ordering::Relaxed);
        loop {
            let ahead = (log_seq % modulus + modulus - current % modulus) % modulus;
            let seq = current + ahead;
            match self.next_seq.compare_exchange_weak(
                current,
                seq + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return seq,
                Err(actual) => current = actual,
            }
        }
    }

    fn peek_next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed)
    }

    pub fn inner(&self) -> MutexGuard<'_, SessionInner> {
        lock(&self.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> SessionHandle {
        let limits = Arc::new(QueueLimits {
            max_messages: 10,
            max_bytes: 1 << 20,
            qos0_first: false,
        });
        let guard = Arc::new(MemoryGuard::new(usize::MAX, usize::MAX - 1));
        SessionHandle::new("c".into(), 1, limits, guard, 0)
    }

    proptest::proptest! {
        /// Whatever the session's counter, a log delivery gets the packet identifier its log
        /// position names, and sequence numbers only increase.
        #[test]
        fn a_log_delivery_has_the_same_packet_id_on_every_node(
            start in 0u64..1_000_000,
            log_seqs in proptest::collection::vec(1u64..10_000_000, 1..20),
        ) {
            let handle = handle();
            handle.next_seq.store(start, Ordering::Relaxed);
            let mut last = None;
            for log_seq in log_seqs {
                let seq = handle.next_seq_for_log(log_seq);
                proptest::prop_assert_eq!(
                    inflight::packet_id_for(seq),
                    inflight::packet_id_for(log_seq)
                );
                proptest::prop_assert!(last.is_none_or(|last| seq > last));
                proptest::prop_assert!(seq >= start);
                last = Some(seq);
            }
        }
    }

    #[test]
    fn silent_after_one_and_a_half_keep_alives_and_never_without_one() {
        let handle = handle();
        handle.heard_from_client(2, 10_000);
        assert!(!handle.is_silent(12_999));
        assert!(handle.is_silent(13_000));
        handle.heard_from_client(2, 12_500);
        assert!(!handle.is_silent(13_000));
        handle.heard_from_client(0, 10_000);
        assert!(!handle.is_silent(u64::MAX >> 16));
        handle.heard_from_client(u16::MAX, 1);
        assert!(!handle.is_silent(1 + 65_535 * 1_500 - 1));
        assert!(handle.is_silent(1 + 65_535 * 1_500));
    }

    #[test]
    fn a_kick_names_one_connection_and_its_reason() {
        let handle = handle();
        assert_eq!(handle.kicked(7), None);
        for reason in [
            Kick::TakenOver,
            Kick::SlowConsumer,
            Kick::ShuttingDown,
            Kick::KeepAliveTimeout,
        ] {
            handle.kick(7, reason);
            assert_eq!(handle.kicked(7), Some(reason));
            assert_eq!(handle.kicked(8), None);
        }
        // A takeover's new connection is not the kicked one.
        handle.kick(u64::MAX >> 3, Kick::TakenOver);
        assert_eq!(handle.kicked(u64::MAX >> 3), Some(Kick::TakenOver));
        assert_eq!(handle.kicked(7), None);
    }
}
