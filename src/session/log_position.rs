//! A session's place in a cluster's replication log: which deliveries that came through the
//! log it still holds, which QoS 2 ones its client completed ahead of those, and whether this
//! node speaks for it. From these the cluster records the session's position, and the node a
//! session moves to replays the log after it (see `cluster::positions`, `cluster::consume`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::sync::lock;

/// QoS 2 completions remembered above the position; past it the oldest are forgotten (a
/// replay may then send one again, with DUP).
const COMPLETED_KEPT: usize = 1024;

/// What the cluster records for a session: every log entry at or before `floor` is done with
/// or not for it, and so are the entries in `completed`; `inbound` are the QoS 2 packet ids
/// its client published and has not released yet, so that a retransmission on another node is
/// not taken as a new message [MQTT-4.3.3-9].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub floor: u64,
    pub completed: Vec<u64>,
    /// With the id each message is stored under in the log, which a retransmission reuses.
    pub inbound: Vec<(u16, u64)>,
}

#[derive(Debug, Default)]
pub struct LogPosition {
    state: Mutex<State>,
    /// Whether a connection of this node claimed the session since the node started, and no
    /// other node took it over since. Only then does this node record the session's position.
    owned_here: AtomicBool,
    /// The replay of the log into this session failed (its CONNECT was refused): the next
    /// connection replays it from the recorded position, as if it came from another node.
    replay_owed: AtomicBool,
    /// The floor last recorded (0: none yet).
    recorded: AtomicU64,
    /// Serialises this session's position writes, so an older one never lands last.
    pub writing: tokio::sync::Mutex<()>,
    /// Resolves once the QoS 2 message received last was queued for the log: the next one
    /// waits for it, so they reach the log in the order received.
    last_queued: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

#[derive(Debug, Default)]
struct State {
    /// Log positions of deliveries this session holds (queued or in flight), with how many
    /// deliveries hold each; 0 stands for deliveries recovered after a restart, whose
    /// positions are not known.
    pending: BTreeMap<u64, u32>,
    /// QoS 2 deliveries the client acknowledged (PUBREC) above the lowest pending one.
    completed: BTreeSet<u64>,
    /// Deliveries from the log at or below this position, or in `skipped`, are not taken: the
    /// session had them before it moved here.
    skip_through: u64,
    skipped: BTreeSet<u64>,
    /// QoS 2 packet ids received from the client and not yet released, with the id each
    /// message is stored under in the log.
    inbound: BTreeMap<u16, u64>,
}

impl LogPosition {
    /// A delivery at `log_seq` was queued. Called before the log's watermark passes it.
    pub fn add(&self, log_seq: u64) {
        *lock(&self.state).pending.entry(log_seq).or_insert(0) += 1;
    }

    /// The delivery at `log_seq` is done with: acknowledged, sent at QoS 0, dropped or
    /// expired.
    pub fn done_at(&self, log_seq: u64) {
        remove_one(&mut lock(&self.state).pending, log_seq);
    }

    /// The client acknowledged (PUBREC) the QoS 2 delivery at `log_seq`: it must never be
    /// sent to it again as a new message, wherever the session goes.
    pub fn complete(&self, log_seq: u64) {
        let mut state = lock(&self.state);
        remove_one(&mut state.pending, log_seq);
        state.completed.insert(log_seq);
        while state.completed.len() > COMPLETED_KEPT {
            state.completed.pop_first();
        }
    }

    /// The session's queue was emptied (replaced by the one the cluster recorded).
    pub fn clear(&self) {
        let mut state = lock(&self.state);
        state.pending.clear();
        state.completed.clear();
    }

    /// The position to record with the node's watermark at `applied`; `None` while deliveries
    /// recovered after a restart (positions unknown) are held: the recorded one still stands.
    pub fn position(&self, applied: u64) -> Option<Position> {
        let mut state = lock(&self.state);
        let floor = match state.pending.keys().next() {
            Some(0) => return None,
            Some(&lowest) => lowest - 1,
            None => applied,
        };
        // Never below the position the session moved here from: this node's watermark may be
        // behind it (a node restarted without its data reads the log again from far back),
        // and a floor moved back loses the completions above it, so the next node would send
        // those QoS 2 messages again as new (found by the crash loop).
        let floor = floor.max(state.skip_through);
        state.completed.retain(|&seq| seq > floor);
        Some(Position {
            floor,
            completed: state.completed.iter().copied().collect(),
            inbound: state.inbound.iter().map(|(&k, &v)| (k, v)).collect(),
        })
    }

    /// The session moved here from `position`: what the log brings up to it, or completed,
    /// the client had. The completions stay in this node's record of the session until its
    /// floor passes them: a floor here may be lower than the one they were recorded above
    /// (replayed deliveries still held), and a record without them would have the next node
    /// send them again as new (a QoS 2 duplicate).
    pub fn skip(&self, position: &Position) {
        let mut state = lock(&self.state);
        state.skip_through = position.floor;
        state.skipped = position.completed.iter().copied().collect();
        state.completed.extend(position.completed.iter().copied());
        while state.completed.len() > COMPLETED_KEPT {
            state.completed.pop_first();
        }
    }

    /// Whether the delivery at `log_seq` is one this session had before it moved here.
    pub fn had(&self, log_seq: u64) -> bool {
        let state = lock(&self.state);
        log_seq <= state.skip_through || state.skipped.contains(&log_seq)
    }

    /// The client published a QoS 2 message with `packet_id`: the id the log stores it under,
    /// the one an earlier attempt (on another node, resumed here) used if there was one, or
    /// `fresh`.
    pub fn inbound_id(&self, packet_id: u16, fresh: impl FnOnce() -> u64) -> u64 {
        *lock(&self.state)
            .inbound
            .entry(packet_id)
            .or_insert_with(fresh)
    }

    /// The session resumed here with `packet_id` unreleased, stored under `id`.
    pub fn inbound_restore(&self, packet_id: u16, id: u64) {
        lock(&self.state).inbound.insert(packet_id, id);
    }

    /// The client released `packet_id` (PUBREL), or its PUBLISH was refused; whether it was
    /// known.
    pub fn inbound_remove(&self, packet_id: u16) -> bool {
        lock(&self.state).inbound.remove(&packet_id).is_some()
    }

    /// Takes a place in the order of this session's QoS 2 messages: returns what to wait for
    /// before queueing one for the log, and what to signal once it is queued.
    pub fn queue_in_order(
        &self,
    ) -> (
        Option<tokio::sync::oneshot::Receiver<()>>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (queued, next) = tokio::sync::oneshot::channel();
        let before = lock(&self.last_queued).replace(next);
        (before, queued)
    }

    pub fn set_owned_here(&self, owned: bool) {
        self.owned_here.store(owned, Ordering::Release);
    }

    pub fn is_owned_here(&self) -> bool {
        self.owned_here.load(Ordering::Acquire)
    }

    pub fn set_replay_owed(&self, owed: bool) {
        self.replay_owed.store(owed, Ordering::Release);
    }

    pub fn replay_owed(&self) -> bool {
        self.replay_owed.load(Ordering::Acquire)
    }

    /// Notes that `floor` is being recorded; whether it differs from the last one.
    pub fn note_recorded(&self, floor: u64) -> bool {
        self.recorded.swap(floor, Ordering::AcqRel) != floor
    }
}

fn remove_one(pending: &mut BTreeMap<u64, u32>, seq: u64) {
    if let std::collections::btree_map::Entry::Occupied(mut entry) = pending.entry(seq) {
        *entry.get_mut() -= 1;
        if *entry.get() == 0 {
            entry.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_session_s_floor_never_goes_back_below_where_it_came_from() {
        let log = LogPosition::default();
        log.skip(&Position {
            floor: 100,
            completed: vec![104],
            inbound: Vec::new(),
        });
        let position = log.position(60).expect("nothing recovered");
        assert_eq!(
            (position.floor, position.completed),
            (100, vec![104]),
            "a watermark behind the recorded floor"
        );
        log.add(103);
        assert_eq!(log.position(60).map(|p| p.floor), Some(102));
        log.done_at(103);
        assert_eq!(log.position(200).map(|p| p.floor), Some(200));
    }

    #[test]
    fn the_floor_is_below_the_lowest_held_delivery_or_the_watermark() {
        let log = LogPosition::default();
        assert_eq!(log.position(40).map(|p| p.floor), Some(40));
        log.add(7);
        log.add(7);
        log.add(9);
        assert_eq!(log.position(40).map(|p| p.floor), Some(6));
        log.done_at(7);
        assert_eq!(
            log.position(40).map(|p| p.floor),
            Some(6),
            "one delivery at 7 left"
        );
        log.done_at(7);
        assert_eq!(log.position(40).map(|p| p.floor), Some(8));
        log.done_at(3);
        log.add(0);
        assert_eq!(
            log.position(40),
            None,
            "a restored delivery holds the floor"
        );
        log.done_at(0);
        log.done_at(9);
        assert_eq!(log.position(40).map(|p| p.floor), Some(40));
    }

    #[test]
    fn completed_qos2_deliveries_above_the_floor_are_recorded_until_it_passes_them() {
        let log = LogPosition::default();
        log.add(5);
        log.add(6);
        log.complete(6);
        assert_eq!(
            log.position(10),
            Some(Position {
                floor: 4,
                completed: vec![6],
                inbound: vec![],
            })
        );
        log.done_at(5);
        assert_eq!(
            log.position(10),
            Some(Position {
                floor: 10,
                completed: vec![],
                inbound: vec![],
            })
        );
        log.skip(&Position {
            floor: 4,
            completed: vec![6],
            inbound: vec![],
        });
        assert_eq!(log.inbound_id(9, || 90), 90);
        assert_eq!(
            log.inbound_id(9, || 91),
            90,
            "a retransmission keeps its id"
        );
        log.inbound_restore(3, 30);
        assert!(log.inbound_remove(9));
        assert!(!log.inbound_remove(9));
        assert_eq!(log.position(10).map(|p| p.inbound), Some(vec![(3, 30)]));
        assert!(log.had(4) && log.had(6) && !log.had(5) && !log.had(7));
    }

    #[test]
    fn completions_recorded_elsewhere_stay_recorded_until_the_floor_passes_them() {
        let log = LogPosition::default();
        log.skip(&Position {
            floor: 10,
            completed: vec![12, 15],
            inbound: vec![],
        });
        // A replayed delivery below them is still held here: the floor falls back under both.
        log.add(11);
        assert_eq!(
            log.position(20).map(|p| (p.floor, p.completed)),
            Some((10, vec![12, 15]))
        );
        log.done_at(11);
        assert_eq!(
            log.position(13).map(|p| (p.floor, p.completed)),
            Some((13, vec![15]))
        );
    }
}
