//! Crash tests: the real `telemq` binary is killed with SIGKILL in the middle of a stream of
//! QoS 1 and QoS 2 publishes into a persistent session, restarted on the same data directory,
//! several times. Every message the publisher got a PUBACK or PUBREC for must be delivered
//! afterwards; QoS 2 messages exactly once.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use common::crash_load::{packet_id_of, publish_bytes, qos_of};
use common::packets::{self, parse_publish};
use common::process::BrokerProcess;
use common::RawClient;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// PUBLISH sent, no PUBACK/PUBREC yet.
    Sent,
    /// QoS 2: PUBREC received, PUBREL sent, PUBCOMP outstanding.
    Released,
}

#[derive(Clone, Copy, Debug)]
struct Outstanding {
    seq: u32,
    qos: u8,
    stage: Stage,
}

/// A publisher that behaves as the spec asks of a client with a persistent session: after a
/// reconnect it re-sends unacknowledged PUBLISH packets with DUP and the same packet id, and
/// PUBREL for those past PUBREC [MQTT-4.4.0-1].
struct Publisher {
    client: Option<RawClient>,
    outstanding: BTreeMap<u16, Outstanding>,
    next_seq: u32,
    /// Seqs the broker acknowledged (PUBACK for QoS 1, PUBREC for QoS 2).
    accepted: Vec<(u32, u8)>,
}

const WINDOW: usize = 32;

impl Publisher {
    async fn connect(&mut self, addr: SocketAddr) {
        let (mut client, _) =
            RawClient::handshake(addr, &packets::connect_v4("crash-pub", false, 60)).await;
        for (&packet_id, out) in &self.outstanding {
            match out.stage {
                Stage::Sent => client.send(&publish_bytes("crash", out.seq, true)).await,
                Stage::Released => client.send(&packets::pubrel(packet_id)).await,
            }
        }
        self.client = Some(client);
    }

    /// Publishes until `accepted` reaches `target` (or, with `drain`, until nothing is
    /// outstanding). Returns false if the connection dropped.
    async fn pump(&mut self, target: usize, total: u32, drain: bool) -> bool {
        let Some(client) = self.client.as_mut() else {
            return false;
        };
        loop {
            if drain && self.outstanding.is_empty() && self.next_seq >= total {
                return true;
            }
            if !drain && self.accepted.len() >= target {
                return true;
            }
            while self.outstanding.len() < WINDOW && self.next_seq < total {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.outstanding.insert(
                    packet_id_of(seq),
                    Outstanding {
                        seq,
                        qos: qos_of(seq),
                        stage: Stage::Sent,
                    },
                );
                client
                    .send_lenient(&publish_bytes("crash", seq, false))
                    .await;
            }
            let Some(packet) = client.recv().await else {
                self.client = None;
                return false;
            };
            let packet_id = u16::from_be_bytes([packet.body[0], packet.body[1]]);
            match packet.packet_type() {
                4 => {
                    if let Some(out) = self.outstanding.remove(&packet_id) {
                        assert_eq!(out.qos, 1);
                        self.accepted.push((out.seq, 1));
                    }
                }
                5 => {
                    if let Some(out) = self.outstanding.get_mut(&packet_id) {
                        if out.stage == Stage::Sent {
                            out.stage = Stage::Released;
                            self.accepted.push((out.seq, 2));
                        }
                    }
                    client.send_lenient(&packets::pubrel(packet_id)).await;
                }
                7 => {
                    self.outstanding.remove(&packet_id);
                }
                other => panic!("publisher got packet type {other}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_repeated_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("telemq.toml");
    std::fs::write(
        &config,
        format!(
            "[listener]\nbind = \"127.0.0.1:0\"\n[websocket]\nenabled = false\n[metrics]\nbind = \"127.0.0.1:0\"\n[storage]\ndata_dir = \"{}\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();

    let mut broker = BrokerProcess::start(&config);
    {
        let (mut subscriber, _) =
            RawClient::handshake(broker.addr, &packets::connect_v4("crash-sub", false, 60)).await;
        subscriber
            .send(&packets::subscribe(1, "crash/#", 2, None))
            .await;
        assert_eq!(subscriber.recv_type(9).await.body, vec![0, 1, 2]);
        subscriber.send(&packets::DISCONNECT).await;
        subscriber.expect_closed().await;
    }

    const TOTAL: u32 = 3000;
    const ROUNDS: usize = 4;
    let mut publisher = Publisher {
        client: None,
        outstanding: BTreeMap::new(),
        next_seq: 0,
        accepted: Vec::new(),
    };
    for round in 1..=ROUNDS {
        publisher.connect(broker.addr).await;
        // Kill while publishes are in flight, at a point that moves every round.
        let target = round * 500 + 37 * round;
        assert!(publisher.pump(target, TOTAL, false).await, "round {round}");
        assert!(
            !publisher.outstanding.is_empty(),
            "publishes in flight at the kill"
        );
        broker.kill();
        publisher.client = None;
        broker = BrokerProcess::start(&config);
    }
    publisher.connect(broker.addr).await;
    assert!(publisher.pump(0, TOTAL, true).await, "final drain");
    let accepted: HashMap<u32, u8> = publisher.accepted.iter().copied().collect();
    assert_eq!(accepted.len(), TOTAL as usize);

    // The subscriber comes back and reads its queue, acknowledging as a client would, with
    // QoS 2 de-duplication by packet id until PUBREL.
    let (mut subscriber, connack) =
        RawClient::handshake(broker.addr, &packets::connect_v4("crash-sub", false, 60)).await;
    assert_eq!(connack.body[0], 1, "session present");
    let mut delivered: HashMap<u32, usize> = HashMap::new();
    let mut held_qos2: HashMap<u16, u32> = HashMap::new();
    let mut completed_qos2 = 0usize;
    let qos2_total = accepted.values().filter(|&&q| q == 2).count();
    let qos1_total = accepted.len() - qos2_total;
    loop {
        let qos1_done = accepted
            .iter()
            .filter(|(_, &q)| q == 1)
            .all(|(seq, _)| delivered.contains_key(seq));
        let done = qos1_done && completed_qos2 >= qos2_total && held_qos2.is_empty();
        // Once everything arrived, keep listening a little: a duplicate would show up now.
        let wait = if done { common::QUIET } else { common::WAIT };
        let packet = match subscriber.recv_within(wait).await {
            Ok(Some(packet)) => packet,
            Ok(None) => panic!("subscriber disconnected"),
            Err(()) if done => break,
            Err(()) => panic!(
                "stalled: {} delivered, {completed_qos2}/{qos2_total} QoS 2 completed",
                delivered.len()
            ),
        };
        match packet.packet_type() {
            3 => {
                let publish = parse_publish(&packet, false);
                let seq = u32::from_be_bytes(publish.payload[..4].try_into().unwrap());
                if publish.qos == 1 {
                    *delivered.entry(seq).or_default() += 1;
                    subscriber.send(&packets::puback(publish.packet_id)).await;
                } else {
                    assert_eq!(publish.qos, 2);
                    if let std::collections::hash_map::Entry::Vacant(slot) =
                        held_qos2.entry(publish.packet_id)
                    {
                        slot.insert(seq);
                        *delivered.entry(seq).or_default() += 1;
                    }
                    subscriber.send(&packets::pubrec(publish.packet_id)).await;
                }
            }
            6 => {
                let packet_id = u16::from_be_bytes([packet.body[0], packet.body[1]]);
                if held_qos2.remove(&packet_id).is_some() {
                    completed_qos2 += 1;
                }
                subscriber.send(&packets::pubcomp(packet_id)).await;
            }
            other => panic!("subscriber got packet type {other}"),
        }
    }
    for (seq, qos) in &accepted {
        let count = delivered.get(seq).copied().unwrap_or(0);
        assert!(count >= 1, "acknowledged QoS {qos} message {seq} was lost");
        if *qos == 2 {
            assert_eq!(count, 1, "QoS 2 message {seq} delivered {count} times");
        }
    }
    assert!(delivered.len() >= qos1_total + qos2_total);
    broker.kill();
}
