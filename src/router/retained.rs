//! Retained-message tree: owns the one retained message per topic name [MQTT-3.3.1-5]
//! and answers, when a subscription is made, which of them its topic filter matches
//! [MQTT-3.3.1-6].
//!
//! This is the reverse of the subscription trie: the stored keys are topic names with no
//! wildcards, and the wildcards arrive in the query. One node exists per distinct topic
//! prefix, holding the message retained on exactly that topic, if any.
//!
//! Invariants:
//! - `len` is the number of stored messages.
//! - Every node except the root holds a message or leads to one: `remove` prunes the rest,
//!   so memory follows the retained topics rather than the history behind them.
//! - The root never holds a message, since every topic name has at least one level.
//! - Levels are compared byte for byte, so case and empty levels are significant
//!   [MQTT-4.7.3-4].
//! - Nothing here recurses: a 65 535-byte topic name [MQTT-4.7.3-3] can have 65 536
//!   levels, which one stack frame per level would turn into a stack overflow.
//!
//! Topic names and filters are validated by the caller [MQTT-4.7.1-1] [MQTT-4.7.1-3]; a
//! `#` that is not the last level of a filter is matched as a literal level, which no
//! valid topic name contains.

use std::collections::HashMap;
use std::fmt;

/// The retained message on one topic prefix, and the longer topics under it.
struct Node<V> {
    children: HashMap<Box<str>, Node<V>>,
    value: Option<V>,
}

impl<V> Node<V> {
    fn new() -> Self {
        Self {
            children: HashMap::new(),
            value: None,
        }
    }

    fn descend<'a>(&self, path: impl Iterator<Item = &'a str>) -> Option<&Self> {
        let mut node = self;
        for level in path {
            node = node.children.get(level)?;
        }
        Some(node)
    }

    fn descend_mut<'a>(&mut self, path: impl Iterator<Item = &'a str>) -> Option<&mut Self> {
        let mut node = self;
        for level in path {
            node = node.children.get_mut(level)?;
        }
        Some(node)
    }

    /// The children a wildcard at this node may match: at the root, topics starting with
    /// `$` are out of reach of wildcards [MQTT-4.7.2-1].
    fn wildcard_children(&self, at_root: bool) -> impl Iterator<Item = &Self> {
        self.children
            .iter()
            .filter(move |(level, _)| !(at_root && level.starts_with('$')))
            .map(|(_, child)| child)
    }

    /// Detaches the run of nodes that only led to the now-empty node at the end of `topic`.
    fn prune(&mut self, topic: &str) {
        // The cut goes just below the deepest node on the path that must survive: the
        // root, or any node that holds a message or branches off the path.
        let mut cut = 0;
        let mut node: &Self = self;
        for (depth, level) in topic.split('/').enumerate() {
            if depth == 0 || node.value.is_some() || node.children.len() > 1 {
                cut = depth;
            }
            match node.children.get(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        let mut node = self;
        for (depth, level) in topic.split('/').enumerate() {
            if depth == cut {
                node.children.remove(level);
                return;
            }
            match node.children.get_mut(level) {
                Some(child) => node = child,
                None => return,
            }
        }
    }
}

impl<V> Drop for Node<V> {
    // The generated drop glue recurses once per level, which a deep topic turns into a
    // stack overflow; detaching descendants onto a heap stack keeps every drop shallow.
    fn drop(&mut self) {
        if self.children.is_empty() {
            return;
        }
        let mut pending: Vec<Self> = std::mem::take(&mut self.children).into_values().collect();
        while let Some(mut node) = pending.pop() {
            pending.extend(std::mem::take(&mut node.children).into_values());
        }
    }
}

/// The retained messages of every topic name, indexed for matching topic filters.
pub struct RetainedTree<V> {
    root: Node<V>,
    len: usize,
}

impl<V> RetainedTree<V> {
    pub fn new() -> Self {
        Self {
            root: Node::new(),
            len: 0,
        }
    }

    /// Stores `value` as the retained message of topic name `topic`, returning the one it
    /// replaces: a topic keeps only its latest retained message [MQTT-3.3.1-7].
    pub fn insert(&mut self, topic: &str, value: V) -> Option<V> {
        // Retained topics are mostly republished, so try without allocating the path first.
        let node = match self.root.descend_mut(topic.split('/')) {
            Some(node) => node,
            None => {
                let mut node = &mut self.root;
                for level in topic.split('/') {
                    node = node
                        .children
                        .entry(Box::from(level))
                        .or_insert_with(Node::new);
                }
                node
            }
        };
        let replaced = node.value.replace(value);
        if replaced.is_none() {
            self.len += 1;
        }
        replaced
    }

    /// Removes the retained message of `topic`, pruning nodes left empty; the caller does
    /// this for a retained PUBLISH with an empty payload [MQTT-3.3.1-10].
    pub fn remove(&mut self, topic: &str) -> Option<V> {
        let node = self.root.descend_mut(topic.split('/'))?;
        let removed = node.value.take()?;
        if node.children.is_empty() {
            self.root.prune(topic);
        }
        self.len -= 1;
        Some(removed)
    }

    pub fn get(&self, topic: &str) -> Option<&V> {
        self.root.descend(topic.split('/'))?.value.as_ref()
    }

    /// Calls `visit(value)` once for every retained message whose topic name matches the
    /// topic filter `filter`.
    pub fn for_each_match(&self, filter: &str, mut visit: impl FnMut(&V)) {
        // Wildcard branches wait here rather than on the call stack; a filter with no
        // wildcards never pushes, so it does not allocate.
        let mut pending = Vec::new();
        let mut current = Some((&self.root, filter.split('/'), true));
        while let Some((node, mut levels, at_root)) = current.take().or_else(|| pending.pop()) {
            let from_here = levels.clone();
            match levels.next() {
                None => {
                    if let Some(value) = &node.value {
                        visit(value);
                    }
                }
                Some("#") if levels.clone().next().is_none() => {
                    // `#` matches the parent level too [MQTT-4.7.1-2], and re-applying it
                    // to every child covers any number of further levels.
                    if let Some(value) = &node.value {
                        visit(value);
                    }
                    for child in node.wildcard_children(at_root) {
                        pending.push((child, from_here.clone(), false));
                    }
                }
                // `+` takes exactly one level, empty ones included [MQTT-4.7.1-3].
                Some("+") => {
                    for child in node.wildcard_children(at_root) {
                        pending.push((child, levels.clone(), false));
                    }
                }
                Some(level) => {
                    current = node.children.get(level).map(|child| (child, levels, false));
                }
            }
        }
    }

    /// Calls `visit(value)` once for every retained message.
    pub fn for_each(&self, mut visit: impl FnMut(&V)) {
        let mut pending = vec![&self.root];
        while let Some(node) = pending.pop() {
            if let Some(value) = &node.value {
                visit(value);
            }
            pending.extend(node.children.values());
        }
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<V> Default for RetainedTree<V> {
    fn default() -> Self {
        Self::new()
    }
}

// Printing the nodes would recurse as deep as the deepest topic.
impl<V> fmt::Debug for RetainedTree<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetainedTree")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
impl<V> RetainedTree<V> {
    fn nodes(&self) -> Vec<&Node<V>> {
        let mut nodes = vec![&self.root];
        let mut next = 0;
        while let Some(node) = nodes.get(next).copied() {
            nodes.extend(node.children.values());
            next += 1;
        }
        nodes
    }

    /// Nodes including the root.
    fn node_count(&self) -> usize {
        self.nodes().len()
    }

    /// Non-root nodes that neither hold nor lead to a message; pruning keeps this 0.
    fn dead_nodes(&self) -> usize {
        self.nodes()
            .iter()
            .skip(1)
            .filter(|node| node.value.is_none() && node.children.is_empty())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::topic::examples;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use std::collections::BTreeMap;

    fn matches<V: Clone + Ord>(tree: &RetainedTree<V>, filter: &str) -> Vec<V> {
        let mut found = Vec::new();
        tree.for_each_match(filter, |value| found.push(value.clone()));
        found.sort();
        found
    }

    /// Checks one filter/topic pair against both the tree and the oracle, so the spec
    /// examples pin down the oracle the property tests rely on.
    fn assert_match(filter: &str, topic: &str, expected: bool) {
        let mut tree = RetainedTree::new();
        tree.insert(topic, ());
        assert_eq!(
            !matches(&tree, filter).is_empty(),
            expected,
            "tree: filter {filter:?} topic {topic:?}"
        );
        assert_eq!(
            examples::naive_matches(filter, topic),
            expected,
            "oracle: filter {filter:?} topic {topic:?}"
        );
    }

    #[test]
    fn the_specification_examples_hold() {
        for (filter, topic, expected) in examples::all() {
            assert_match(filter, topic, expected);
        }
    }

    #[test]
    fn a_filter_returns_every_matching_topic_once() {
        let mut tree = RetainedTree::new();
        for (id, topic) in ["a", "a/b", "a/b/c", "a/c", "b", "/a", "$SYS/a", "a/$b"]
            .iter()
            .enumerate()
        {
            tree.insert(topic, id);
        }
        assert_eq!(matches(&tree, "#"), vec![0, 1, 2, 3, 4, 5, 7]);
        assert_eq!(matches(&tree, "a/#"), vec![0, 1, 2, 3, 7]);
        assert_eq!(matches(&tree, "a/+"), vec![1, 3, 7]);
        assert_eq!(matches(&tree, "+"), vec![0, 4]);
        assert_eq!(matches(&tree, "+/a"), vec![5]);
        assert_eq!(matches(&tree, "$SYS/+"), vec![6]);
        assert_eq!(matches(&tree, "a/b"), vec![1]);
        assert_eq!(matches(&tree, "a/b/c/d"), Vec::<usize>::new());
    }

    #[test]
    fn insert_replaces_and_remove_returns_the_value() {
        let mut tree = RetainedTree::new();
        assert!(tree.is_empty());
        assert_eq!(tree.insert("a/b", 0), None);
        assert_eq!(tree.insert("a/b", 1), Some(0));
        assert_eq!(tree.len(), 1);
        assert_eq!(tree.insert("a", 2), None);
        assert_eq!(tree.insert("a/b/c", 3), None);
        assert_eq!(tree.len(), 3);
        assert_eq!(tree.get("a/b"), Some(&1));
        assert_eq!(tree.get("a/b/"), None);
        assert_eq!(tree.get("a/+"), None);

        assert_eq!(tree.remove("a/c"), None);
        assert_eq!(tree.remove("a/b/c/d"), None);
        assert_eq!(tree.remove("a/b"), Some(1));
        assert_eq!(tree.remove("a/b"), None);
        assert_eq!(tree.len(), 2);
        assert_eq!(tree.get("a/b"), None);
        assert_eq!(tree.get("a/b/c"), Some(&3));
        assert_eq!(matches(&tree, "a/#"), vec![2, 3]);

        let mut all = Vec::new();
        tree.for_each(|value| all.push(*value));
        all.sort();
        assert_eq!(all, vec![2, 3]);
    }

    #[test]
    fn removing_prunes_empty_nodes() {
        let topics = ["a/b/c", "a/b", "a", "a//", "/", "x/y/z", "$SYS/q"];
        let mut tree = RetainedTree::new();
        for (id, topic) in topics.iter().enumerate() {
            tree.insert(topic, id);
        }
        for topic in topics {
            assert!(tree.remove(topic).is_some());
            assert_eq!(tree.dead_nodes(), 0);
        }
        assert!(tree.is_empty());
        assert!(tree.root.children.is_empty());
        assert_eq!(tree.node_count(), 1);
    }

    #[test]
    fn churn_does_not_grow_the_tree() {
        let mut tree = RetainedTree::new();
        tree.insert("keep/this", 0u32);
        let baseline = tree.node_count();
        for round in 1..1000u32 {
            let topic = format!("dev/{round}/status");
            tree.insert(&topic, round);
            assert_eq!(tree.remove(&topic), Some(round));
        }
        assert_eq!(tree.node_count(), baseline);
        assert_eq!(tree.len(), 1);
    }

    #[test]
    fn deep_topics_fit_in_a_small_stack() {
        fn exercise() {
            // 65 535 bytes, the longest topic name MQTT can carry [MQTT-4.7.3-3].
            let slashes = "/".repeat(65_535);
            let letters = format!("{}a", "a/".repeat(32_767));
            let pluses = format!("{}+", "+/".repeat(32_767));

            let mut tree = RetainedTree::new();
            tree.insert(&slashes, 1u8);
            tree.insert(&letters, 2);
            assert_eq!(matches(&tree, "#"), vec![1, 2]);
            assert_eq!(matches(&tree, &pluses), vec![2]);
            assert_eq!(matches(&tree, &slashes), vec![1]);
            assert_eq!(tree.get(&letters), Some(&2));
            let mut count = 0;
            tree.for_each(|_| count += 1);
            assert_eq!(count, 2);

            assert_eq!(tree.remove(&letters), Some(2));
            assert_eq!(tree.len(), 1);
            // The rest goes with the tree, which must not recurse either.
        }
        let worker = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(exercise)
            .unwrap();
        worker.join().unwrap();
    }

    fn topic_level() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "$s", ""])
    }

    fn filter_level() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "$s", "", "+"])
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(topic_level(), 1..=4).prop_map(|levels| levels.join("/"))
    }

    /// Valid filters of 1–4 levels: `+` anywhere, `#` only last.
    fn filter() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(filter_level(), 0..=3),
            prop_oneof![3 => filter_level(), 1 => Just("#")],
        )
            .prop_map(|(mut levels, last)| {
                levels.push(last);
                levels.join("/")
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn matching_agrees_with_the_naive_matcher(
            topics in prop::collection::vec(topic(), 0..24),
            picks in prop::collection::vec(any::<Index>(), 0..12),
            misses in prop::collection::vec(topic(), 0..6),
            filters in prop::collection::vec(filter(), 1..8),
        ) {
            let mut tree = RetainedTree::new();
            let mut model = BTreeMap::new();
            for (id, topic) in (0u32..).zip(&topics) {
                prop_assert_eq!(tree.insert(topic, id), model.insert(topic.clone(), id));
            }
            let stored: Vec<String> = model.keys().cloned().collect();
            let removals = picks
                .iter()
                .filter(|_| !stored.is_empty())
                .map(|pick| pick.get(&stored).clone())
                .chain(misses);
            for topic in removals {
                prop_assert_eq!(tree.remove(&topic), model.remove(&topic));
            }
            prop_assert_eq!(tree.len(), model.len());
            prop_assert_eq!(tree.dead_nodes(), 0);
            for topic in &topics {
                prop_assert_eq!(tree.get(topic), model.get(topic));
            }

            for filter in &filters {
                let mut expected: Vec<u32> = model
                    .iter()
                    .filter(|(topic, _)| examples::naive_matches(filter, topic))
                    .map(|(_, id)| *id)
                    .collect();
                expected.sort();
                prop_assert_eq!(matches(&tree, filter), expected, "filter {:?}", filter);
            }

            let mut all = Vec::new();
            tree.for_each(|id| all.push(*id));
            all.sort();
            let mut expected: Vec<u32> = model.values().copied().collect();
            expected.sort();
            prop_assert_eq!(all, expected);

            for topic in model.keys() {
                prop_assert!(tree.remove(topic).is_some());
            }
            prop_assert!(tree.is_empty());
            prop_assert_eq!(tree.node_count(), 1);
        }
    }
}
