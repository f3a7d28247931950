//! The version-neutral packet model the rest of the broker works with.
//!
//! Decoding turns MQTT 3.1, 3.1.1 and 5.0 packets into these types; fields that only exist in
//! MQTT 5 carry the value the spec says applies when they are absent.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Quality of service of a message or subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::AtMostOnce),
            1 => Some(Self::AtLeastOnce),
            2 => Some(Self::ExactlyOnce),
            _ => None,
        }
    }
}

/// Protocol revision a client connected with; chosen from CONNECT's protocol name and level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProtocolVersion {
    /// "MQIsdp", level 3.
    V3_1,
    /// "MQTT", level 4.
    V3_1_1,
    /// "MQTT", level 5.
    V5,
}

impl ProtocolVersion {
    pub fn is_v5(self) -> bool {
        self == Self::V5
    }

    /// The Protocol Level byte of its CONNECT [MQTT-3.1.2-2].
    pub fn level(self) -> u8 {
        match self {
            Self::V3_1 => 3,
            Self::V3_1_1 => 4,
            Self::V5 => 5,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::V3_1 => "3.1",
            Self::V3_1_1 => "3.1.1",
            Self::V5 => "5.0",
        }
    }
}

/// What a client asked for when it subscribed to one filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// Maximum QoS granted.
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
    pub subscription_id: Option<u32>,
}

/// MQTT 5 properties that belong to an application message and travel with it to subscribers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageProperties {
    pub payload_format_indicator: Option<u8>,
    /// Seconds the message may live, as received; the broker forwards what remains [MQTT-3.3.2-6].
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

impl MessageProperties {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Heap bytes the properties hold, for queue accounting.
    pub fn heap_size(&self) -> usize {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        text(&self.content_type)
            + text(&self.response_topic)
            + self.correlation_data.as_ref().map_or(0, Bytes::len)
            + self
                .user_properties
                .iter()
                .map(|(k, v)| std::mem::size_of::<(String, String)>() + k.len() + v.len())
                .sum::<usize>()
    }
}

/// The will message of a CONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Seconds to wait after the connection is lost before publishing (v5 Will Delay Interval).
    pub delay_interval: u32,
    pub properties: MessageProperties,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: ProtocolVersion,
    pub client_id: String,
    /// Clean Session (3.1.1) or Clean Start (5.0).
    pub clean_start: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    /// Binary data: MQTT passwords need not be UTF-8.
    pub password: Option<Bytes>,
    pub will: Option<Will>,
    /// Seconds; 0 when absent [MQTT-3.1.2-?]; 3.1.1 sessions are mapped by the session layer.
    pub session_expiry_interval: u32,
    /// 65,535 when absent.
    pub receive_maximum: u16,
    pub maximum_packet_size: Option<u32>,
    pub topic_alias_maximum: u16,
    pub request_response_information: bool,
    pub request_problem_information: bool,
    pub user_properties: Vec<(String, String)>,
    pub authentication_method: Option<String>,
}

// Written out so that no log line or panic message can ever show a password.
impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connect")
            .field("version", &self.version)
            .field("client_id", &self.client_id)
            .field("clean_start", &self.clean_start)
            .field("keep_alive", &self.keep_alive)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("will", &self.will)
            .field("session_expiry_interval", &self.session_expiry_interval)
            .field("receive_maximum", &self.receive_maximum)
            .field("maximum_packet_size", &self.maximum_packet_size)
            .field("topic_alias_maximum", &self.topic_alias_maximum)
            .field("authentication_method", &self.authentication_method)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Empty when an MQTT 5 client refers to the topic by alias only.
    pub topic: String,
    /// 0 for QoS 0.
    pub packet_id: u16,
    pub payload: Bytes,
    pub topic_alias: Option<u16>,
    pub properties: MessageProperties,
}

/// Retain Handling subscription option (v5 §3.8.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetainHandling {
    SendOnSubscribe = 0,
    SendIfNewSubscription = 1,
    DoNotSend = 2,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeRequest {
    pub filter: String,
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    pub subscription_id: Option<u32>,
    pub filters: Vec<SubscribeRequest>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    pub filters: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disconnect {
    /// Raw v5 reason code; 0 (normal) for 3.1.1.
    pub reason: u8,
    pub session_expiry_interval: Option<u32>,
}

/// A packet a client may send to the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    Publish(Publish),
    PubAck { packet_id: u16, reason: u8 },
    PubRec { packet_id: u16, reason: u8 },
    PubRel { packet_id: u16, reason: u8 },
    PubComp { packet_id: u16, reason: u8 },
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    PingReq,
    Disconnect(Disconnect),
}

impl Packet {
    /// A low-cardinality name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Publish(_) => "publish",
            Self::PubAck { .. } => "puback",
            Self::PubRec { .. } => "pubrec",
            Self::PubRel { .. } => "pubrel",
            Self::PubComp { .. } => "pubcomp",
            Self::Subscribe(_) => "subscribe",
            Self::Unsubscribe(_) => "unsubscribe",
            Self::PingReq => "pingreq",
            Self::Disconnect(_) => "disconnect",
        }
    }
}
