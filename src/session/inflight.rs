//! Outbound QoS 1 and QoS 2 state of one session: the packet identifier allocator and the window
//! of PUBLISH packets sent to the client and not yet completed.
//!
//! Entries stay in the order they were first sent so that a resumed session re-sends them in that
//! order [MQTT-4.6.0-1]; the window never holds more entries than the client's Receive Maximum
//! allows [MQTT-4.9.0-1], which the connection checks with [`Inflight::len`] before sending.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::message::Delivery;

/// Where an outbound QoS 1/2 delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// QoS 1 PUBLISH sent, PUBACK outstanding.
    AwaitingPubAck,
    /// QoS 2 PUBLISH sent, PUBREC outstanding.
    AwaitingPubRec,
    /// PUBREL sent, PUBCOMP outstanding; the message itself is no longer re-sent.
    AwaitingPubComp,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutboundEntry {
    pub packet_id: u16,
    pub stage: Stage,
    pub delivery: Delivery,
}

/// What a PUBREC means for the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PubRecOutcome {
    /// Move on to PUBREL.
    Release,
    /// The client refused the message (reason >= 0x80); the flow ends here [MQTT-4.3.3-?].
    Refused,
    /// No QoS 2 delivery with this packet identifier is awaiting PUBREC.
    Unknown,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Inflight {
    entries: VecDeque<OutboundEntry>,
    last_packet_id: u16,
}

impl Default for Inflight {
    fn default() -> Self {
        Self::new()
    }
}

impl Inflight {
    pub fn new() -> Self {
        Self {
            entries: VecDeque::new(),
            last_packet_id: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> impl Iterator<Item = &OutboundEntry> {
        self.entries.iter()
    }

    /// The next packet identifier not used by an in-flight entry [MQTT-2.3.1-2], or `None` when
    /// all 65,535 are in use.
    pub fn allocate_packet_id(&mut self) -> Option<u16> {
        if self.entries.len() >= usize::from(u16::MAX) {
            return None;
        }
        loop {
            self.last_packet_id = self.last_packet_id.checked_add(1).unwrap_or(1);
            let candidate = self.last_packet_id;
            if !self.entries.iter().any(|e| e.packet_id == candidate) {
                return Some(candidate);
            }
        }
    }

    pub fn push(&mut self, entry: OutboundEntry) {
        self.entries.push_back(entry);
    }

    fn position(&self, packet_id: u16, stage: Stage) -> Option<usize> {
        // Acknowledgements nearly always arrive in order, so the match is usually the front.
        self.entries
            .iter()
            .position(|e| e.packet_id == packet_id && e.stage == stage)
    }

    /// PUBACK completes a QoS 1 delivery; returns whether one was waiting for it.
    pub fn on_puback(&mut self, packet_id: u16) -> bool {
        self.position(packet_id, Stage::AwaitingPubAck)
            .and_then(|i| self.entries.remove(i))
            .is_some()
    }

    pub fn on_pubrec(&mut self, packet_id: u16, refused: bool) -> PubRecOutcome {
        let Some(i) = self.position(packet_id, Stage::AwaitingPubRec) else {
            return PubRecOutcome::Unknown;
        };
        if refused {
            self.entries.remove(i);
            return PubRecOutcome::Refused;
        }
        self.entries[i].stage = Stage::AwaitingPubComp;
        PubRecOutcome::Release
    }

    /// PUBCOMP completes a QoS 2 delivery; returns whether one was waiting for it.
    pub fn on_pubcomp(&mut self, packet_id: u16) -> bool {
        self.position(packet_id, Stage::AwaitingPubComp)
            .and_then(|i| self.entries.remove(i))
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::protocol::{MessageProperties, QoS};
    use std::sync::Arc;

    fn delivery(qos: QoS) -> Delivery {
        Delivery {
            message: Arc::new(Message::new(
                "t".into(),
                bytes::Bytes::from_static(b"p"),
                qos,
                false,
                MessageProperties::default(),
                None,
            )),
            qos,
            retain: false,
            subscription_ids: Vec::new(),
        }
    }

    fn send(inflight: &mut Inflight, qos: QoS) -> u16 {
        let packet_id = inflight.allocate_packet_id().unwrap();
        let stage = if qos == QoS::AtLeastOnce {
            Stage::AwaitingPubAck
        } else {
            Stage::AwaitingPubRec
        };
        inflight.push(OutboundEntry {
            packet_id,
            stage,
            delivery: delivery(qos),
        });
        packet_id
    }

    #[test]
    fn qos1_completes_on_puback_only_once() {
        let mut inflight = Inflight::new();
        let id = send(&mut inflight, QoS::AtLeastOnce);
        assert!(!inflight.on_pubcomp(id), "PUBCOMP does not complete QoS 1");
        assert!(inflight.on_puback(id));
        assert!(!inflight.on_puback(id));
        assert!(inflight.is_empty());
    }

    #[test]
    fn qos2_walks_pubrec_then_pubcomp() {
        let mut inflight = Inflight::new();
        let id = send(&mut inflight, QoS::ExactlyOnce);
        assert!(!inflight.on_puback(id), "PUBACK does not complete QoS 2");
        assert_eq!(inflight.on_pubrec(id, false), PubRecOutcome::Release);
        assert_eq!(
            inflight.entries().next().unwrap().stage,
            Stage::AwaitingPubComp
        );
        assert_eq!(inflight.on_pubrec(id, false), PubRecOutcome::Unknown);
        assert_eq!(inflight.len(), 1, "still counts against receive maximum");
        assert!(inflight.on_pubcomp(id));
        assert!(inflight.is_empty());
    }

    #[test]
    fn refused_pubrec_ends_the_flow() {
        let mut inflight = Inflight::new();
        let id = send(&mut inflight, QoS::ExactlyOnce);
        assert_eq!(inflight.on_pubrec(id, true), PubRecOutcome::Refused);
        assert!(inflight.is_empty());
    }

    #[test]
    fn packet_ids_skip_zero_and_ids_in_use_when_wrapping() {
        let mut inflight = Inflight::new();
        let first = send(&mut inflight, QoS::AtLeastOnce);
        assert_eq!(first, 1);
        inflight.last_packet_id = u16::MAX - 1;
        assert_eq!(inflight.allocate_packet_id(), Some(u16::MAX));
        // Wraps past 0 and past id 1, which is still in flight.
        assert_eq!(inflight.allocate_packet_id(), Some(2));
    }

    #[test]
    fn resend_order_is_send_order() {
        let mut inflight = Inflight::new();
        let ids: Vec<u16> = (0..5)
            .map(|_| send(&mut inflight, QoS::AtLeastOnce))
            .collect();
        assert!(inflight.on_puback(ids[2]));
        let left: Vec<u16> = inflight.entries().map(|e| e.packet_id).collect();
        assert_eq!(left, vec![ids[0], ids[1], ids[3], ids[4]]);
    }
}
