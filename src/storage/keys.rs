//! Key layout of every column family (documented in `docs/storage.md`).
//!
//! Per-client keys start with the client id prefixed by its length, so no client's keys are a
//! prefix of another's ("a" and "ab" never interleave) and a whole session is one key range.

/// `u16 length ‖ client id`.
pub fn client_prefix(client_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + client_id.len() + 8);
    key.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    key.extend_from_slice(client_id.as_bytes());
    key
}

/// The smallest key greater than every key that starts with `prefix`, for range deletes.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xFF: no finite successor; the caller's ranges never get here because a client
    // prefix starts with a length below 0xFFFF and store ids are counted up from 1.
    vec![0xFF; prefix.len() + 1]
}

/// `sessions`: the client id itself.
pub fn session(client_id: &str) -> Vec<u8> {
    client_id.as_bytes().to_vec()
}

/// `subscriptions`: client prefix ‖ topic filter.
pub fn subscription(client_id: &str, filter: &str) -> Vec<u8> {
    let mut key = client_prefix(client_id);
    key.extend_from_slice(filter.as_bytes());
    key
}

/// `queue`: the session's store id ‖ sequence number (both big-endian, so one session's
/// records are one range, in order). Store ids are never reused, so a record an ended session
/// left behind can never be read as the next session's.
pub fn queue(store_id: u64, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&store_id.to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The range of every `queue` record of one session, for a range delete.
pub fn queue_range(store_id: u64) -> (Vec<u8>, Vec<u8>) {
    let from = store_id.to_be_bytes().to_vec();
    let to = prefix_end(&from);
    (from, to)
}

/// The store id and sequence number of a `queue` key.
pub fn split_queue(key: &[u8]) -> Option<(u64, u64)> {
    let (store_id, seq) = key.split_at_checked(8)?;
    Some((
        u64::from_be_bytes(store_id.try_into().ok()?),
        u64::from_be_bytes(seq.try_into().ok()?),
    ))
}

/// `inbound`: client prefix ‖ packet id of a QoS 2 PUBLISH awaiting PUBREL.
pub fn inbound(client_id: &str, packet_id: u16) -> Vec<u8> {
    let mut key = client_prefix(client_id);
    key.extend_from_slice(&packet_id.to_be_bytes());
    key
}

/// `messages`: message id (big-endian).
pub fn message(id: u64) -> Vec<u8> {
    id.to_be_bytes().to_vec()
}

/// `delayed`: due time in milliseconds since the Unix epoch ‖ message id (both big-endian, so
/// a scan reads in due order).
pub fn delayed(due_millis: u64, id: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&due_millis.to_be_bytes());
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The due time and id of a `delayed` key.
pub fn split_delayed(key: &[u8]) -> Option<(u64, u64)> {
    let (due, id) = key.split_at_checked(8)?;
    Some((
        u64::from_be_bytes(due.try_into().ok()?),
        u64::from_be_bytes(id.try_into().ok()?),
    ))
}

/// `retained`: the topic name.
pub fn retained(topic: &str) -> Vec<u8> {
    topic.as_bytes().to_vec()
}

/// Splits a per-client key into client id and the rest.
pub fn split_client_key(key: &[u8]) -> Option<(&str, &[u8])> {
    let len = usize::from(u16::from_be_bytes([*key.first()?, *key.get(1)?]));
    let id = std::str::from_utf8(key.get(2..2 + len)?).ok()?;
    Some((id, &key[2 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ranges_do_not_overlap_for_prefix_ids() {
        let a = client_prefix("a");
        let ab_key = inbound("ab", 0);
        assert!(!ab_key.starts_with(&a));
        let end = prefix_end(&a);
        assert!(inbound("a", u16::MAX).as_slice() < end.as_slice());
        assert!(inbound("a", 0) >= a);
        assert!(!(a.as_slice()..end.as_slice()).contains(&ab_key.as_slice()));
    }

    #[test]
    fn queue_keys_sort_by_sequence_within_their_session_range() {
        assert!(queue(3, 1) < queue(3, 2));
        assert!(queue(3, 255) < queue(3, 256));
        let (from, to) = queue_range(3);
        for key in [queue(3, 0), queue(3, u64::MAX)] {
            assert!((from.as_slice()..to.as_slice()).contains(&key.as_slice()));
        }
        for key in [queue(2, u64::MAX), queue(4, 0)] {
            assert!(!(from.as_slice()..to.as_slice()).contains(&key.as_slice()));
        }
        assert_eq!(split_queue(&queue(7, 9)), Some((7, 9)));
        assert_eq!(split_queue(&[0; 15]), None);
    }

    #[test]
    fn client_keys_split_back() {
        let key = subscription("dev-1", "a/+/b");
        assert_eq!(split_client_key(&key), Some(("dev-1", &b"a/+/b"[..])));
        assert_eq!(split_client_key(&[0, 9, b'x']), None);
    }

    #[test]
    fn prefix_end_carries_over_0xff() {
        assert_eq!(prefix_end(&[1, 0xFF]), vec![2]);
        assert_eq!(prefix_end(&[1, 2]), vec![1, 3]);
    }
}
