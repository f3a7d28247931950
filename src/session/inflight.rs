//! Outbound QoS 1 and QoS 2 state of one session: the window of PUBLISH packets sent to the
//! client and not yet completed.
//!
//! Entries stay in the order they were first sent so that a resumed session re-sends them in that
//! order [MQTT-4.6.0-1]; the window never holds more entries than the client's Receive Maximum
//! allows [MQTT-4.9.0-1], which the connection checks with [`Inflight::len`] before sending.
//!
//! Packet identifiers are derived from the delivery's queue sequence number rather than
//! allocated, so a delivery recovered from storage after a restart is re-sent with the packet id
//! it may already have gone out with, and the client's QoS 2 de-duplication recognises it. The
//! only cost: a delivery whose derived id is still in use waits until it is free.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use crate::message::Delivery;
use crate::metrics::INFLIGHT;
use crate::small_map::SmallMap;

/// Where an outbound QoS 1/2 delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// QoS 1 PUBLISH sent, PUBACK outstanding.
    AwaitingPubAck,
    /// QoS 2 PUBLISH sent, PUBREC outstanding.
    AwaitingPubRec,
    /// PUBREL sent, PUBCOMP outstanding; the message itself is no longer re-sent.
    AwaitingPubComp,
}

#[derive(Clone, Debug)]
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

/// The non-zero packet identifier of the delivery with queue sequence `seq` [MQTT-2.3.1-1].
pub fn packet_id_for(seq: u64) -> u16 {
    (seq % u64::from(u16::MAX)) as u16 + 1
}

#[derive(Debug, Default)]
pub struct Inflight {
    entries: VecDeque<OutboundEntry>,
    /// Small while the window is: most sessions have a few messages in flight at most.
    in_use: SmallMap<u16, ()>,
}

// Every window counts its entries into the process-wide in-flight gauge, copies and drops
// included.
impl Clone for Inflight {
    fn clone(&self) -> Self {
        INFLIGHT.fetch_add(self.entries.len(), Ordering::Relaxed);
        Self {
            entries: self.entries.clone(),
            in_use: self.in_use.clone(),
        }
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        INFLIGHT.fetch_sub(self.entries.len(), Ordering::Relaxed);
    }
}

impl Inflight {
    pub fn new() -> Self {
        Self::default()
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

    /// Empties the window (the session is ending).
    pub fn drain(&mut self) -> impl Iterator<Item = OutboundEntry> + '_ {
        self.in_use = SmallMap::new();
        INFLIGHT.fetch_sub(self.entries.len(), Ordering::Relaxed);
        self.entries.drain(..)
    }

    /// Takes out, in order, the entries `take` selects.
    pub fn take_where(
        &mut self,
        mut take: impl FnMut(&OutboundEntry) -> bool,
    ) -> Vec<OutboundEntry> {
        let mut taken = Vec::new();
        let mut index = 0;
        while index < self.entries.len() {
            if take(&self.entries[index]) {
                taken.extend(self.remove_at(index));
            } else {
                index += 1;
            }
        }
        taken
    }

    /// Whether `packet_id` belongs to an unfinished delivery [MQTT-2.3.1-2].
    pub fn is_in_use(&self, packet_id: u16) -> bool {
        self.in_use.contains_key(&packet_id)
    }

    pub fn push(&mut self, entry: OutboundEntry) {
        INFLIGHT.fetch_add(1, Ordering::Relaxed);
        self.in_use.insert(entry.packet_id, ());
        self.entries.push_back(entry);
    }

    pub fn get(&self, packet_id: u16) -> Option<&OutboundEntry> {
        self.entries.iter().find(|e| e.packet_id == packet_id)
    }

    pub fn get_mut(&mut self, packet_id: u16) -> Option<&mut OutboundEntry> {
        self.entries.iter_mut().find(|e| e.packet_id == packet_id)
    }

    fn remove_at(&mut self, index: usize) -> Option<OutboundEntry> {
        let entry = self.entries.remove(index)?;
        INFLIGHT.fetch_sub(1, Ordering::Relaxed);
        self.in_use.remove(&entry.packet_id);
        Some(entry)
    }

    fn position(&self, packet_id: u16, stage: Stage) -> Option<usize> {
        // Acknowledgements nearly always arrive in order, so the match is usually the front.
        self.entries
            .iter()
            .position(|e| e.packet_id == packet_id && e.stage == stage)
    }

    /// PUBACK completes a QoS 1 delivery; returns it if one was waiting.
    pub fn on_puback(&mut self, packet_id: u16) -> Option<OutboundEntry> {
        let index = self.position(packet_id, Stage::AwaitingPubAck)?;
        self.remove_at(index)
    }

    /// PUBREC moves a QoS 2 delivery on; a refused one is removed and returned with the outcome.
    pub fn on_pubrec(
        &mut self,
        packet_id: u16,
        refused: bool,
    ) -> (PubRecOutcome, Option<OutboundEntry>) {
        let Some(index) = self.position(packet_id, Stage::AwaitingPubRec) else {
            return (PubRecOutcome::Unknown, None);
        };
        if refused {
            return (PubRecOutcome::Refused, self.remove_at(index));
        }
        self.entries[index].stage = Stage::AwaitingPubComp;
        (PubRecOutcome::Release, None)
    }

    /// PUBCOMP completes a QoS 2 delivery; returns it if one was waiting.
    pub fn on_pubcomp(&mut self, packet_id: u16) -> Option<OutboundEntry> {
        let index = self.position(packet_id, Stage::AwaitingPubComp)?;
        self.remove_at(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::protocol::{MessageProperties, QoS};
    use std::sync::Arc;

    fn delivery(qos: QoS, seq: u64) -> Delivery {
        let message = Arc::new(Message::new(
            "t".into(),
            bytes::Bytes::from_static(b"p"),
            qos,
            false,
            MessageProperties::default(),
            None,
        ));
        Delivery::new(message, qos, false, Vec::new(), seq)
    }

    fn send(inflight: &mut Inflight, qos: QoS, seq: u64) -> u16 {
        let packet_id = packet_id_for(seq);
        assert!(!inflight.is_in_use(packet_id));
        let stage = if qos == QoS::AtLeastOnce {
            Stage::AwaitingPubAck
        } else {
            Stage::AwaitingPubRec
        };
        inflight.push(OutboundEntry {
            packet_id,
            stage,
            delivery: delivery(qos, seq),
        });
        packet_id
    }

    #[test]
    fn qos1_completes_on_puback_only_once() {
        let mut inflight = Inflight::new();
        let id = send(&mut inflight, QoS::AtLeastOnce, 0);
        assert!(
            inflight.on_pubcomp(id).is_none(),
            "PUBCOMP does not complete QoS 1"
        );
        assert!(inflight.on_puback(id).is_some());
        assert!(inflight.on_puback(id).is_none());
        assert!(inflight.is_empty());
        assert!(!inflight.is_in_use(id));
    }

    #[test]
    fn qos2_walks_pubrec_then_pubcomp() {
        let mut inflight = Inflight::new();
        let id = send(&mut inflight, QoS::ExactlyOnce, 5);
        assert!(
            inflight.on_puback(id).is_none(),
            "PUBACK does not complete QoS 2"
        );
        assert_eq!(inflight.on_pubrec(id, false).0, PubRecOutcome::Release);
        assert_eq!(inflight.get(id).unwrap().stage, Stage::AwaitingPubComp);
        assert_eq!(inflight.on_pubrec(id, false).0, PubRecOutcome::Unknown);
        assert_eq!(inflight.len(), 1, "still counts against receive maximum");
        assert!(inflight.on_pubcomp(id).is_some());
        assert!(inflight.is_empty());
    }

    #[test]
    fn refused_pubrec_ends_the_flow() {
        let mut inflight = Inflight::new();
        let id = send(&mut inflight, QoS::ExactlyOnce, 1);
        let (outcome, entry) = inflight.on_pubrec(id, true);
        assert_eq!(outcome, PubRecOutcome::Refused);
        assert_eq!(entry.unwrap().packet_id, id);
        assert!(inflight.is_empty());
    }

    #[test]
    fn packet_ids_are_never_zero_and_repeat_every_65535_sequences() {
        assert_eq!(packet_id_for(0), 1);
        assert_eq!(packet_id_for(65_534), 65_535);
        assert_eq!(packet_id_for(65_535), 1);
        let mut inflight = Inflight::new();
        send(&mut inflight, QoS::AtLeastOnce, 0);
        assert!(
            inflight.is_in_use(packet_id_for(65_535)),
            "the wrap collides while in use"
        );
    }

    #[test]
    fn resend_order_is_send_order() {
        let mut inflight = Inflight::new();
        let ids: Vec<u16> = (0..5)
            .map(|seq| send(&mut inflight, QoS::AtLeastOnce, seq))
            .collect();
        assert!(inflight.on_puback(ids[2]).is_some());
        let left: Vec<u16> = inflight.entries().map(|e| e.packet_id).collect();
        assert_eq!(left, vec![ids[0], ids[1], ids[3], ids[4]]);
    }
}
