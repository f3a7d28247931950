//! The registry of sessions by client identifier: attaching a connection to a session (new,
//! resumed or taken over), detaching it, restoring sessions from storage, and expiring sessions
//! and delayed wills.
//!
//! It only changes memory. What it ended or kept is returned to the caller, which has the
//! storage handle and persists it.
//!
//! Lock order: registry map → `SessionHandle::inner` → mailbox. Nothing here is held across an
//! `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use super::{Kick, LiveConnection, PendingWill, QueueLimits, SessionHandle, SessionState};
use crate::clock;
use crate::message::{Delivery, Message};
use crate::overload::MemoryGuard;
use crate::sync::lock;

/// How long a new connection waits for the connection it takes over to hand back the session.
const TAKEOVER_GRACE: Duration = Duration::from_secs(5);

/// A connection's claim on a session, returned by [`SessionRegistry::attach`].
#[derive(Debug)]
pub struct Attached {
    pub handle: Arc<SessionHandle>,
    pub state: SessionState,
    pub session_present: bool,
    pub connection_id: u64,
    /// The previous session of this client id, discarded by Clean Start or expiry.
    pub ended: Option<EndedSession>,
}

/// A session that no longer exists: what it still held, for storage clean-up, the
/// subscriptions the router must drop, and its will.
#[derive(Debug)]
pub struct EndedSession {
    pub handle: Arc<SessionHandle>,
    pub client_id: Arc<str>,
    /// Its subscriptions' filters: the router still holds them (the registry does not reach
    /// into the router), so whoever takes this removes them.
    pub filters: Vec<String>,
    pub store_id: u64,
    /// Deliveries that were queued or in flight; their storage references must be released.
    pub deliveries: Vec<Delivery>,
    /// Its will, due now that the session is over [MQTT-3.1.3-9].
    pub will: Option<Arc<Message>>,
    /// Whether anything of it was in storage.
    pub was_persistent: bool,
}

/// A will message with its Will Delay Interval in seconds.
pub type WillWithDelay = (Arc<Message>, u32);

/// Counts for the metrics endpoint.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub online: usize,
    pub offline: usize,
    pub queued_messages: usize,
    pub deepest: usize,
}

/// What a sweep of the registry found.
#[derive(Debug, Default)]
pub struct Swept {
    /// Sessions whose expiry passed.
    pub ended: Vec<EndedSession>,
    /// Delayed wills now due.
    pub due_wills: Vec<DueWill>,
}

/// A delayed will whose time has come, and the (offline) session it belonged to.
#[derive(Debug)]
pub struct DueWill {
    pub session: Arc<SessionHandle>,
    pub message: Arc<Message>,
}

/// What became of a session when its connection went away.
#[derive(Debug)]
pub enum Detached {
    /// The session lives on; `will_now` is a will without delay, to publish now.
    Kept { will_now: Option<Arc<Message>> },
    /// The session ended with the connection (expiry 0).
    Ended(EndedSession),
    /// Another connection owns the session already; only the will is left to publish.
    Stale { will: Option<Arc<Message>> },
}

#[derive(Debug)]
pub struct SessionRegistry {
    sessions: Mutex<HashMap<Arc<str>, Arc<SessionHandle>>>,
    /// Shared by every session's mailbox rather than copied into each.
    limits: Arc<QueueLimits>,
    guard: Arc<MemoryGuard>,
    next_connection_id: AtomicU64,
    /// Next session store id (`SessionHandle::store_id`); continues above what storage holds.
    next_store_id: AtomicU64,
    /// Notified whenever a connection has finished closing; see [`Self::finished_closing`].
    finished_closing: Notify,
}

impl SessionRegistry {
    pub fn new(limits: QueueLimits, guard: Arc<MemoryGuard>) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            limits: Arc::new(limits),
            guard,
            next_connection_id: AtomicU64::new(1),
            next_store_id: AtomicU64::new(1),
            finished_closing: Notify::new(),
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.sessions).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, client_id: &str) -> bool {
        lock(&self.sessions).contains_key(client_id)
    }

    /// Sessions online and offline, messages queued in all of them and in the deepest one.
    pub fn queue_stats(&self) -> QueueStats {
        let sessions = lock(&self.sessions);
        let mut stats = QueueStats::default();
        for handle in sessions.values() {
            if handle.is_online() {
                stats.online += 1;
            } else {
                stats.offline += 1;
            }
            let queued = handle.mailbox.len();
            stats.queued_messages += queued;
            stats.deepest = stats.deepest.max(queued);
        }
        stats
    }

    /// Closes the connections whose client stayed silent for one and a half keep-alive periods
    /// [MQTT-3.1.2-24]. Run periodically: one pass over the sessions costs the broker less
    /// than a timer per connection costs each idle connection's memory. Returns how many.
    pub fn close_silent(&self, now_ms: u64) -> usize {
        let mut closed = 0;
        for handle in lock(&self.sessions).values() {
            if handle.is_online() && handle.is_silent(now_ms) {
                handle.kick_live(Kick::KeepAliveTimeout);
                closed += 1;
            }
        }
        closed
    }

    /// Tells every connected client's connection to close for `reason`.
    pub fn kick_all(&self, reason: Kick) {
        for handle in lock(&self.sessions).values() {
            handle.kick_live(reason);
        }
    }

    /// Sessions whose client is offline and which outlive their connection.
    pub fn offline_persistent(&self) -> Vec<Arc<SessionHandle>> {
        lock(&self.sessions)
            .values()
            .filter(|handle| !handle.is_online() && handle.is_persistent())
            .cloned()
            .collect()
    }

    /// Every persistent session, connected or not.
    pub fn persistent_sessions(&self) -> Vec<Arc<SessionHandle>> {
        lock(&self.sessions)
            .values()
            .filter(|handle| handle.is_persistent())
            .cloned()
            .collect()
    }

    /// Adds an offline session rebuilt from storage.
    pub fn restore(
        &self,
        handle: Arc<SessionHandle>,
        expiry_interval: u32,
        disconnected_at: SystemTime,
    ) {
        {
            let mut inner = handle.inner();
            inner.expiry_interval = expiry_interval;
            inner.disconnected_at = Some(disconnected_at);
        }
        handle.set_persistent(true);
        handle.mailbox.set_spillable(true);
        lock(&self.sessions).insert(handle.client_id.clone(), handle);
    }

    /// A fresh, empty handle for a client id (not registered), with a new store id.
    pub fn new_handle(&self, client_id: Arc<str>, first_seq: u64) -> SessionHandle {
        let store_id = self.next_store_id.fetch_add(1, Ordering::Relaxed);
        self.handle_with_store_id(client_id, store_id, first_seq)
    }

    /// An empty handle for a session read back from storage (not registered).
    pub fn handle_with_store_id(
        &self,
        client_id: Arc<str>,
        store_id: u64,
        first_seq: u64,
    ) -> SessionHandle {
        SessionHandle::new(
            client_id,
            store_id,
            self.limits.clone(),
            self.guard.clone(),
            first_seq,
        )
    }

    /// New store ids continue from `next` (recovery: above every id storage mentions).
    pub fn continue_store_ids_from(&self, next: u64) {
        self.next_store_id.fetch_max(next, Ordering::Relaxed);
    }

    /// Attaches a new connection to the session of `client_id`, closing any connection that
    /// holds it now [MQTT-3.1.4-3]. With `clean_start`, or when the old session has expired, the
    /// old session is discarded [MQTT-3.1.2-4]; otherwise it is resumed [MQTT-3.1.2-5].
    pub async fn attach(
        &self,
        client_id: Arc<str>,
        clean_start: bool,
        expiry_interval: u32,
        protocol_level: u8,
    ) -> Attached {
        let connection_id = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
        loop {
            let previous = {
                let mut sessions = lock(&self.sessions);
                let now = clock::now();
                let existing = sessions.get(&client_id).cloned();
                let mut taken_over = None;
                let mut resumed = None;
                if let Some(handle) = &existing {
                    let mut inner = handle.inner();
                    if let Some(live) = inner.live.take() {
                        taken_over = Some((handle.clone(), live));
                    } else {
                        let expired = inner.expires_at().is_some_and(|at| at <= now);
                        if !clean_start && !expired {
                            resumed =
                                Some(inner.state.take().map(|state| *state).unwrap_or_default());
                            // Reconnecting before the will delay passed cancels the will [MQTT-3.1.3-9].
                            inner.pending_will = None;
                        }
                    }
                }
                if let Some(live) = taken_over {
                    live
                } else {
                    let live = LiveConnection { id: connection_id };
                    let mut ended = None;
                    let (handle, state, session_present) = match (existing, resumed) {
                        (Some(handle), Some(state)) => (handle, state, true),
                        (existing, _) => {
                            let mut first_seq = 0;
                            if let Some(old) = existing {
                                sessions.remove(&client_id);
                                // Continue the old numbering: late writes for the old session
                                // can never land on keys of the new one.
                                first_seq = old.peek_next_seq();
                                ended = Some(end_session(&old, None));
                            }
                            let handle = Arc::new(self.new_handle(client_id.clone(), first_seq));
                            sessions.insert(client_id.clone(), handle.clone());
                            (handle, SessionState::default(), false)
                        }
                    };
                    {
                        let mut inner = handle.inner();
                        inner.live = Some(live);
                        inner.protocol_level = protocol_level;
                        inner.expiry_interval = expiry_interval;
                        inner.disconnected_at = None;
                    }
                    handle.set_persistent(expiry_interval > 0);
                    handle.set_online(true);
                    return Attached {
                        handle,
                        state,
                        session_present,
                        connection_id,
                        ended,
                    };
                }
            };
            let (handle, previous) = previous;
            handle.kick(previous.id, Kick::TakenOver);
            if tokio::time::timeout(TAKEOVER_GRACE, self.finished(&handle, previous.id))
                .await
                .is_err()
            {
                tracing::warn!(client_id = %client_id, "taken-over connection did not hand its session back in time");
            }
        }
    }

    /// Another node took `client_id`'s session over: closes its connection here (as a takeover,
    /// [MQTT-3.1.4-3]) and waits until it has handed the session back. Returns the session and
    /// its subscriptions' filters, which the caller removes from the router: the session stays
    /// here with what it had queued, for the client to collect if it comes back to this node,
    /// but takes no more messages.
    pub async fn hand_to_other_node(
        &self,
        client_id: &str,
    ) -> Option<(Arc<SessionHandle>, Vec<String>)> {
        let handle = lock(&self.sessions).get(client_id).cloned()?;
        let live = handle.inner().live.as_ref().map(|live| live.id);
        if let Some(id) = live {
            handle.kick(id, Kick::TakenOver);
            if tokio::time::timeout(TAKEOVER_GRACE, self.finished(&handle, id))
                .await
                .is_err()
            {
                tracing::warn!(%client_id, "connection taken over by another node did not close in time");
            }
        }
        let filters = handle
            .inner()
            .state
            .as_ref()
            .map(|state| state.subscriptions.keys().cloned().collect())
            .unwrap_or_default();
        Some((handle, filters))
    }

    /// Ends the session of `client_id` if no connection holds it (another node's client started
    /// clean); the caller finishes what it returns as for any ended session.
    pub fn discard(&self, client_id: &str) -> Option<EndedSession> {
        let mut sessions = lock(&self.sessions);
        let handle = sessions.get(client_id)?;
        if handle.inner().live.is_some() {
            return None;
        }
        let handle = sessions.remove(client_id)?;
        Some(end_session(&handle, None))
    }

    /// Resolves once connection `connection_id` of `handle` has finished closing.
    async fn finished(&self, handle: &SessionHandle, connection_id: u64) {
        loop {
            // Registered before the check, so a finish between the two still wakes this.
            let notified = self.finished_closing.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if handle.has_finished(connection_id) {
                return;
            }
            notified.await;
        }
    }

    /// Called by a connection once it has closed and handed everything back: a takeover
    /// waiting for it may proceed. One notification shared by all sessions rather than a
    /// channel per connection; takeovers are rare and re-check their own session.
    pub fn finished_closing(&self, handle: &SessionHandle, connection_id: u64) {
        handle.set_finished(connection_id);
        self.finished_closing.notify_waiters();
    }

    /// Hands the session back when a connection ends.
    ///
    /// `will` is the connection's will when it closed without a normal DISCONNECT; with a Will
    /// Delay Interval it waits in the session until the delay or the session ends, whichever is
    /// first [MQTT-3.1.3-9].
    pub fn detach(
        &self,
        handle: &Arc<SessionHandle>,
        connection_id: u64,
        state: SessionState,
        expiry_interval: u32,
        will: Option<WillWithDelay>,
    ) -> Detached {
        let mut sessions = lock(&self.sessions);
        let mut inner = handle.inner();
        match &inner.live {
            Some(live) if live.id != connection_id => {
                return Detached::Stale {
                    will: will.map(|(message, _)| message),
                };
            }
            Some(_) => inner.live = None,
            None => {}
        }
        handle.set_online(false);
        let is_registered = sessions
            .get(&handle.client_id)
            .is_some_and(|h| Arc::ptr_eq(h, handle));
        if expiry_interval == 0 || !is_registered {
            if is_registered {
                sessions.remove(&handle.client_id);
            }
            drop(inner);
            return Detached::Ended(end_session(handle, Some((state, will))));
        }
        let now = clock::now();
        inner.state = Some(Box::new(state));
        inner.expiry_interval = expiry_interval;
        inner.disconnected_at = Some(now);
        let will_now = match will {
            Some((message, delay)) if delay > 0 => {
                inner.pending_will = Some(Box::new(PendingWill {
                    message,
                    delay_interval: delay,
                    publish_at: now + Duration::from_secs(u64::from(delay)),
                }));
                None
            }
            Some((message, _)) => Some(message),
            None => None,
        };
        Detached::Kept { will_now }
    }

    /// Discards expired offline sessions and takes wills whose delay has passed.
    pub fn sweep(&self, now: SystemTime) -> Swept {
        let mut ended = Vec::new();
        let mut due_wills = Vec::new();
        let mut sessions = lock(&self.sessions);
        sessions.retain(|_, handle| {
            let mut inner = handle.inner();
            if inner.live.is_some() {
                return true;
            }
            if inner.expires_at().is_some_and(|at| at <= now) {
                drop(inner);
                ended.push(end_session(handle, None));
                return false;
            }
            if inner
                .pending_will
                .as_ref()
                .is_some_and(|will| will.publish_at <= now)
            {
                if let Some(will) = inner.pending_will.take() {
                    due_wills.push(DueWill {
                        session: handle.clone(),
                        message: will.message,
                    });
                }
            }
            true
        });
        Swept { ended, due_wills }
    }
}

/// Discards a session: collects what it held, its subscriptions and its will. `live` carries
/// the state and will of the connection that is ending it, if any.
fn end_session(
    handle: &Arc<SessionHandle>,
    live: Option<(SessionState, Option<WillWithDelay>)>,
) -> EndedSession {
    handle.set_ended();
    let was_persistent = handle.may_be_stored();
    handle.set_persistent(false);
    let (state, will) = {
        let mut inner = handle.inner();
        let pending = inner.pending_will.take().map(|w| w.message);
        match live {
            Some((state, will)) => (Some(state), will.map(|(message, _)| message).or(pending)),
            None => (inner.state.take().map(|state| *state), pending),
        }
    };
    let mut deliveries = handle.mailbox.drain();
    let mut filters = Vec::new();
    if let Some(mut state) = state {
        filters.extend(state.subscriptions.keys().cloned());
        deliveries.extend(state.inflight.drain().map(|entry| entry.delivery));
    }
    EndedSession {
        handle: handle.clone(),
        filters,
        client_id: handle.client_id.clone(),
        store_id: handle.store_id,
        deliveries,
        will,
        was_persistent,
    }
}
