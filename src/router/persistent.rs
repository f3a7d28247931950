//! The filters of the cluster's persistent sessions, on every node: a QoS 1 message whose topic
//! none of them matches has no subscriber that outlives its connection, so its publisher need
//! not wait for the cluster to replicate it (see `publish::Pipeline::is_logged`). Filled by the
//! cluster from its session records.

use std::collections::HashMap;
use std::sync::RwLock;

use super::trie::SubscriptionTrie;
use crate::sync::{read, write};

#[derive(Debug, Default)]
pub struct PersistentFilters {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Each filter once, keyed by itself.
    trie: SubscriptionTrie<String, ()>,
    /// How many sessions hold each filter.
    holders: HashMap<String, usize>,
    /// Each session's filters, to take them out when it changes or ends.
    by_session: HashMap<String, Vec<String>>,
}

impl PersistentFilters {
    /// `session` now holds `filters` (`$share/<group>/` prefixes stripped by the caller), or
    /// none: it ended or is not persistent.
    pub fn set(&self, session: &str, filters: Vec<String>) {
        let mut inner = write(&self.inner);
        let old = if filters.is_empty() {
            inner.by_session.remove(session).unwrap_or_default()
        } else {
            inner
                .by_session
                .insert(session.to_owned(), filters.clone())
                .unwrap_or_default()
        };
        for filter in filters {
            let count = inner.holders.entry(filter.clone()).or_default();
            *count += 1;
            if *count == 1 {
                inner.trie.insert(&filter, filter.clone(), ());
            }
        }
        for filter in old {
            let Some(count) = inner.holders.get_mut(&filter) else {
                continue;
            };
            *count -= 1;
            if *count == 0 {
                inner.holders.remove(&filter);
                inner.trie.remove(&filter, &filter);
            }
        }
    }

    /// Whether some persistent session's filter matches `topic`.
    pub fn matches(&self, topic: &str) -> bool {
        let mut found = false;
        read(&self.inner)
            .trie
            .for_each_match(topic, |_, ()| found = true);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_matches_while_some_session_holds_a_filter_for_it() {
        let filters = PersistentFilters::default();
        assert!(!filters.matches("a/b"));
        filters.set("s1", vec!["a/+".into(), "c".into()]);
        filters.set("s2", vec!["a/+".into()]);
        assert!(filters.matches("a/b") && filters.matches("c"));
        filters.set("s1", vec!["d/#".into()]);
        assert!(filters.matches("a/b"), "s2 still holds a/+");
        assert!(!filters.matches("c") && filters.matches("d/e/f"));
        filters.set("s2", Vec::new());
        assert!(!filters.matches("a/b"));
        filters.set("s1", Vec::new());
        assert!(!filters.matches("d"));
    }
}
