//! One task per network connection: it owns the socket, its read and write buffers and, once
//! CONNECT is accepted, the live session state. It decodes, asks the publish pipeline and the
//! session registry, and writes replies in order; everything it does to other clients goes
//! through them.
//!
//! The task waits on the socket, its session's mailbox, its oldest pending storage write and
//! (while paused) the memory guard; keep-alive timeouts, takeovers and shutdown reach it through
//! its session. Replies and deliveries are encoded into one write buffer and written as they
//! fit, so a wake-up that finds many messages makes one `write`.
//!
//! | file | owns |
//! | --- | --- |
//! | `mod.rs` | the task (`serve`), the connection's state, the event loop, packet dispatch |
//! | `establish.rs`, `handshake.rs` | CONNECT, authentication, attaching the session, CONNACK |
//! | `inbound.rs` | PUBLISH from the client (through the pipeline) and PUBREL |
//! | `subscribe.rs` | SUBSCRIBE and UNSUBSCRIBE |
//! | `outbound.rs` | deliveries to the client and their PUBACK / PUBREC / PUBCOMP |
//! | `pending.rs` | the FIFO of work waiting for storage, which keeps acknowledgements in order |
//! | `close.rs`, `linger.rs` | DISCONNECT either way, hand-back of the session, wills; the lingering close |
//! | `keep_alive.rs` | the keep alive a client is held to |
//! | `io.rs` | the hand-written futures of the event loop |

mod close;
mod establish;
mod handshake;
mod inbound;
mod io;
mod keep_alive;
mod linger;
mod outbound;
mod pending;
mod subscribe;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument};

use crate::auth::acl::ClientAcl;
use crate::auth::Identity;
use crate::clock;
use crate::cluster::Ownership;
use crate::metrics;
use crate::protocol::encode::{self, AckKind};
use crate::protocol::{self, Packet, ProtocolError, ProtocolVersion, ReasonCode, Will};
use crate::session::{Kick, SessionHandle, SessionState};
use crate::small_map::SmallMap;
use crate::state::BrokerState;
use crate::storage::Op;
use establish::establish;
use io::{completion_of, read_or_write};
use pending::{first_completion, Failure, Pending};

/// Deliveries are encoded into the write buffer only while it holds less than this, so a client
/// that reads slowly leaves messages in its (bounded) mailbox rather than in memory here.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// Past this much unwritten output the task stops reading, so a client that publishes without
/// reading its acknowledgements is slowed down instead of growing the buffer.
const WRITE_BACKLOG_LIMIT: usize = 1024 * 1024;
/// A read at least this long marks a busy client whose buffer is kept and grown.
const READ_BUSY: usize = 1024;
/// Room made for the next read of a busy client.
const READ_CHUNK: usize = 16 * 1024;
/// The most a client whose read buffer was released gets read in one go (on the stack).
const IDLE_READ: usize = READ_BUSY;
/// Packets waiting for storage before the task stops reading more from the client.
const PENDING_LIMIT: usize = 4096;
/// Time allowed to flush the last packets (DISCONNECT) of a closing connection.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a connection ended; the label feeds logs and the close-reason metric.
#[derive(Debug)]
pub(crate) enum Close {
    PeerClosed,
    Io,
    ConnectTimeout,
    ClientDisconnect,
    KeepAliveTimeout,
    TakenOver,
    ServerShuttingDown,
    Refused(ReasonCode),
    Protocol(ProtocolError),
    /// Storage could not make something durable that the client is owed an answer for.
    StorageFailure,
    /// The cluster could not store a 3.1.1 client's PUBLISH with its replicas.
    NotReplicated,
    /// Its queue overflowed under the `disconnect` policy.
    SlowConsumer,
}

impl Close {
    fn label(&self) -> &'static str {
        match self {
            Self::PeerClosed => "peer_closed",
            Self::Io => "io_error",
            Self::ConnectTimeout => "connect_timeout",
            Self::ClientDisconnect => "client_disconnect",
            Self::KeepAliveTimeout => "keep_alive_timeout",
            Self::TakenOver => "session_taken_over",
            Self::ServerShuttingDown => "server_shutting_down",
            Self::Refused(reason) => reason.label(),
            Self::Protocol(error) => error.reason.label(),
            Self::StorageFailure => "storage_failure",
            Self::NotReplicated => "not_replicated",
            Self::SlowConsumer => "slow_consumer",
        }
    }

    /// The v5 DISCONNECT the broker sends before closing [MQTT-4.13.1-1], if any.
    fn disconnect_reason(&self) -> Option<(ReasonCode, Option<&'static str>)> {
        match self {
            Self::KeepAliveTimeout => Some((ReasonCode::KeepAliveTimeout, None)),
            Self::TakenOver => Some((ReasonCode::SessionTakenOver, None)),
            Self::ServerShuttingDown => Some((ReasonCode::ServerShuttingDown, None)),
            Self::Protocol(error) => Some((error.reason, Some(error.detail))),
            Self::StorageFailure => Some((
                ReasonCode::UnspecifiedError,
                Some("the broker could not store the session state"),
            )),
            Self::SlowConsumer => Some((
                ReasonCode::QuotaExceeded,
                Some("slow consumer: the session's queue overflowed"),
            )),
            _ => None,
        }
    }
}

/// What a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Tls,
    WebSocket,
    SecureWebSocket,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Self::Tcp => metrics::TCP,
            Self::Tls => metrics::TLS,
            Self::WebSocket => metrics::WS,
            Self::SecureWebSocket => metrics::WSS,
        }
    }
}

/// Where a connection comes from.
#[derive(Debug)]
pub struct Peer {
    pub address: SocketAddr,
    pub transport: Transport,
    /// The username a verified client certificate stands for (`tls.cert_identity`).
    pub cert_identity: Option<String>,
}

/// Serves one accepted connection until it closes. `admitted` holds the connection's admission
/// slots (the transport's guard) until then.
pub async fn serve<S, A: Send>(
    stream: S,
    peer: Peer,
    admitted: A,
    state: Arc<BrokerState>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    metrics::connection_opened();
    // Everything before and after the event loop is boxed, and no layer of async functions or
    // span sits between this task and the event loop: an idle connection's task then holds the
    // connection and its event loop, not the (larger) CONNECT and close states, nor copies of
    // arguments passed down. Events of the event loop name their client themselves.
    let (close, client_id) = 'served: {
        let establishing = establish(stream, &peer, &state, &shutdown).instrument(span(&peer));
        let mut connection = match Box::pin(establishing).await {
            Ok(connection) => connection,
            Err(close) => break 'served (close, None),
        };
        let close = connection.event_loop(&shutdown).await;
        let client_id = connection.client_id.clone();
        let finishing_span = span(&peer);
        finishing_span.record("client_id", &*client_id);
        let finishing = connection
            .finish(close, &shutdown)
            .instrument(finishing_span);
        (Box::pin(finishing).await, Some(client_id))
    };
    log_close(&close, &peer, client_id.as_deref());
    metrics::connection_closed(close.label());
    drop(admitted);
}

/// A debug span: at info level a span per connection would cost each connection over a
/// kilobyte in the subscriber's registry (measured), so the info events name their client
/// themselves.
fn span(peer: &Peer) -> tracing::Span {
    tracing::debug_span!(
        "conn",
        peer = %peer.address,
        transport = peer.transport.label(),
        client_id = tracing::field::Empty
    )
}

fn log_close(close: &Close, peer: &Peer, client_id: Option<&str>) {
    let detail = match close {
        Close::Protocol(error) => Some(error.detail),
        _ => None,
    };
    info!(
        peer = %peer.address,
        client_id = client_id.map(tracing::field::display),
        reason = close.label(),
        detail,
        "connection closed"
    );
}

/// What woke the event loop.
enum Event {
    Read(std::io::Result<usize>),
    /// Bytes written, or `None` when the write buffer was empty and a flush completed.
    Wrote(std::io::Result<Option<usize>>),
    MailboxReady,
    MemoryGuardChanged,
    Stored(Result<crate::publish::Stored, Failure>),
}

struct Connection<S> {
    /// Not split into halves: the halves share an allocation, and one poll can serve both
    /// directions (`read_or_write`).
    stream: S,
    read_buf: BytesMut,
    write_buf: BytesMut,
    state: Arc<BrokerState>,
    version: ProtocolVersion,
    client_id: Arc<str>,
    handle: Arc<SessionHandle>,
    session: SessionState,
    connection_id: u64,
    /// Keep Alive in seconds, 0 for none. The broker's keep-alive sweep, not a timer of this
    /// connection's, closes it when its client falls silent: see `Kick::KeepAliveTimeout`.
    keep_alive: u16,
    /// Boxed: most clients have none, and every idle connection would reserve its room.
    will: Option<Box<Will>>,
    /// Whether the cluster holds a record of a will of this client by this node (see
    /// `cluster::wills`), to be forgotten once the will is published or discarded here.
    will_in_cluster: bool,
    session_expiry: u32,
    session_expiry_at_connect: u32,
    /// Outbound QoS 1/2 messages allowed in flight: the client's Receive Maximum capped by ours.
    send_quota: u16,
    client_max_packet_size: u32,
    client_topic_alias_max: u16,
    /// Made on first use: few telemetry clients use topic aliases, and every idle connection
    /// would reserve room for both maps.
    aliases: Option<Box<TopicAliases>>,
    /// Work waiting for storage, in the order the client's packets arrived: acknowledgements
    /// leave only once what they acknowledge is durable, and in order [MQTT-4.6.0-2].
    pending: VecDeque<Pending>,
    /// Storage releases of deliveries dropped while filling the write buffer, written behind
    /// on the next turn of the event loop.
    releases: Vec<Op>,
    /// Whether this client has published; only publishers are paused by the memory guard.
    has_published: bool,
    /// Whether reading is paused by the memory guard now (for counting pauses).
    paused: bool,
    /// While paused, resolves when the memory guard lets publishers resume. Boxed and made only then:
    /// the wait is rare and its future would otherwise be in every connection's memory.
    memory_resumed: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    /// Message and byte counts since the last turn of the event loop, added to the shared
    /// counters once per turn rather than once per message.
    traffic: metrics::Traffic,
    /// Transport label of the byte and message counters.
    transport: Transport,
    /// Whether written bytes may sit in a TLS or WebSocket layer's buffer until flushed.
    needs_flush: bool,
    /// This client's ACL rules; `None` when no ACL is configured (a reload does not add one).
    access: Option<Box<Access>>,
    /// In a cluster: this connection's claim on the client id (boxed: single nodes have none).
    ownership: Option<Box<Ownership>>,
}

#[derive(Default)]
struct TopicAliases {
    /// Set by the client [MQTT-3.3.2-?]: alias → topic.
    inbound: SmallMap<u16, Arc<str>>,
    /// Set by the broker: topic → alias.
    outbound: SmallMap<Arc<str>, u16>,
}

/// A client's ACL rules and what they were built from.
struct Access {
    identity: Identity,
    acl: ClientAcl,
    /// The ACL generation `acl` was built from; a reload makes it stale.
    generation: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    async fn event_loop(&mut self, shutdown: &CancellationToken) -> Close {
        loop {
            // Shutdown and takeover come through the session (its mailbox wakes this loop),
            // not as futures of their own in the select below: every idle connection would
            // hold them. The token is checked as well for a shutdown that began before this
            // connection's session was attached, which `kick_all` could not see.
            if shutdown.is_cancelled() {
                return Close::ServerShuttingDown;
            }
            match self.handle.kicked(self.connection_id) {
                Some(Kick::ShuttingDown) => return Close::ServerShuttingDown,
                Some(Kick::TakenOver) => return Close::TakenOver,
                Some(Kick::SlowConsumer) => return Close::SlowConsumer,
                // [MQTT-3.1.2-24] silent for one and a half times its keep alive.
                Some(Kick::KeepAliveTimeout) => return Close::KeepAliveTimeout,
                None => {}
            }
            self.fill_from_mailbox();
            self.traffic.flush(self.transport.label());
            if !self.releases.is_empty() {
                let releases = std::mem::take(&mut self.releases);
                Box::pin(self.state.publish.write_behind(releases)).await;
            }
            let paused = self.paused_by_memory_guard();
            let can_read = !paused
                && self.write_buf.len() < WRITE_BACKLOG_LIMIT
                && self.pending.len() < PENDING_LIMIT;
            let awaiting_storage = self.pending.front().is_some_and(Pending::is_waiting);
            let wants_write = !self.write_buf.is_empty() || self.needs_flush;
            // Every branch is a small future borrowing the connection's state: the select's
            // futures are part of every idle connection's memory.
            let event = tokio::select! {
                biased;
                stored = first_completion(&mut self.pending), if awaiting_storage => Event::Stored(stored),
                io = read_or_write(&mut self.stream, &mut self.read_buf, can_read, &mut self.write_buf, wants_write), if can_read || wants_write => io,
                () = self.handle.mailbox.notified() => Event::MailboxReady,
                () = completion_of(&mut self.memory_resumed), if paused => Event::MemoryGuardChanged,
            };
            let outcome = match event {
                Event::MailboxReady => Ok(()),
                Event::MemoryGuardChanged => {
                    // Completed: never polled again.
                    self.memory_resumed = None;
                    Ok(())
                }
                Event::Wrote(Ok(None)) => {
                    self.needs_flush = false;
                    Ok(())
                }
                Event::Wrote(Ok(Some(written))) => {
                    self.traffic.add_bytes_sent(written);
                    self.needs_flush = self.transport != Transport::Tcp;
                    if self.write_buf.is_empty() {
                        // Idle connections hold no output buffer; a busy one gets a new one
                        // on its next wake-up, which costs far less than the write did.
                        self.write_buf = BytesMut::new();
                    }
                    Ok(())
                }
                Event::Wrote(Err(_)) | Event::Read(Err(_)) => Err(Close::Io),
                Event::Read(Ok(0)) => Err(Close::PeerClosed),
                Event::Read(Ok(read)) => {
                    self.traffic.add_bytes_received(read);
                    // Boxed: handling a packet is the deepest state of the connection's future,
                    // and inline it would be reserved in every idle connection's memory.
                    let outcome = Box::pin(self.process_input()).await;
                    self.size_read_buffer(read);
                    outcome
                }
                Event::Stored(result) => Box::pin(self.complete_pending(result)).await,
            };
            if let Err(close) = outcome {
                return close;
            }
        }
    }

    /// Whether to stop reading from this client because queued messages passed the memory
    /// high-water mark. Only publishers pause, and not while the client owes acknowledgements
    /// for messages sent to it: reading those is what lets queues drain.
    fn paused_by_memory_guard(&mut self) -> bool {
        let paused =
            self.has_published && self.session.inflight.is_empty() && self.state.memory.is_paused();
        if paused && !self.paused {
            metrics::publisher_paused();
            debug!(client_id = %self.client_id, "memory high-water mark passed: not reading from this publisher");
        }
        if !paused {
            self.memory_resumed = None;
        } else if self.memory_resumed.is_none() {
            // The guard's flag changes under the channel's lock, so this agrees with the
            // atomic read above.
            let mut memory = self.state.memory.subscribe();
            self.memory_resumed = Some(Box::pin(async move {
                let _ = memory.wait_for(|paused| !*paused).await;
            }));
        }
        self.paused = paused;
        paused
    }

    /// Keeps the read buffer small for quiet clients and large for busy ones: after a short
    /// read that left nothing unparsed it is released (the next read lands on the stack, see
    /// `read_into`), after a long one it gets room for a large next read.
    fn size_read_buffer(&mut self, last_read: usize) {
        if self.read_buf.is_empty() && last_read < READ_BUSY {
            self.read_buf = BytesMut::new();
        } else if self.read_buf.capacity() - self.read_buf.len() < READ_BUSY {
            self.read_buf.reserve(READ_CHUNK);
        }
    }

    /// Decodes and handles every complete packet in the read buffer.
    async fn process_input(&mut self) -> Result<(), Close> {
        let max_packet_size = self.state.config.mqtt.max_packet_size as usize;
        // Once per read, not per packet: the word is shared with the sweep's core.
        let mut heard = false;
        loop {
            let packet =
                match protocol::decode(&mut self.read_buf, Some(self.version), max_packet_size) {
                    Ok(Some(packet)) => packet,
                    Ok(None) => return Ok(()),
                    Err(error) => {
                        metrics::protocol_error(error.reason.label());
                        return Err(Close::Protocol(error));
                    }
                };
            if !heard {
                heard = true;
                self.handle
                    .heard_from_client(self.keep_alive, clock::monotonic_ms());
            }
            if let Err(close) = self.handle_packet(packet).await {
                if let Close::Protocol(error) = &close {
                    metrics::protocol_error(error.reason.label());
                }
                return Err(close);
            }
        }
    }

    async fn handle_packet(&mut self, packet: Packet) -> Result<(), Close> {
        match packet {
            Packet::Publish(publish) => self.handle_publish(publish).await?,
            Packet::PubAck { packet_id, .. } => self.handle_puback(packet_id).await,
            Packet::PubRec { packet_id, reason } => self.handle_pubrec(packet_id, reason).await?,
            Packet::PubComp { packet_id, .. } => self.handle_pubcomp(packet_id).await,
            Packet::PubRel { packet_id, .. } => self.handle_pubrel(packet_id).await?,
            Packet::Subscribe(subscribe) => self.handle_subscribe(subscribe).await?,
            Packet::Unsubscribe(unsubscribe) => self.handle_unsubscribe(unsubscribe).await?,
            Packet::PingReq => encode::pingresp(&mut self.write_buf),
            Packet::Disconnect(disconnect) => return Err(self.handle_disconnect(disconnect)),
            Packet::Connect(_) => {
                return Err(Close::Protocol(ProtocolError::violation(
                    "[MQTT-3.1.0-2] a second CONNECT on one connection",
                )))
            }
        }
        Ok(())
    }

    /// v3 clients get acknowledgements without reason codes; `encode::ack` drops them.
    fn ack(&mut self, kind: AckKind, packet_id: u16, reason: u8) {
        encode::ack(self.version, kind, packet_id, reason, &mut self.write_buf);
    }

    /// Rebuilds this client's ACL rules if a reload swapped the file since they were built.
    pub(super) fn refresh_acl(&mut self) {
        let Some(access) = self.access.as_mut() else {
            return;
        };
        let generation = self.state.auth.acl_generation();
        if generation != access.generation {
            if let Some(acl) = self.state.auth.acl_for(&access.identity, &self.client_id) {
                access.acl = acl;
            }
            access.generation = generation;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, StorageEngine};
    use crate::transport::admission::Admission;

    /// tokio allocates a task as one block: header and scheduler (48 bytes), the future, the
    /// trailer (48), rounded up to 128 bytes; `transport::accept` spawns `serve` under the task
    /// tracker (8 more). Past 920 bytes every idle connection costs 128 more; the layout
    /// choices that keep it under are in docs/architecture.md ("Memory per connection").
    #[tokio::test]
    async fn an_idle_tcp_connection_task_fits_in_1024_bytes() {
        let mut config = Config::default();
        config.storage.engine = StorageEngine::Memory;
        config.listener.bind = "127.0.0.1:0".parse().unwrap();
        config.metrics.enabled = false;
        config.websocket.enabled = false;
        let broker = crate::Broker::start(config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let admission = Admission::new(&broker.state().config.listener);
        let admitted = admission.admit(address.ip()).unwrap();
        let peer = Peer {
            address,
            transport: Transport::Tcp,
            cert_identity: None,
        };
        let task = serve(
            stream,
            peer,
            admitted,
            broker.state().clone(),
            CancellationToken::new(),
        );
        let size = std::mem::size_of_val(&task);
        drop(task);
        broker.shutdown().await;
        assert!(
            size <= 920,
            "the connection future is {size} bytes: every idle connection now costs 128 more"
        );
    }
}
