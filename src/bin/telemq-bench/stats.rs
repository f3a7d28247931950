//! Counting: per-publisher sequence tracking (lost / duplicated / out of order) and a
//! fixed-memory latency histogram with percentiles.

use std::collections::BTreeMap;

/// What one publisher's messages looked like at one receiver.
#[derive(Debug, Default, Clone)]
pub struct PubSeq {
    /// One past the highest sequence number seen.
    next: u64,
    /// Gaps below `next` not (yet) filled: start → end (exclusive). Ranges keep the memory small
    /// even when a QoS 0 run drops millions of messages.
    missing: BTreeMap<u64, u64>,
    missing_count: u64,
    pub received: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
}

impl PubSeq {
    pub fn record(&mut self, seq: u64) {
        self.received += 1;
        if seq == self.next {
            self.next += 1;
        } else if seq > self.next {
            self.missing.insert(self.next, seq);
            self.missing_count += seq - self.next;
            self.next = seq + 1;
        } else {
            let hole = self
                .missing
                .range(..=seq)
                .next_back()
                .map(|(&s, &e)| (s, e))
                .filter(|&(_, e)| seq < e);
            match hole {
                Some((start, end)) => {
                    self.out_of_order += 1;
                    self.missing_count -= 1;
                    self.missing.remove(&start);
                    if start < seq {
                        self.missing.insert(start, seq);
                    }
                    if seq + 1 < end {
                        self.missing.insert(seq + 1, end);
                    }
                }
                None => self.duplicated += 1,
            }
        }
    }

    /// Messages never seen, given that the publisher sent sequence numbers `0..sent`.
    pub fn lost(&self, sent: u64) -> u64 {
        self.missing_count + sent.saturating_sub(self.next)
    }

    /// Received sequence numbers at or beyond `sent` (the publisher never sent them).
    pub fn beyond(&self, sent: u64) -> u64 {
        self.next.saturating_sub(sent)
    }
}

/// Sequence tracking for all publishers as seen by one logical receiver.
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    pubs: Vec<PubSeq>,
}

/// Publisher ids above this are rejected as corrupt payloads (they index a vector).
pub const MAX_PUBLISHERS: u32 = 1 << 20;

impl SeqTracker {
    /// Records one message; `false` when the publisher id is implausible.
    pub fn record(&mut self, publisher: u32, seq: u64) -> bool {
        if publisher >= MAX_PUBLISHERS {
            return false;
        }
        let i = publisher as usize;
        if i >= self.pubs.len() {
            self.pubs.resize_with(i + 1, PubSeq::default);
        }
        self.pubs[i].record(seq);
        true
    }

    pub fn publisher(&self, publisher: u32) -> Option<&PubSeq> {
        self.pubs.get(publisher as usize)
    }

    pub fn totals(&self) -> (u64, u64, u64) {
        self.pubs.iter().fold((0, 0, 0), |(r, d, o), p| {
            (r + p.received, d + p.duplicated, o + p.out_of_order)
        })
    }

    /// Lost messages for the given (publisher, sent count) pairs.
    pub fn lost(&self, expected: &[(u32, u64)]) -> u64 {
        expected
            .iter()
            .map(|&(p, sent)| match self.publisher(p) {
                Some(s) => s.lost(sent),
                None => sent,
            })
            .sum()
    }
}

/// Log-linear histogram: values below 128 are exact, larger ones fall into buckets at most
/// 1/64 (≈1.6 %) wide. Fixed memory whatever the number of samples.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

const SUB_BITS: u32 = 7;
const EXACT: u64 = 1 << SUB_BITS; // 128
const HALF: u64 = EXACT / 2; // 64 sub-buckets per power of two above EXACT
const BUCKETS: usize = EXACT as usize + (64 - SUB_BITS as usize) * HALF as usize;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

fn bucket_of(v: u64) -> usize {
    if v < EXACT {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = msb - (SUB_BITS - 1); // v >> shift is in [64, 128)
    EXACT as usize + (msb - SUB_BITS) as usize * HALF as usize + ((v >> shift) - HALF) as usize
}

/// Highest value that falls into bucket `i`.
fn bucket_high(i: usize) -> u64 {
    if (i as u64) < EXACT {
        return i as u64;
    }
    let j = i as u64 - EXACT;
    let msb = (j / HALF) as u32 + SUB_BITS;
    let shift = msb - (SUB_BITS - 1);
    let mantissa = HALF + j % HALF;
    let low = mantissa << shift;
    low.saturating_add((1u64 << shift) - 1)
}

impl Histogram {
    pub fn record(&mut self, v: u64) {
        self.counts[bucket_of(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// Nearest-rank percentile (`p` in 0..=100): the smallest recorded value (to the bucket's
    /// precision, never above the maximum) such that at least p % of the samples are ≤ it.
    pub fn percentile(&self, p: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        // The epsilon keeps e.g. 99.9 % of 1000 at rank 999 despite binary rounding.
        let rank = ((p / 100.0) * self.total as f64 - 1e-9).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_high(i).min(self.max));
            }
        }
        Some(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[u64]) -> PubSeq {
        let mut s = PubSeq::default();
        for &q in seqs {
            s.record(q);
        }
        s
    }

    #[test]
    fn in_order_is_clean() {
        let s = run(&[0, 1, 2, 3, 4]);
        assert_eq!((s.received, s.duplicated, s.out_of_order), (5, 0, 0));
        assert_eq!(s.lost(5), 0);
        // Tail loss: the publisher sent 8, the last three never arrived.
        assert_eq!(s.lost(8), 3);
    }

    #[test]
    fn gaps_are_lost() {
        let s = run(&[0, 1, 5, 6, 10]);
        assert_eq!(s.received, 5);
        assert_eq!(s.lost(11), 3 + 3);
        assert_eq!((s.duplicated, s.out_of_order), (0, 0));
    }

    #[test]
    fn late_arrivals_fill_gaps_and_count_out_of_order() {
        let s = run(&[0, 3, 1, 2, 4]);
        assert_eq!(s.out_of_order, 2);
        assert_eq!(s.duplicated, 0);
        assert_eq!(s.lost(5), 0);
        // Filling the middle of a gap splits it.
        let s = run(&[0, 10, 5, 1, 9]);
        assert_eq!(s.out_of_order, 3);
        assert_eq!(s.lost(11), 9 - 3);
    }

    #[test]
    fn duplicates_are_counted_once_per_copy() {
        let s = run(&[0, 1, 1, 2, 0, 2, 2]);
        assert_eq!(s.received, 7);
        assert_eq!(s.duplicated, 4);
        assert_eq!(s.out_of_order, 0);
        assert_eq!(s.lost(3), 0);
        // A late arrival filling a gap is out of order; its second copy is a duplicate.
        let s = run(&[0, 2, 1, 1]);
        assert_eq!((s.out_of_order, s.duplicated), (1, 1));
        assert_eq!(s.lost(3), 0);
    }

    #[test]
    fn redelivery_after_reconnect_is_duplicated() {
        // A QoS 1 resend of an already delivered window.
        let s = run(&[0, 1, 2, 3, 2, 3, 4]);
        assert_eq!((s.duplicated, s.out_of_order, s.lost(5)), (2, 0, 0));
    }

    #[test]
    fn tracker_separates_publishers() {
        let mut t = SeqTracker::default();
        assert!(t.record(0, 0));
        assert!(t.record(2, 0));
        assert!(t.record(2, 2));
        assert!(t.record(0, 0));
        assert!(!t.record(MAX_PUBLISHERS, 0));
        assert_eq!(t.totals(), (4, 1, 0));
        // Publisher 1 sent 4 and nothing arrived; publisher 2 lost seq 1 and seq 3.
        assert_eq!(t.lost(&[(0, 1), (1, 4), (2, 4)]), 4 + 2);
        assert_eq!(t.publisher(2).map(|p| p.beyond(2)), Some(1));
    }

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in (0..5000u64).chain([1 << 20, (1 << 20) + 12345, u64::MAX / 3, u64::MAX]) {
            let b = bucket_of(v);
            assert!(b < BUCKETS);
            assert!(b >= last || v > 5000, "bucket of {v}");
            last = b;
            let high = bucket_high(b);
            assert!(high >= v, "value {v} above its bucket's high {high}");
            assert!(
                (high - v) as f64 <= (v as f64) / 64.0 + 1.0,
                "bucket too wide at {v}"
            );
        }
    }

    #[test]
    fn percentiles_exact_below_128() {
        let mut h = Histogram::default();
        assert_eq!(h.percentile(50.0), None);
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!(h.count(), 100);
        assert_eq!(h.percentile(50.0), Some(50));
        assert_eq!(h.percentile(90.0), Some(90));
        assert_eq!(h.percentile(99.0), Some(99));
        assert_eq!(h.percentile(99.9), Some(100));
        assert_eq!(h.percentile(100.0), Some(100));
        assert_eq!(h.percentile(0.0), Some(1));
        assert_eq!(h.max(), 100);
    }

    #[test]
    fn percentiles_with_outliers_and_merge() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        for _ in 0..990 {
            a.record(10);
        }
        for _ in 0..9 {
            b.record(1000);
        }
        b.record(50_000);
        a.merge(&b);
        assert_eq!(a.count(), 1000);
        assert_eq!(a.percentile(50.0), Some(10));
        assert_eq!(a.percentile(99.0), Some(10));
        let p999 = a.percentile(99.9).unwrap_or(0);
        assert!((1000..=1016).contains(&p999), "{p999}");
        assert_eq!(a.percentile(100.0), Some(50_000));
        assert_eq!(a.max(), 50_000);
    }
}
