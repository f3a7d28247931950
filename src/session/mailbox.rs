//! A session's queue of deliveries waiting to be written to its client, bounded by messages and
//! bytes, with the overflow policy applied when it is full.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, LazyLock, Mutex};

use tokio::sync::Notify;

use crate::config::OverflowPolicy;
use crate::message::{Delivery, Message};
use crate::overload::MemoryGuard;
use crate::protocol::QoS;
use crate::sync::lock;

/// Bounds of one session's queue.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    pub max_messages: usize,
    pub max_bytes: usize,
    /// Queued QoS 0 messages make room (and a new QoS 0 message is dropped) before any QoS 1/2
    /// message is dropped.
    pub qos0_first: bool,
}

/// What a push did besides queueing.
#[derive(Debug, Default)]
pub struct Pushed {
    /// Older deliveries dropped to make room.
    pub evicted: Vec<Delivery>,
    /// The new delivery, when it was not queued.
    pub rejected: Option<Delivery>,
    /// The queue was full under the `disconnect` policy.
    pub slow_consumer: bool,
}

/// Stands in for the message of a spilled delivery: an empty topic and payload, so the
/// message itself can be freed while its bookkeeping stays queued.
static SPILLED: LazyLock<Arc<Message>> = LazyLock::new(|| {
    Arc::new(Message::new(
        "".into(),
        Default::default(),
        QoS::AtLeastOnce,
        false,
        Default::default(),
        None,
    ))
});

/// Whether a delivery's message was spilled (it is read back from storage before sending).
pub fn is_spilled(delivery: &Delivery) -> bool {
    Arc::ptr_eq(&delivery.message, &SPILLED)
}

/// Memory a spilled entry still holds.
const SPILLED_ENTRY_BYTES: usize = std::mem::size_of::<Queued>();

#[derive(Debug)]
struct Queued {
    delivery: Delivery,
    /// The size counted against the queue's limits: the whole message, spilled or not.
    bytes: usize,
    /// Queued under `drop_oldest`, so a later message may displace it. Messages of topics with
    /// another policy (an `alerts/#` rule of `refuse`, say) are never dropped once queued.
    evictable: bool,
}

impl Queued {
    /// The bytes this entry holds in memory, as the memory guard counts them.
    fn memory(&self) -> usize {
        if is_spilled(&self.delivery) {
            SPILLED_ENTRY_BYTES
        } else {
            self.bytes
        }
    }

    /// Frees the message of a stored delivery; storage has it.
    fn spill(&mut self) -> usize {
        if self.delivery.stored.is_none() || is_spilled(&self.delivery) {
            return 0;
        }
        self.delivery.message = SPILLED.clone();
        self.bytes - SPILLED_ENTRY_BYTES.min(self.bytes)
    }
}

#[derive(Debug, Default)]
struct Queue {
    entries: VecDeque<Queued>,
    bytes: usize,
    qos0: usize,
    /// The session is offline and persistent: under memory pressure its stored messages may
    /// be spilled.
    spillable: bool,
}

impl Queue {
    fn fits(&self, bytes: usize, limits: &QueueLimits) -> bool {
        self.entries.is_empty()
            || (self.entries.len() < limits.max_messages && self.bytes + bytes <= limits.max_bytes)
    }

    fn push_back(&mut self, delivery: Delivery, bytes: usize, evictable: bool) -> &mut Queued {
        self.bytes += bytes;
        if delivery.qos == QoS::AtMostOnce {
            self.qos0 += 1;
        }
        self.entries.push_back(Queued {
            delivery,
            bytes,
            evictable,
        });
        let last = self.entries.len() - 1;
        &mut self.entries[last]
    }

    fn remove(&mut self, index: usize) -> Option<Queued> {
        let queued = self.entries.remove(index)?;
        self.bytes -= queued.bytes;
        if queued.delivery.qos == QoS::AtMostOnce {
            self.qos0 -= 1;
        }
        Some(queued)
    }
}

/// Bounded queue of deliveries waiting to be written to the session's client.
#[derive(Debug)]
pub struct Mailbox {
    queue: Mutex<Queue>,
    notify: Notify,
    limits: Arc<QueueLimits>,
    guard: Arc<MemoryGuard>,
}

impl Mailbox {
    pub fn new(limits: Arc<QueueLimits>, guard: Arc<MemoryGuard>) -> Self {
        Self {
            queue: Mutex::new(Queue::default()),
            notify: Notify::new(),
            limits,
            guard,
        }
    }

    /// Queues a delivery and wakes the connection. When the queue is full, `policy` decides
    /// what is dropped; the caller releases and counts what comes back.
    pub fn push(&self, delivery: Delivery, policy: OverflowPolicy) -> Pushed {
        let bytes = delivery.footprint();
        let mut pushed = Pushed::default();
        let mut freed = 0;
        {
            let mut queue = lock(&self.queue);
            if !queue.fits(bytes, &self.limits) {
                if self.limits.qos0_first {
                    if delivery.qos == QoS::AtMostOnce && queue.qos0 == 0 {
                        pushed.rejected = Some(delivery);
                        return pushed;
                    }
                    while queue.qos0 > 0 && !queue.fits(bytes, &self.limits) {
                        let Some(index) = queue
                            .entries
                            .iter()
                            .position(|q| q.delivery.qos == QoS::AtMostOnce)
                        else {
                            break;
                        };
                        if let Some(old) = queue.remove(index) {
                            freed += old.memory();
                            pushed.evicted.push(old.delivery);
                        }
                    }
                }
                if !queue.fits(bytes, &self.limits) {
                    match policy {
                        OverflowPolicy::DropOldest => {
                            // A recovered delivery past PUBREC is owed its PUBREL, never dropped.
                            while !queue.fits(bytes, &self.limits) {
                                let Some(index) = queue
                                    .entries
                                    .iter()
                                    .position(|q| q.evictable && !q.delivery.awaiting_pubcomp)
                                else {
                                    break;
                                };
                                if let Some(old) = queue.remove(index) {
                                    freed += old.memory();
                                    pushed.evicted.push(old.delivery);
                                }
                            }
                        }
                        OverflowPolicy::Disconnect => pushed.slow_consumer = true,
                        OverflowPolicy::DropNewest | OverflowPolicy::Refuse => {}
                    }
                }
                if !queue.fits(bytes, &self.limits) {
                    drop(queue);
                    self.guard.sub(freed);
                    pushed.rejected = Some(delivery);
                    return pushed;
                }
            }
            let spill = queue.spillable && self.guard.under_pressure();
            let added = queue.push_back(delivery, bytes, policy == OverflowPolicy::DropOldest);
            if spill {
                added.spill();
            }
            // Counted before the lock is released: a connection popping the delivery at once
            // must not subtract it from the guard before it was added (the count would wrap).
            self.guard.add(added.memory());
        }
        self.guard.sub(freed);
        self.notify.notify_one();
        pushed
    }

    /// Whether a delivery of `bytes` would be queued without dropping anything.
    pub fn has_room(&self, bytes: usize) -> bool {
        lock(&self.queue).fits(bytes, &self.limits)
    }

    /// Puts back deliveries recovered from storage or handed back by a closing connection, in
    /// order, whatever the limits: they were accepted already.
    pub fn restore(&self, deliveries: impl IntoIterator<Item = Delivery>) {
        {
            let mut queue = lock(&self.queue);
            let mut added = 0;
            for delivery in deliveries {
                let bytes = delivery.footprint();
                added += queue.push_back(delivery, bytes, true).memory();
            }
            // Under the lock, as in `push`.
            self.guard.add(added);
        }
        self.notify.notify_one();
    }

    /// Takes everything out (the session is ending).
    pub fn drain(&self) -> Vec<Delivery> {
        self.take_where(|_| true)
    }

    /// Takes out, in order, every delivery `take` selects.
    pub fn take_where(&self, mut take: impl FnMut(&Delivery) -> bool) -> Vec<Delivery> {
        let mut taken = Vec::new();
        let mut freed = 0;
        {
            let mut queue = lock(&self.queue);
            let mut index = 0;
            while index < queue.entries.len() {
                if take(&queue.entries[index].delivery) {
                    if let Some(queued) = queue.remove(index) {
                        freed += queued.memory();
                        taken.push(queued.delivery);
                    }
                } else {
                    index += 1;
                }
            }
        }
        self.guard.sub(freed);
        taken
    }

    /// Takes the front delivery if `accept` agrees to it. A spilled delivery is not taken: its
    /// message must be read back first ([`Mailbox::unspill`]).
    pub fn pop_if(&self, accept: impl FnOnce(&Delivery) -> bool) -> Option<Delivery> {
        let queued = {
            let mut queue = lock(&self.queue);
            let front = &queue.entries.front()?.delivery;
            if is_spilled(front) || !accept(front) {
                return None;
            }
            queue.remove(0)?
        };
        self.guard.sub(queued.memory());
        Some(queued.delivery)
    }

    /// Marks the session offline and persistent (its stored messages may be spilled under
    /// memory pressure) or back online (they may not).
    pub fn set_spillable(&self, spillable: bool) {
        lock(&self.queue).spillable = spillable;
    }

    /// Frees the messages of every stored delivery if the session is offline; storage keeps
    /// them. Returns the bytes freed.
    pub fn spill(&self) -> usize {
        let freed = {
            let mut queue = lock(&self.queue);
            if !queue.spillable {
                return 0;
            }
            queue.entries.iter_mut().map(Queued::spill).sum()
        };
        self.guard.sub(freed);
        freed
    }

    /// Stops spilling (the client is back) and returns the stored message ids of the spilled
    /// deliveries, to be read back and handed to [`Mailbox::refill`].
    pub fn unspill(&self) -> Vec<u64> {
        let mut queue = lock(&self.queue);
        queue.spillable = false;
        queue
            .entries
            .iter()
            .filter(|q| is_spilled(&q.delivery))
            .filter_map(|q| q.delivery.stored.as_ref().map(|s| s.id))
            .collect()
    }

    /// Puts the messages read back from storage into the spilled deliveries. Deliveries whose
    /// message could not be found are taken out and returned, for release.
    pub fn refill(&self, messages: &HashMap<u64, Arc<Message>>) -> Vec<Delivery> {
        let (mut refilled, mut freed) = (0, 0);
        let mut lost = Vec::new();
        {
            let mut queue = lock(&self.queue);
            let mut index = 0;
            while index < queue.entries.len() {
                let queued = &mut queue.entries[index];
                let found = match &queued.delivery.stored {
                    Some(stored) if is_spilled(&queued.delivery) => messages.get(&stored.id),
                    _ => {
                        index += 1;
                        continue;
                    }
                };
                match found {
                    Some(message) => {
                        queued.delivery.message = message.clone();
                        refilled += queued.bytes - SPILLED_ENTRY_BYTES.min(queued.bytes);
                        index += 1;
                    }
                    None => {
                        if let Some(queued) = queue.remove(index) {
                            freed += queued.memory();
                            lost.push(queued.delivery);
                        }
                    }
                }
            }
            // Under the lock, as in `push`.
            self.guard.add(refilled);
        }
        self.guard.sub(freed);
        self.notify.notify_one();
        lost
    }

    pub fn len(&self) -> usize {
        lock(&self.queue).entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes queued, as counted against the limits.
    pub fn bytes(&self) -> usize {
        lock(&self.queue).bytes
    }

    /// Wakes the connection waiting in [`Mailbox::notified`] (or its next wait) although
    /// nothing was pushed: it has something else to look at.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Resolves once something was pushed since the last wake-up, or [`Mailbox::wake`] was
    /// called.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn delivery(seq: u64, qos: QoS, payload: usize) -> Delivery {
        let message = Message::new(
            "t".into(),
            Bytes::from(vec![0u8; payload]),
            qos,
            false,
            Default::default(),
            None,
        );
        Delivery::new(Arc::new(message), qos, false, Vec::new(), seq)
    }

    fn mailbox(max_messages: usize, max_bytes: usize, qos0_first: bool) -> Mailbox {
        Mailbox::new(
            Arc::new(QueueLimits {
                max_messages,
                max_bytes,
                qos0_first,
            }),
            Arc::new(MemoryGuard::new(usize::MAX, usize::MAX - 1)),
        )
    }

    fn seqs(mailbox: &Mailbox) -> Vec<u64> {
        mailbox.drain().iter().map(|d| d.seq).collect()
    }

    /// A delivery popped by another thread the moment it is pushed: the memory guard never
    /// counts it out before it counted it in (a wrap below zero pauses every publisher, and
    /// panics in debug builds). Found by the cluster test's 3 000-message flood.
    #[test]
    fn the_memory_guard_never_goes_below_zero_when_a_push_is_popped_at_once() {
        let guard = Arc::new(MemoryGuard::new(usize::MAX, usize::MAX - 1));
        let mailbox = Arc::new(Mailbox::new(
            Arc::new(QueueLimits {
                max_messages: usize::MAX,
                max_bytes: usize::MAX,
                qos0_first: false,
            }),
            guard.clone(),
        ));
        const COUNT: u64 = 200_000;
        let consumer = {
            let mailbox = mailbox.clone();
            std::thread::spawn(move || {
                let mut popped = 0;
                while popped < COUNT {
                    if mailbox.pop_if(|_| true).is_some() {
                        popped += 1;
                    }
                }
            })
        };
        for seq in 0..COUNT {
            mailbox.push(
                delivery(seq, QoS::AtLeastOnce, 1),
                OverflowPolicy::DropNewest,
            );
        }
        consumer.join().expect("no underflow in the consumer");
        assert_eq!(guard.queued_bytes(), 0);
    }

    #[test]
    fn drop_oldest_makes_room_and_drop_newest_refuses() {
        let oldest = mailbox(3, usize::MAX, false);
        let newest = mailbox(3, usize::MAX, false);
        for seq in 0..5 {
            oldest.push(
                delivery(seq, QoS::AtLeastOnce, 1),
                OverflowPolicy::DropOldest,
            );
            newest.push(
                delivery(seq, QoS::AtLeastOnce, 1),
                OverflowPolicy::DropNewest,
            );
        }
        assert_eq!(seqs(&oldest), [2, 3, 4]);
        assert_eq!(seqs(&newest), [0, 1, 2]);
    }

    #[test]
    fn messages_queued_under_another_policy_are_not_displaced_by_drop_oldest() {
        let mailbox = mailbox(2, usize::MAX, false);
        mailbox.push(delivery(0, QoS::AtLeastOnce, 1), OverflowPolicy::Refuse);
        mailbox.push(delivery(1, QoS::AtLeastOnce, 1), OverflowPolicy::DropOldest);
        let pushed = mailbox.push(delivery(2, QoS::AtLeastOnce, 1), OverflowPolicy::DropOldest);
        assert_eq!(
            pushed.evicted.iter().map(|d| d.seq).collect::<Vec<_>>(),
            [1]
        );
        let pushed = mailbox.push(delivery(3, QoS::AtLeastOnce, 1), OverflowPolicy::DropOldest);
        assert_eq!(pushed.evicted[0].seq, 2);
        assert_eq!(seqs(&mailbox), [0, 3]);
    }

    #[test]
    fn the_byte_bound_counts_the_whole_message() {
        let size = delivery(0, QoS::AtLeastOnce, 100).footprint();
        assert!(size > 100 + std::mem::size_of::<Delivery>());
        let mailbox = mailbox(100, size * 2, false);
        for seq in 0..3 {
            mailbox.push(
                delivery(seq, QoS::AtLeastOnce, 100),
                OverflowPolicy::DropNewest,
            );
        }
        assert_eq!(mailbox.len(), 2);
        assert_eq!(mailbox.bytes(), size * 2);
    }

    #[test]
    fn an_oversized_message_still_enters_an_empty_queue() {
        let mailbox = mailbox(10, 10, false);
        let pushed = mailbox.push(
            delivery(0, QoS::AtLeastOnce, 1000),
            OverflowPolicy::DropNewest,
        );
        assert!(pushed.rejected.is_none());
        assert_eq!(mailbox.len(), 1);
    }

    #[test]
    fn qos0_goes_first() {
        let mailbox = mailbox(3, usize::MAX, true);
        mailbox.push(delivery(0, QoS::AtLeastOnce, 1), OverflowPolicy::DropNewest);
        mailbox.push(delivery(1, QoS::AtMostOnce, 1), OverflowPolicy::DropNewest);
        mailbox.push(delivery(2, QoS::AtLeastOnce, 1), OverflowPolicy::DropNewest);
        // Full: the queued QoS 0 message makes room for a QoS 1 message even under drop_newest.
        let pushed = mailbox.push(delivery(3, QoS::AtLeastOnce, 1), OverflowPolicy::DropNewest);
        assert_eq!(pushed.evicted.len(), 1);
        assert_eq!(pushed.evicted[0].seq, 1);
        // Full with no QoS 0 left: a new QoS 0 message is dropped, not an old QoS 1 one.
        let pushed = mailbox.push(delivery(4, QoS::AtMostOnce, 1), OverflowPolicy::DropOldest);
        assert_eq!(pushed.rejected.map(|d| d.seq), Some(4));
        assert_eq!(seqs(&mailbox), [0, 2, 3]);
    }

    #[test]
    fn disconnect_policy_flags_a_slow_consumer() {
        let mailbox = mailbox(1, usize::MAX, false);
        assert!(
            !mailbox
                .push(delivery(0, QoS::AtLeastOnce, 1), OverflowPolicy::Disconnect)
                .slow_consumer
        );
        let pushed = mailbox.push(delivery(1, QoS::AtLeastOnce, 1), OverflowPolicy::Disconnect);
        assert!(pushed.slow_consumer);
        assert_eq!(pushed.rejected.map(|d| d.seq), Some(1));
    }

    #[test]
    fn a_delivery_owed_its_pubrel_is_never_evicted() {
        let mailbox = mailbox(2, usize::MAX, false);
        let mut owed = delivery(0, QoS::ExactlyOnce, 1);
        owed.awaiting_pubcomp = true;
        mailbox.restore([owed]);
        mailbox.push(delivery(1, QoS::ExactlyOnce, 1), OverflowPolicy::DropOldest);
        mailbox.push(delivery(2, QoS::ExactlyOnce, 1), OverflowPolicy::DropOldest);
        assert_eq!(seqs(&mailbox), [0, 2]);
    }

    #[test]
    fn spilled_messages_are_freed_held_back_and_refilled_in_place() {
        let guard = Arc::new(MemoryGuard::new(usize::MAX, usize::MAX - 1));
        let mailbox = Mailbox::new(
            Arc::new(QueueLimits {
                max_messages: 10,
                max_bytes: usize::MAX,
                qos0_first: false,
            }),
            guard.clone(),
        );
        let mut stored = delivery(0, QoS::AtLeastOnce, 1000);
        stored.stored = Some(Arc::new(crate::message::StoredMessage::new(42, 1)));
        let original = stored.message.clone();
        mailbox.push(stored, OverflowPolicy::DropNewest);
        mailbox.push(
            delivery(1, QoS::AtMostOnce, 1000),
            OverflowPolicy::DropNewest,
        );
        let before = guard.queued_bytes();
        assert_eq!(mailbox.spill(), 0, "an online session does not spill");
        mailbox.set_spillable(true);
        assert!(mailbox.spill() > 1000);
        assert!(guard.queued_bytes() < before - 1000);
        assert_eq!(
            mailbox.bytes(),
            before,
            "the queue's bound still counts the message"
        );
        assert!(
            mailbox.pop_if(|_| true).is_none(),
            "a spilled front is not sent"
        );
        assert_eq!(mailbox.unspill(), [42]);
        let lost = mailbox.refill(&HashMap::from([(42, original.clone())]));
        assert!(lost.is_empty());
        assert_eq!(guard.queued_bytes(), before);
        let first = mailbox.pop_if(|_| true).unwrap();
        assert!(Arc::ptr_eq(&first.message, &original));
        assert_eq!(mailbox.pop_if(|_| true).unwrap().seq, 1);
        assert_eq!(guard.queued_bytes(), 0);
    }

    proptest! {
        /// Whatever is pushed and popped, the bounds hold, the byte count equals the sum of the
        /// queued footprints, every delivery is either queued, popped or handed back, and the
        /// global guard sees exactly the queued bytes.
        #[test]
        fn bounds_and_accounting_hold(
            ops in prop::collection::vec((0u8..4, 0u8..3, 0usize..300, 0u8..4), 1..200),
            max_messages in 1usize..8,
            max_bytes in 200usize..2000,
            qos0_first in any::<bool>(),
        ) {
            let guard = Arc::new(MemoryGuard::new(usize::MAX, usize::MAX - 1));
            let mailbox = Mailbox::new(
                Arc::new(QueueLimits { max_messages, max_bytes, qos0_first }),
                guard.clone(),
            );
            let (mut pushes, mut accounted) = (0usize, 0usize);
            for (seq, (op, qos, payload, policy)) in (0u64..).zip(ops) {
                if op == 0 {
                    if mailbox.pop_if(|_| true).is_some() {
                        accounted += 1;
                    }
                    continue;
                }
                let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][qos as usize];
                let policy = [
                    OverflowPolicy::DropOldest,
                    OverflowPolicy::DropNewest,
                    OverflowPolicy::Disconnect,
                    OverflowPolicy::Refuse,
                ][policy as usize];
                let pushed = mailbox.push(delivery(seq, qos, payload), policy);
                pushes += 1;
                accounted += pushed.evicted.len() + usize::from(pushed.rejected.is_some());
                let len = mailbox.len();
                prop_assert!(len <= max_messages);
                prop_assert!(len == 1 || mailbox.bytes() <= max_bytes);
            }
            prop_assert_eq!(guard.queued_bytes(), mailbox.bytes());
            let left = mailbox.drain();
            prop_assert_eq!(pushes, accounted + left.len());
            prop_assert_eq!(guard.queued_bytes(), 0);
        }
    }
}
