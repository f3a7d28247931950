//! Reason codes and the protocol error type.
//!
//! Every protocol violation the broker detects becomes a [`ProtocolError`] carrying the MQTT 5 reason
//! code the connection is closed with and a static description that cites the normative statement
//! it enforces. MQTT 3.1.1 has no DISCONNECT from the server, so for those clients the code only
//! feeds logs and the `reason` label of the protocol-error metric.

use std::fmt;

/// MQTT 5 reason codes the broker sends (spec §2.4). Values are the wire bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReasonCode {
    Success = 0x00,
    GrantedQoS1 = 0x01,
    GrantedQoS2 = 0x02,
    DisconnectWithWill = 0x04,
    NoMatchingSubscribers = 0x10,
    NoSubscriptionExisted = 0x11,
    UnspecifiedError = 0x80,
    MalformedPacket = 0x81,
    ProtocolError = 0x82,
    ImplementationSpecificError = 0x83,
    UnsupportedProtocolVersion = 0x84,
    ClientIdentifierNotValid = 0x85,
    BadUserNameOrPassword = 0x86,
    NotAuthorized = 0x87,
    ServerUnavailable = 0x88,
    ServerBusy = 0x89,
    ServerShuttingDown = 0x8B,
    BadAuthenticationMethod = 0x8C,
    KeepAliveTimeout = 0x8D,
    SessionTakenOver = 0x8E,
    TopicFilterInvalid = 0x8F,
    TopicNameInvalid = 0x90,
    PacketIdentifierInUse = 0x91,
    PacketIdentifierNotFound = 0x92,
    ReceiveMaximumExceeded = 0x93,
    TopicAliasInvalid = 0x94,
    PacketTooLarge = 0x95,
    QuotaExceeded = 0x97,
    PayloadFormatInvalid = 0x99,
    RetainNotSupported = 0x9A,
    QoSNotSupported = 0x9B,
    SharedSubscriptionsNotSupported = 0x9E,
    SubscriptionIdentifiersNotSupported = 0xA1,
}

impl ReasonCode {
    /// A stable, low-cardinality name for logs and metric labels.
    pub fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::GrantedQoS1 => "granted_qos1",
            Self::GrantedQoS2 => "granted_qos2",
            Self::DisconnectWithWill => "disconnect_with_will",
            Self::NoMatchingSubscribers => "no_matching_subscribers",
            Self::NoSubscriptionExisted => "no_subscription_existed",
            Self::UnspecifiedError => "unspecified_error",
            Self::MalformedPacket => "malformed_packet",
            Self::ProtocolError => "protocol_error",
            Self::ImplementationSpecificError => "implementation_specific_error",
            Self::UnsupportedProtocolVersion => "unsupported_protocol_version",
            Self::ClientIdentifierNotValid => "client_identifier_not_valid",
            Self::BadUserNameOrPassword => "bad_username_or_password",
            Self::NotAuthorized => "not_authorized",
            Self::ServerUnavailable => "server_unavailable",
            Self::ServerBusy => "server_busy",
            Self::ServerShuttingDown => "server_shutting_down",
            Self::BadAuthenticationMethod => "bad_authentication_method",
            Self::KeepAliveTimeout => "keep_alive_timeout",
            Self::SessionTakenOver => "session_taken_over",
            Self::TopicFilterInvalid => "topic_filter_invalid",
            Self::TopicNameInvalid => "topic_name_invalid",
            Self::PacketIdentifierInUse => "packet_identifier_in_use",
            Self::PacketIdentifierNotFound => "packet_identifier_not_found",
            Self::ReceiveMaximumExceeded => "receive_maximum_exceeded",
            Self::TopicAliasInvalid => "topic_alias_invalid",
            Self::PacketTooLarge => "packet_too_large",
            Self::QuotaExceeded => "quota_exceeded",
            Self::PayloadFormatInvalid => "payload_format_invalid",
            Self::RetainNotSupported => "retain_not_supported",
            Self::QoSNotSupported => "qos_not_supported",
            Self::SharedSubscriptionsNotSupported => "shared_subscriptions_not_supported",
            Self::SubscriptionIdentifiersNotSupported => "subscription_identifiers_not_supported",
        }
    }

    /// The MQTT 3.1.1 CONNACK return code closest to this MQTT 5 reason (spec 3.1.1 §3.2.2.3).
    pub fn v3_connack_code(self) -> u8 {
        match self {
            Self::Success => 0,
            Self::UnsupportedProtocolVersion => 1,
            Self::ClientIdentifierNotValid => 2,
            Self::BadUserNameOrPassword => 4,
            Self::NotAuthorized | Self::BadAuthenticationMethod => 5,
            _ => 3,
        }
    }
}

/// A violation of the protocol by the peer. The connection that produced it is closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ProtocolError {
    /// The reason code for the v5 DISCONNECT (or CONNACK) that precedes the close.
    pub reason: ReasonCode,
    /// What was wrong, citing the normative statement, e.g. "[MQTT-3.3.2-2] topic name contains a wildcard".
    pub detail: &'static str,
}

impl ProtocolError {
    pub const fn malformed(detail: &'static str) -> Self {
        Self {
            reason: ReasonCode::MalformedPacket,
            detail,
        }
    }

    pub const fn violation(detail: &'static str) -> Self {
        Self {
            reason: ReasonCode::ProtocolError,
            detail,
        }
    }

    pub const fn new(reason: ReasonCode, detail: &'static str) -> Self {
        Self { reason, detail }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.detail, self.reason.label())
    }
}
