//! Configuration: the `telemq.toml` file, its defaults and its validation.
//!
//! Every key has a default, so the broker runs with no file at all. Unknown keys are rejected so
//! a typo never silently falls back to a default. [`DEFAULT_CONFIG`] is the documented default
//! file printed by `telemq print-default-config`; a test keeps it equal to `Config::default()`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::validate::is_valid_filter;

mod cluster;
pub use cluster::{is_name_byte, is_valid_name, ClusterConfig};

/// What a full session queue does with one more message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// The oldest queued messages make room.
    #[default]
    DropOldest,
    /// The new message is dropped.
    DropNewest,
    /// The new message is dropped and the subscriber disconnected as a slow consumer.
    Disconnect,
    /// A QoS 1/2 publish that would overflow is refused to its publisher (0x97) before it is
    /// routed anywhere.
    Refuse,
}

impl OverflowPolicy {
    pub fn label(self) -> &'static str {
        match self {
            Self::DropOldest => "drop_oldest",
            Self::DropNewest => "drop_newest",
            Self::Disconnect => "disconnect",
            Self::Refuse => "refuse",
        }
    }
}

/// How a group picks the member that gets a message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShareStrategy {
    /// Members in turn.
    #[default]
    RoundRobin,
    /// A uniformly random member.
    Random,
    /// The same member until it goes away.
    Sticky,
    /// By the publisher's client id: one publisher's messages stay in order at one member.
    HashClient,
    /// By topic: one topic's messages stay in order at one member.
    HashTopic,
    /// The member with the fewest queued messages.
    LeastLoaded,
}

/// When a write counts as done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// In the WAL, not synced: survives the broker process dying, not the machine.
    #[default]
    Process,
    /// In the WAL and fsynced before acknowledgement: survives power loss.
    Fsync,
}

/// The default configuration, documented. `telemq print-default-config` prints it.
pub const DEFAULT_CONFIG: &str = r#"# telemq configuration. Every key is optional; the values below are the defaults.

[listener]
# Address of the plain MQTT (TCP) listener.
bind = "0.0.0.0:1883"
# Connections open at once, over all listeners; past it new connections are closed at once.
max_connections = 100000
# Connections open at once from one IP address; 0 means no limit.
max_connections_per_ip = 0
# New connections accepted per second over all listeners, with bursts up to connect_burst;
# 0 means no limit. Connections over the rate are closed at once.
connect_rate = 0
connect_burst = 100

[tls]
# MQTT over TLS (rustls; TLS 1.2 and 1.3). Needs cert_file and key_file (PEM).
enabled = false
bind = "0.0.0.0:8883"
# cert_file = "certs/server.pem"
# key_file = "certs/server.key"
# CA bundle (PEM) that client certificates must chain to; needed for client certificates.
# client_ca_file = "certs/ca.pem"
# Whether a client certificate is required (mutual TLS). If false, one is verified when offered.
require_client_cert = false
# Use the client certificate as the MQTT username: "none", "cn" (subject common name) or "san"
# (first DNS, e-mail or URI subject alternative name). A certificate identity skips the password
# check; the ACL applies to it as to any username.
cert_identity = "none"
# Time a new connection has to complete the TLS (and WebSocket) handshake.
handshake_timeout = "10s"

[websocket]
# MQTT over WebSocket (subprotocol "mqtt"), for browsers.
enabled = true
bind = "0.0.0.0:8083"
path = "/mqtt"
# MQTT over secure WebSocket (WSS), with the [tls] certificate.
tls_enabled = false
tls_bind = "0.0.0.0:8084"

[auth]
# Argon2 password file ("user:$argon2id$..." lines), managed with `telemq passwd FILE USER`.
# password_file = "passwd"
# Whether clients without a username may connect. Unset: allowed unless a password file is set.
# allow_anonymous = false
# ACL file (see README); without one every client may publish and subscribe to anything.
# acl_file = "acl"
# Password verifications running at once (each takes ~19 MiB and tens of milliseconds), so a
# CONNECT flood cannot take every core.
max_concurrent_verifications = 2

[mqtt]
# Largest packet accepted from a client, in bytes (fixed header included). Advertised to MQTT 5
# clients as Maximum Packet Size; larger packets close the connection (reason 0x95).
max_packet_size = 1048576
# Time a new connection has to send CONNECT.
connect_timeout = "10s"
# Keep alive the broker imposes on MQTT 5 clients (Server Keep Alive), in seconds. Unset: the
# client's own value is used. A client silent for 1.5 times its keep alive is disconnected.
# server_keep_alive = 60
# Longest keep alive a client may ask for, in seconds (1 to 65535). Unset: no cap. A client
# asking for more, or for none (0), gets the cap: MQTT 5 clients through Server Keep Alive, while
# MQTT 3.1 and 3.1.1 clients, which cannot be told, are refused (CONNACK return code 2), as
# Mosquitto's max_keepalive does. server_keep_alive, when set, still applies to MQTT 5 clients,
# and may not exceed this cap.
# max_keep_alive = 300
# Inbound QoS 2 messages a client may have awaiting PUBREL (advertised as Receive Maximum).
receive_maximum = 1024
# Outbound QoS 1/2 messages in flight per session (also capped by the client's Receive Maximum).
max_inflight_messages = 1024
# Topic aliases an MQTT 5 client may use towards the broker (Topic Alias Maximum).
topic_alias_maximum = 64
# Upper bound on the Session Expiry Interval, in seconds; 4294967295 means never expire. MQTT 3.1.1
# sessions with clean_session = 0 use this value.
max_session_expiry_interval = 4294967295
# Whether retained messages are supported (advertised as Retain Available).
retain_available = true
# Levels a topic name or filter may have; deeper ones are refused (v5: reason 0x90 / 0x8F).
max_topic_levels = 128
# Subscriptions one client may hold; 0 means no limit. Past it SUBACK says 0x97 (3.1.1: 0x80).
max_subscriptions_per_client = 0

[queue]
# Each session queues messages beyond its in-flight window, bounded by count and by bytes (topic,
# payload, properties and bookkeeping of each message). Offline persistent sessions keep only
# their queue's bookkeeping in memory; their QoS 1/2 messages are read back from storage when the
# client returns.
max_messages = 10000
max_bytes = 33554432
# Whether QoS 0 messages are queued for persistent sessions whose client is offline.
qos0_offline = false
# What a full queue does with one more message:
#   "drop_oldest"  the oldest queued message makes room (telemetry: newest data wins)
#   "drop_newest"  the new message is dropped
#   "disconnect"   the subscriber is disconnected as a slow consumer (v5: reason 0x97); its
#                  session (if persistent) keeps queueing
#   "refuse"       a QoS 1/2 publish that would overflow is refused: MQTT 5 publishers get reason
#                  0x97 (quota exceeded) and may retry, MQTT 3.1.1 publishers are disconnected so
#                  they retransmit; nothing is routed. QoS 0 messages are dropped.
policy = "drop_oldest"
# Whether queued QoS 0 messages are dropped first, before the policy applies.
qos0_first = true
# Total queued bytes of all sessions at which the broker stops reading from publishing clients
# (TCP back-pressure), and below which it reads again.
memory_high_watermark = 268435456
memory_low_watermark = 201326592

# Per topic-filter policies; the first rule whose filter matches the message's topic applies.
# [[queue.rule]]
# filter = "alerts/#"
# policy = "refuse"
# [[queue.rule]]
# filter = "telemetry/#"
# policy = "drop_oldest"

[shared]
# How a shared subscription ($share/<group>/<filter>, or $queue/<filter> for group "queue") picks
# the member that gets a message: "round_robin", "random", "sticky" (the same member until it goes
# offline), "hash_client" (by publisher client id), "hash_topic" (by topic), "least_loaded"
# (fewest queued messages). Online members are preferred; with none online, persistent members
# queue the message.
strategy = "round_robin"
# Per group-name prefix strategies; the first matching prefix applies.
# [[shared.group]]
# prefix = "ordered-"
# strategy = "hash_topic"

[dead_letter]
# Republish every dropped message to $DLQ/<reason>/<original topic> (user properties
# "dlq-reason" and "dlq-publisher"); dead letters that cannot be queued are dropped, never
# dead-lettered again.
enabled = false
# Whether a message no subscriber took is dead-lettered too (reason "no_subscribers").
no_subscribers = false

[delayed]
# A publish to $delayed/<seconds>/<topic> is held (durably) and published to <topic> when due.
# Delayed messages held at once; past it, MQTT 5 publishers get reason 0x97.
max_messages = 100000
# Longest delay accepted, in seconds.
max_delay = 4294967

[metrics]
# Prometheus endpoint: GET /metrics (text format) and GET /health.
enabled = true
bind = "0.0.0.0:9464"
# How often the retained $SYS/broker/... topics are published; "0s" turns them off.
sys_interval = "10s"

[storage]
# "rocksdb": retained messages, persistent sessions, their subscriptions, queues and QoS 2 state
# survive restarts and crashes. "memory": nothing is written to disk.
engine = "rocksdb"
# Where RocksDB keeps its files. One broker per directory (it is locked while in use).
data_dir = "./data"
# "process": acknowledged messages are in the write-ahead log before the ack leaves, surviving a
# crash or kill -9 of the broker. "fsync": additionally synced to disk (survives power loss);
# concurrent writes share one sync (group commit).
durability = "process"
# Encryption at rest (AES-256-GCM): every stored value (messages, retained messages, wills,
# delayed messages, session and queue records) is sealed with this key; keys such as topic names
# and client ids stay in the clear. The file holds 32 raw bytes or 64 hex digits and must not be
# readable by group or others; `telemq keygen FILE` writes one. A data directory is refused if
# it was written with another key, or with encryption off (migrate with `telemq rekey`).
# encryption_key_file = "/etc/telemq/storage.key"
# During a key rotation: the previous key, still used to read what it sealed. `telemq rekey`
# re-seals everything with encryption_key_file; then remove this line.
# old_encryption_key_file = "/etc/telemq/storage.key.old"

[cluster]
# Several telemq nodes acting as one broker, over NATS (core NATS routes messages between nodes;
# JetStream key-value buckets hold session ownership, persistent sessions' subscriptions and
# retained messages). Off: a single node, and none of the cluster code runs.
enabled = false
# This node's name, unique in the cluster and stable across restarts ([A-Za-z0-9_-]).
# Empty: the host name.
node_id = ""
# NATS servers to connect to, tried in this order (list the nearest first); the node fails over
# between them and reconnects with back-off.
nats_urls = ["nats://127.0.0.1:4222"]
# Prefix of every NATS subject and bucket name this cluster uses, so that several clusters can
# share one NATS system.
prefix = "telemq"
# Copies of the replicated state: the JetStream buckets and the replication log (1, 3 or 5; at
# most the number of NATS servers). 0: as many as the NATS cluster has servers, at most 3. In a
# cluster a QoS 1/2 publish is acknowledged only once a majority of the copies hold it, and
# refused (MQTT 5: 0x80; 3.1.1: the connection closes) while no majority can be reached.
replicas = 0
# How long, and up to how many bytes, the replication log keeps messages.
log_max_age = "24h"
log_max_bytes = 1073741824
# Messages waiting to be forwarded to other nodes. When it is full, a QoS 1/2 publisher waits
# (its acknowledgement is held back) and a QoS 0 message is dropped and counted.
forward_queue = 8192
# Messages from other nodes buffered per NATS subscription while this node delivers them. Past
# it the NATS client drops them; before that, flow control asks senders to hold back.
subscription_buffer = 65536
# How long a request to NATS (a takeover, a bucket update) may take before it fails.
request_timeout = "5s"
# NATS credentials, as NATS users set them: one of user + password, token, an NKey seed file or
# a .creds file (JWT + NKey).
# user = "telemq"
# password = "secret"
# token = "s3cr3t"
# nkey_seed_file = "/etc/telemq/nats.nk"
# credentials_file = "/etc/telemq/nats.creds"
# TLS to NATS: the CA that signs the servers' certificates, and a client certificate if the
# servers require one. tls_required = true refuses plain connections.
tls_required = false
# tls_ca_file = "/etc/telemq/nats-ca.pem"
# tls_cert_file = "/etc/telemq/nats-client.pem"
# tls_key_file = "/etc/telemq/nats-client.key"
"#;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listener: ListenerConfig,
    pub tls: TlsConfig,
    pub websocket: WebSocketConfig,
    pub auth: AuthConfig,
    pub mqtt: MqttConfig,
    pub queue: QueueConfig,
    pub shared: SharedConfig,
    pub dead_letter: DeadLetterConfig,
    pub delayed: DelayedConfig,
    pub metrics: MetricsConfig,
    pub storage: StorageConfig,
    pub cluster: ClusterConfig,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub enabled: bool,
    pub bind: SocketAddr,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub client_ca_file: Option<PathBuf>,
    pub require_client_cert: bool,
    pub cert_identity: CertIdentity,
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            bind: SocketAddr::from(([0, 0, 0, 0], 8883)),
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            require_client_cert: false,
            cert_identity: CertIdentity::None,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Which part of a verified client certificate becomes the MQTT username.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertIdentity {
    #[default]
    None,
    Cn,
    San,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    pub enabled: bool,
    pub bind: SocketAddr,
    pub path: String,
    pub tls_enabled: bool,
    pub tls_bind: SocketAddr,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bind: SocketAddr::from(([0, 0, 0, 0], 8083)),
            path: "/mqtt".into(),
            tls_enabled: false,
            tls_bind: SocketAddr::from(([0, 0, 0, 0], 8084)),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub password_file: Option<PathBuf>,
    pub allow_anonymous: Option<bool>,
    pub acl_file: Option<PathBuf>,
    pub max_concurrent_verifications: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            password_file: None,
            allow_anonymous: None,
            acl_file: None,
            max_concurrent_verifications: 2,
        }
    }
}

impl AuthConfig {
    /// Anonymous clients are welcome unless a password file says who may come, or the operator
    /// says otherwise.
    pub fn anonymous_allowed(&self) -> bool {
        self.allow_anonymous.unwrap_or(self.password_file.is_none())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub enabled: bool,
    pub bind: SocketAddr,
    #[serde(with = "humantime_serde")]
    pub sys_interval: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bind: SocketAddr::from(([0, 0, 0, 0], 9464)),
            sys_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    pub max_messages: usize,
    pub max_bytes: usize,
    pub qos0_offline: bool,
    pub policy: OverflowPolicy,
    pub qos0_first: bool,
    pub memory_high_watermark: usize,
    pub memory_low_watermark: usize,
    pub rule: Vec<QueueRule>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_messages: 10_000,
            max_bytes: 32 * 1024 * 1024,
            qos0_offline: false,
            policy: OverflowPolicy::DropOldest,
            qos0_first: true,
            memory_high_watermark: 256 * 1024 * 1024,
            memory_low_watermark: 192 * 1024 * 1024,
            rule: Vec::new(),
        }
    }
}

/// An overflow policy for messages whose topic matches `filter`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueRule {
    pub filter: String,
    pub policy: OverflowPolicy,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedConfig {
    pub strategy: ShareStrategy,
    pub group: Vec<GroupStrategy>,
}

/// A strategy for shared subscription groups whose name starts with `prefix`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupStrategy {
    pub prefix: String,
    pub strategy: ShareStrategy,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    pub enabled: bool,
    pub no_subscribers: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DelayedConfig {
    pub max_messages: usize,
    pub max_delay: u32,
}

impl Default for DelayedConfig {
    fn default() -> Self {
        Self {
            max_messages: 100_000,
            max_delay: 4_294_967,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageEngine {
    #[default]
    RocksDb,
    Memory,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub engine: StorageEngine,
    pub data_dir: PathBuf,
    pub durability: Durability,
    /// Seals stored values (see `storage::cipher`); `None`: stored in the clear.
    pub encryption_key_file: Option<PathBuf>,
    /// Opens values sealed with the previous key during a rotation.
    pub old_encryption_key_file: Option<PathBuf>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            engine: StorageEngine::RocksDb,
            data_dir: PathBuf::from("./data"),
            durability: Durability::Process,
            encryption_key_file: None,
            old_encryption_key_file: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    pub bind: SocketAddr,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub connect_rate: u32,
    pub connect_burst: u32,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([0, 0, 0, 0], 1883)),
            max_connections: 100_000,
            max_connections_per_ip: 0,
            connect_rate: 0,
            connect_burst: 100,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub max_packet_size: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub server_keep_alive: Option<u16>,
    pub max_keep_alive: Option<u16>,
    pub receive_maximum: u16,
    pub max_inflight_messages: u16,
    pub topic_alias_maximum: u16,
    pub max_session_expiry_interval: u32,
    pub retain_available: bool,
    pub max_topic_levels: usize,
    pub max_subscriptions_per_client: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            max_packet_size: 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            server_keep_alive: None,
            max_keep_alive: None,
            receive_maximum: 1024,
            max_inflight_messages: 1024,
            topic_alias_maximum: 64,
            max_session_expiry_interval: u32::MAX,
            retain_available: true,
            max_topic_levels: 128,
            max_subscriptions_per_client: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid configuration in {path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks limits that serde cannot, before anything binds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mqtt = &self.mqtt;
        // The largest packet MQTT can frame is 268,435,455 bytes of body plus a 5-byte header.
        if !(64..=268_435_460).contains(&mqtt.max_packet_size) {
            return Err(ConfigError::Invalid(
                "mqtt.max_packet_size must be between 64 and 268435460".into(),
            ));
        }
        if mqtt.receive_maximum == 0 {
            return Err(ConfigError::Invalid(
                "mqtt.receive_maximum must be at least 1".into(),
            ));
        }
        if mqtt.max_inflight_messages == 0 {
            return Err(ConfigError::Invalid(
                "mqtt.max_inflight_messages must be at least 1".into(),
            ));
        }
        let queue = &self.queue;
        if queue.max_messages == 0 || queue.max_bytes == 0 {
            return Err(ConfigError::Invalid(
                "queue.max_messages and queue.max_bytes must be at least 1".into(),
            ));
        }
        if queue.memory_low_watermark >= queue.memory_high_watermark {
            return Err(ConfigError::Invalid(
                "queue.memory_low_watermark must be below queue.memory_high_watermark".into(),
            ));
        }
        for rule in &queue.rule {
            if !is_valid_filter(&rule.filter) {
                return Err(ConfigError::Invalid(format!(
                    "queue.rule filter {:?} is not a valid topic filter",
                    rule.filter
                )));
            }
        }
        if self.delayed.max_delay == 0 {
            return Err(ConfigError::Invalid(
                "delayed.max_delay must be at least 1 second".into(),
            ));
        }
        if self.listener.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "listener.max_connections must be at least 1".into(),
            ));
        }
        if mqtt.max_topic_levels == 0 {
            return Err(ConfigError::Invalid(
                "mqtt.max_topic_levels must be at least 1".into(),
            ));
        }
        if self.listener.connect_rate > 0 && self.listener.connect_burst == 0 {
            return Err(ConfigError::Invalid(
                "listener.connect_burst must be at least 1 when connect_rate is set".into(),
            ));
        }
        let tls_needed = self.tls.enabled || self.websocket.tls_enabled;
        if tls_needed && (self.tls.cert_file.is_none() || self.tls.key_file.is_none()) {
            return Err(ConfigError::Invalid(
                "TLS listeners need tls.cert_file and tls.key_file".into(),
            ));
        }
        if self.tls.require_client_cert && self.tls.client_ca_file.is_none() {
            return Err(ConfigError::Invalid(
                "tls.require_client_cert needs tls.client_ca_file".into(),
            ));
        }
        if !self.websocket.path.starts_with('/') {
            return Err(ConfigError::Invalid(
                "websocket.path must start with '/'".into(),
            ));
        }
        if self.auth.max_concurrent_verifications == 0 {
            return Err(ConfigError::Invalid(
                "auth.max_concurrent_verifications must be at least 1".into(),
            ));
        }
        self.cluster.validate()?;
        if let Some(max) = mqtt.max_keep_alive {
            if max == 0 {
                return Err(ConfigError::Invalid(
                    "mqtt.max_keep_alive must be between 1 and 65535 (unset: no cap)".into(),
                ));
            }
            if mqtt
                .server_keep_alive
                .is_some_and(|server| server == 0 || server > max)
            {
                return Err(ConfigError::Invalid(
                    "mqtt.server_keep_alive must be between 1 and mqtt.max_keep_alive".into(),
                ));
            }
        }
        if mqtt.connect_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "mqtt.connect_timeout must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_default_file_is_the_default() {
        let parsed: Config = toml::from_str(DEFAULT_CONFIG).unwrap();
        assert_eq!(parsed, Config::default());
        parsed.validate().unwrap();
    }

    #[test]
    fn the_compose_stack_configuration_is_valid() {
        let config: Config = toml::from_str(include_str!("../../grafana/telemq.toml")).unwrap();
        config.validate().unwrap();
        assert!(config.tls.enabled && config.websocket.tls_enabled);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<Config>("[mqtt]\nmax_packet_sise = 10\n").unwrap_err();
        assert!(err.to_string().contains("max_packet_sise"), "{err}");
    }

    #[test]
    fn per_filter_policies_and_group_strategies_parse() {
        let config: Config = toml::from_str(
            "[[queue.rule]]\nfilter = \"alerts/#\"\npolicy = \"refuse\"\n\
             [[shared.group]]\nprefix = \"s-\"\nstrategy = \"sticky\"\n",
        )
        .unwrap();
        assert_eq!(config.queue.rule[0].policy, OverflowPolicy::Refuse);
        assert_eq!(config.shared.group[0].strategy, ShareStrategy::Sticky);
        config.validate().unwrap();
    }

    #[test]
    fn partial_files_keep_other_defaults() {
        let config: Config = toml::from_str("[mqtt]\nconnect_timeout = \"2s\"\n").unwrap();
        assert_eq!(config.mqtt.connect_timeout, Duration::from_secs(2));
        assert_eq!(config.mqtt.max_packet_size, 1024 * 1024);
    }

    #[test]
    fn out_of_range_limits_are_refused() {
        let mut config = Config::default();
        config.mqtt.max_packet_size = 10;
        assert!(config.validate().is_err());
        let mut config = Config::default();
        config.mqtt.receive_maximum = 0;
        assert!(config.validate().is_err());
        let mut config = Config::default();
        config.queue.memory_low_watermark = config.queue.memory_high_watermark;
        assert!(config.validate().is_err());
        let mut config = Config::default();
        config.mqtt.max_keep_alive = Some(0);
        assert!(config.validate().is_err());
        config.mqtt.max_keep_alive = Some(60);
        config.mqtt.server_keep_alive = Some(61);
        assert!(config.validate().is_err());
        config.mqtt.server_keep_alive = Some(0);
        assert!(config.validate().is_err());
        config.mqtt.server_keep_alive = Some(60);
        config.validate().unwrap();
        let mut config = Config::default();
        config.queue.rule.push(QueueRule {
            filter: "a/#/b".into(),
            policy: OverflowPolicy::Refuse,
        });
        assert!(config.validate().is_err());
    }
}
