//! The registry of sessions by client identifier: attaching a connection to a session (new,
//! resumed or taken over), detaching it, and expiring sessions and delayed wills.
//!
//! Lock order: registry map → `SessionHandle::inner` → router trie → mailbox. Nothing here is
//! held across an `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{LiveConnection, PendingWill, SessionHandle, SessionState};
use crate::message::Message;
use crate::router::Router;
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
    /// Cancelled when another connection takes the session over.
    pub kick: CancellationToken,
    /// Sent when the connection has detached, so a waiting takeover can proceed.
    pub done: oneshot::Sender<()>,
}

#[derive(Debug)]
pub struct SessionRegistry {
    sessions: Mutex<HashMap<Arc<str>, Arc<SessionHandle>>>,
    mailbox_capacity: usize,
    next_connection_id: AtomicU64,
}

impl SessionRegistry {
    pub fn new(mailbox_capacity: usize) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            mailbox_capacity,
            next_connection_id: AtomicU64::new(1),
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

    /// Attaches a new connection to the session of `client_id`, closing any connection that
    /// holds it now [MQTT-3.1.4-3]. With `clean_start`, or when the old session has expired, the
    /// old session is discarded [MQTT-3.1.2-4]; otherwise it is resumed [MQTT-3.1.2-5].
    pub async fn attach(
        &self,
        router: &Router,
        client_id: Arc<str>,
        clean_start: bool,
        expiry_interval: u32,
    ) -> Attached {
        let connection_id = self.next_connection_id.fetch_add(1, Ordering::Relaxed);
        loop {
            let previous = {
                let mut sessions = lock(&self.sessions);
                let now = Instant::now();
                let existing = sessions.get(&client_id).cloned();
                let mut taken_over = None;
                let mut resumed = None;
                if let Some(handle) = &existing {
                    let mut inner = handle.inner();
                    if let Some(live) = inner.live.take() {
                        taken_over = Some(live);
                    } else {
                        let expired = inner.expires_at().is_some_and(|at| at <= now);
                        if !clean_start && !expired {
                            resumed = Some(inner.state.take().unwrap_or_default());
                            // Reconnecting before the will delay passed cancels the will [MQTT-3.1.3-9].
                            inner.pending_will = None;
                        }
                    }
                }
                if let Some(live) = taken_over {
                    live
                } else {
                    let (done, done_rx) = oneshot::channel();
                    let kick = CancellationToken::new();
                    let live = LiveConnection {
                        id: connection_id,
                        kick: kick.clone(),
                        done: done_rx,
                    };
                    let (handle, state, session_present) = match (existing, resumed) {
                        (Some(handle), Some(state)) => (handle, state, true),
                        (existing, _) => {
                            if let Some(old) = existing {
                                sessions.remove(&client_id);
                                if let Some(will) = end_session(router, &old) {
                                    router.publish(will);
                                }
                            }
                            let handle = Arc::new(SessionHandle::new(
                                client_id.clone(),
                                self.mailbox_capacity,
                            ));
                            sessions.insert(client_id.clone(), handle.clone());
                            (handle, SessionState::default(), false)
                        }
                    };
                    {
                        let mut inner = handle.inner();
                        inner.live = Some(live);
                        inner.expiry_interval = expiry_interval;
                        inner.disconnected_at = None;
                    }
                    handle.set_online(true);
                    return Attached {
                        handle,
                        state,
                        session_present,
                        connection_id,
                        kick,
                        done,
                    };
                }
            };
            previous.kick.cancel();
            if tokio::time::timeout(TAKEOVER_GRACE, previous.done)
                .await
                .is_err()
            {
                tracing::warn!(client_id = %client_id, "taken-over connection did not hand its session back in time");
            }
        }
    }

    /// Hands the session back when a connection ends. Returns a will to publish now, if any.
    ///
    /// `will` is the connection's will when it closed without a normal DISCONNECT; with a Will
    /// Delay Interval it waits in the session until the delay or the session ends, whichever is
    /// first [MQTT-3.1.3-9].
    pub fn detach(
        &self,
        router: &Router,
        handle: &Arc<SessionHandle>,
        connection_id: u64,
        state: SessionState,
        expiry_interval: u32,
        will: Option<(Arc<Message>, u32)>,
    ) -> Option<Arc<Message>> {
        let mut sessions = lock(&self.sessions);
        let mut inner = handle.inner();
        match &inner.live {
            Some(live) if live.id != connection_id => {
                // Another connection already owns this session; our state is stale.
                return will.map(|(message, _)| message);
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
            for filter in state.subscriptions.keys() {
                router.unsubscribe(&handle.client_id, filter);
            }
            return will.map(|(message, _)| message);
        }
        inner.state = Some(state);
        inner.expiry_interval = expiry_interval;
        inner.disconnected_at = Some(Instant::now());
        match will {
            Some((message, delay)) if delay > 0 => {
                inner.pending_will = Some(PendingWill {
                    message,
                    publish_at: Instant::now() + Duration::from_secs(u64::from(delay)),
                });
                None
            }
            Some((message, _)) => Some(message),
            None => None,
        }
    }

    /// Discards expired offline sessions and publishes wills whose delay has passed. Returns
    /// how many sessions expired.
    pub fn sweep(&self, router: &Router, now: Instant) -> usize {
        let mut due_wills = Vec::new();
        let mut expired = 0;
        {
            let mut sessions = lock(&self.sessions);
            sessions.retain(|_, handle| {
                let mut inner = handle.inner();
                if inner.live.is_some() {
                    return true;
                }
                if inner.expires_at().is_some_and(|at| at <= now) {
                    drop(inner);
                    expired += 1;
                    due_wills.extend(end_session(router, handle));
                    return false;
                }
                if inner
                    .pending_will
                    .as_ref()
                    .is_some_and(|will| will.publish_at <= now)
                {
                    due_wills.extend(inner.pending_will.take().map(|w| w.message));
                }
                true
            });
        }
        for will in due_wills {
            router.publish(will);
        }
        expired
    }
}

/// Removes an offline session's subscriptions; returns its pending will, which is published when
/// the session ends even if its delay has not passed [MQTT-3.1.3-9].
fn end_session(router: &Router, handle: &SessionHandle) -> Option<Arc<Message>> {
    let (state, will) = {
        let mut inner = handle.inner();
        (inner.state.take(), inner.pending_will.take())
    };
    if let Some(state) = state {
        for filter in state.subscriptions.keys() {
            router.unsubscribe(&handle.client_id, filter);
        }
    }
    will.map(|w| w.message)
}
