//! The stream of messages the crash tests publish: even sequence numbers at QoS 1, odd at QoS 2,
//! one topic per QoS under a prefix, the sequence number as the payload, and a packet id that a
//! retransmission of the same message repeats.

use super::packets;

pub fn qos_of(seq: u32) -> u8 {
    if seq.is_multiple_of(2) {
        1
    } else {
        2
    }
}

pub fn packet_id_of(seq: u32) -> u16 {
    (seq % 60_000) as u16 + 1
}

/// The 3.1.1 PUBLISH of message `seq` on `<prefix>/q<QoS>`.
pub fn publish_bytes(prefix: &str, seq: u32, dup: bool) -> Vec<u8> {
    publish_bytes_at(prefix, seq, qos_of(seq), dup)
}

/// [`publish_bytes`] at a chosen QoS.
pub fn publish_bytes_at(prefix: &str, seq: u32, qos: u8, dup: bool) -> Vec<u8> {
    packets::publish(
        &format!("{prefix}/q{qos}"),
        qos,
        packet_id_of(seq),
        false,
        dup,
        None,
        &seq.to_be_bytes(),
    )
}
