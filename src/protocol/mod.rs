//! The MQTT wire protocol: the only module that knows MQTT 3.1 / 3.1.1 / 5.0 wire details and the
//! only one that imports the codec crate. Everything else works with the version-neutral
//! [`Packet`] model and asks this module to encode replies.

mod decode;
pub mod encode;
mod packet;
mod reason;
pub mod topic;
pub mod validate;
mod wire;

pub use decode::{connect_protocol_level, decode};
pub use packet::{
    Connect, Disconnect, MessageProperties, Packet, ProtocolVersion, Publish, QoS, RetainHandling,
    Subscribe, SubscribeRequest, SubscriptionOptions, Unsubscribe, Will,
};
pub use reason::{ProtocolError, ReasonCode};

#[cfg(test)]
mod tests;
