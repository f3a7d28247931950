//! Configuration: the `telemq.toml` file, its defaults and its validation.
//!
//! Every key has a default, so the broker runs with no file at all. Unknown keys are rejected so
//! a typo never silently falls back to a default. [`DEFAULT_CONFIG`] is the documented default
//! file printed by `telemq print-default-config`; a test keeps it equal to `Config::default()`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::overload::OverflowPolicy;
use crate::protocol::validate::is_valid_filter;
use crate::router::shared::ShareStrategy;
use crate::storage::Durability;

/// The default configuration, documented. `telemq print-default-config` prints it.
pub const DEFAULT_CONFIG: &str = r#"# telemq configuration. Every key is optional; the values below are the defaults.

[listener]
# Address of the plain MQTT (TCP) listener.
bind = "0.0.0.0:1883"
# Connections accepted at once; further clients wait in the kernel's accept backlog.
max_connections = 100000

[mqtt]
# Largest packet accepted from a client, in bytes (fixed header included). Advertised to MQTT 5
# clients as Maximum Packet Size; larger packets close the connection (reason 0x95).
max_packet_size = 1048576
# Time a new connection has to send CONNECT.
connect_timeout = "10s"
# Keep alive the broker imposes on MQTT 5 clients (Server Keep Alive), in seconds. Unset: the
# client's own value is used. A client silent for 1.5 times its keep alive is disconnected.
# server_keep_alive = 60
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
"#;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listener: ListenerConfig,
    pub mqtt: MqttConfig,
    pub queue: QueueConfig,
    pub shared: SharedConfig,
    pub dead_letter: DeadLetterConfig,
    pub delayed: DelayedConfig,
    pub metrics: MetricsConfig,
    pub storage: StorageConfig,
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
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([0, 0, 0, 0], 1883)),
            max_connections: 100_000,
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
    pub receive_maximum: u16,
    pub max_inflight_messages: u16,
    pub topic_alias_maximum: u16,
    pub max_session_expiry_interval: u32,
    pub retain_available: bool,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            max_packet_size: 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            server_keep_alive: None,
            receive_maximum: 1024,
            max_inflight_messages: 1024,
            topic_alias_maximum: 64,
            max_session_expiry_interval: u32::MAX,
            retain_available: true,
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
        config.queue.rule.push(QueueRule {
            filter: "a/#/b".into(),
            policy: OverflowPolicy::Refuse,
        });
        assert!(config.validate().is_err());
    }
}
