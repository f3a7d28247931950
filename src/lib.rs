//! telemq — an MQTT 3.1, 3.1.1 and 5.0 broker for IoT telemetry.
//!
//! Data flow:
//!
//! ```text
//! socket ─▶ transport (accept, spawn) ─▶ connection task ─▶ protocol (decode + validate)
//!                                          │
//!             CONNECT ─▶ session registry (new / resume / takeover, expiry, wills)
//!             PUBLISH ─▶ router: retained store + trie match (+ one member per $share group)
//!                        ─▶ each target session's bounded mailbox (overflow policy, dead letters)
//! mailbox ─▶ connection task ─▶ protocol (encode) ─▶ one write buffer ─▶ socket
//! ```
//!
//! - [`transport`] accepts connections and spawns one task each.
//! - [`connection`] runs a client's task: CONNECT handshake, packet handling, keep alive, close.
//! - [`protocol`] is the only module that knows the wire format (and the only importer of the
//!   codec crate).
//! - [`session`] holds session state that outlives connections: in-flight windows, inbound QoS 2
//!   ids, subscriptions, mailboxes, and the registry that attaches connections to sessions.
//! - [`router`] matches topics against subscriptions (plain and shared) and keeps retained
//!   messages; [`overload`] holds the overflow policies and the global memory guard;
//!   [`delayed`] holds `$delayed/...` messages until they are due.
//! - [`storage`] keeps retained messages and persistent sessions in RocksDB; [`publish`] is the
//!   one pipeline every message takes: plan, write, deliver.
//! - [`cluster`] (when enabled) joins other nodes over NATS: it forwards what is published
//!   here, subscribes to what this node's clients want, and keeps session ownership and
//!   retained messages in JetStream key-value buckets.
//! - [`broker`] wires it together and owns shutdown.

pub mod auth;
pub mod broker;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod delayed;
pub mod exporter;
pub mod message;
pub mod metrics;
pub mod overload;
pub mod protocol;
pub mod publish;
pub mod router;
pub mod session;
pub mod small_map;
pub mod state;
pub mod storage;
mod sync;
pub mod sys_topics;
pub mod transport;

pub use broker::Broker;
pub use config::Config;
