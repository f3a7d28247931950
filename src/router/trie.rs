//! Subscription trie: owns every `(topic filter, subscriber key) -> value` subscription
//! and answers, for each PUBLISH, which subscriptions match its topic name.
//!
//! One node exists per distinct filter prefix. Exact levels are keyed by their text, `+`
//! has a slot of its own, and a trailing `#` is not a node at all: its subscribers live
//! in the node of the level before it, because `#` also matches that parent level
//! [MQTT-4.7.1-2].
//!
//! Invariants:
//! - `len` is the number of stored `(filter, key)` pairs.
//! - Every node except the root holds a subscriber or leads to one: `remove` prunes the
//!   rest, so memory follows the live subscriptions rather than the churn behind them.
//! - Levels are compared byte for byte, so case and empty levels are significant
//!   [MQTT-4.7.3-4].
//! - No operation recurses more than `MAX_RECURSION` deep, and dropping the trie does
//!   not recurse at all. A 65 535-byte filter of slashes [MQTT-4.7.3-3] has 65 536
//!   levels, which one frame per level would turn into a stack overflow on a task stack.
//!
//! Filters and topic names are validated by the caller [MQTT-4.7.1-1] [MQTT-4.7.1-3]; a
//! `#` that is not the last level is kept as a literal level, which no valid topic name
//! can match.

use std::fmt;
use std::hash::Hash;
use std::iter::Flatten;
use std::option;
use std::str::Split;

use crate::small_map::SmallMap;

/// How many nested `+` branches matching follows on the call stack before it moves the
/// remaining branches to a heap stack. Real filters never get near it, so ordinary
/// matching does not allocate.
const MAX_RECURSION: usize = 64;

/// The levels of a filter that are edges of the trie.
type Edges<'a> = Flatten<option::IntoIter<Split<'a, char>>>;

/// Splits `filter` into its trie edges and whether it ends in `#`, which is stored in the
/// node of the last edge instead of a node of its own.
fn edges(filter: &str) -> (Edges<'_>, bool) {
    let (path, multi_level) = if filter == "#" {
        (None, true)
    } else if let Some(parent) = filter.strip_suffix("/#") {
        (Some(parent), true)
    } else {
        (Some(filter), false)
    };
    (
        path.map(|p| p.split('/')).into_iter().flatten(),
        multi_level,
    )
}

/// Subscriptions to the filters that share one prefix.
///
/// Small maps throughout: most nodes of a telemetry trie are leaves of one device's topic with
/// one subscriber, and a node is 80 bytes this way against 152 with `HashMap`s.
struct Node<K, V> {
    children: SmallMap<Box<str>, Node<K, V>>,
    plus: Option<Box<Node<K, V>>>,
    /// Subscriptions whose filter ends at this node.
    subscribers: SmallMap<K, V>,
    /// Subscriptions whose filter is this node's prefix followed by `/#`.
    multi_level: SmallMap<K, V>,
}

impl<K, V> Node<K, V> {
    fn new() -> Self {
        Self {
            children: SmallMap::new(),
            plus: None,
            subscribers: SmallMap::new(),
            multi_level: SmallMap::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.subscribers.is_empty()
            && self.multi_level.is_empty()
            && self.children.is_empty()
            && self.plus.is_none()
    }

    /// Whether this node would be empty without its one child, so pruning that child's
    /// subtree may take this node along.
    fn is_bare_link(&self) -> bool {
        self.subscribers.is_empty()
            && self.multi_level.is_empty()
            && self.children.len() + usize::from(self.plus.is_some()) == 1
    }

    fn slot_mut(&mut self, multi_level: bool) -> &mut SmallMap<K, V> {
        if multi_level {
            &mut self.multi_level
        } else {
            &mut self.subscribers
        }
    }

    fn child(&self, level: &str) -> Option<&Self> {
        if level == "+" {
            self.plus.as_deref()
        } else {
            self.children.get(level)
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Self> {
        if level == "+" {
            self.plus.as_deref_mut()
        } else {
            self.children.get_mut(level)
        }
    }

    fn child_or_insert(&mut self, level: &str) -> &mut Self {
        if level == "+" {
            self.plus.get_or_insert_with(|| Box::new(Self::new()))
        } else {
            self.children
                .get_or_insert_with(level, || Box::from(level), Self::new)
        }
    }

    fn remove_child(&mut self, level: &str) {
        if level == "+" {
            self.plus = None;
        } else {
            self.children.remove(level);
        }
    }

    /// Follows `path` from this node without creating anything.
    fn descend_mut<'a>(&mut self, path: impl Iterator<Item = &'a str>) -> Option<&mut Self> {
        let mut node = self;
        for level in path {
            node = node.child_mut(level)?;
        }
        Some(node)
    }

    /// Detaches the run of nodes that only led to the now-empty node at the end of `path`.
    fn prune<'a>(&mut self, path: impl Iterator<Item = &'a str> + Clone) {
        // The cut goes just below the deepest node on the path that must survive: the
        // root, or any node that holds subscribers or branches off the path.
        let mut cut = 0;
        let mut node: &Self = self;
        for (depth, level) in path.clone().enumerate() {
            if depth == 0 || !node.is_bare_link() {
                cut = depth;
            }
            match node.child(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        let mut node = self;
        for (depth, level) in path.enumerate() {
            if depth == cut {
                node.remove_child(level);
                return;
            }
            match node.child_mut(level) {
                Some(child) => node = child,
                None => return,
            }
        }
    }

    fn take_children(&mut self) -> impl Iterator<Item = Self> {
        std::mem::take(&mut self.children)
            .into_iter()
            .map(|(_, child)| child)
            .chain(self.plus.take().map(|plus| *plus))
    }
}

impl<K, V> Drop for Node<K, V> {
    // The generated drop glue recurses once per level, which a deep filter turns into a
    // stack overflow; detaching descendants onto a heap stack keeps every drop shallow.
    fn drop(&mut self) {
        if self.children.is_empty() && self.plus.is_none() {
            return;
        }
        let mut pending: Vec<Self> = self.take_children().collect();
        while let Some(mut node) = pending.pop() {
            pending.extend(node.take_children());
        }
    }
}

/// Walks exact levels in a loop and hands every `+` branch to `branch`, which decides
/// whether the branch costs a stack frame or a heap slot.
fn descend<'n, 't, K, V, F>(
    mut node: &'n Node<K, V>,
    mut levels: Split<'t, char>,
    visit: &mut F,
    mut branch: impl FnMut(&'n Node<K, V>, Split<'t, char>, &mut F),
) where
    F: FnMut(&K, &V),
{
    loop {
        // `#` matches the parent level as well as any number of children, so these match
        // whether or not topic levels remain [MQTT-4.7.1-2].
        for (key, value) in &node.multi_level {
            visit(key, value);
        }
        let Some(level) = levels.next() else {
            for (key, value) in &node.subscribers {
                visit(key, value);
            }
            return;
        };
        // `+` takes exactly one level, empty ones included [MQTT-4.7.1-3].
        if let Some(plus) = node.plus.as_deref() {
            branch(plus, levels.clone(), visit);
        }
        match node.children.get(level) {
            Some(child) => node = child,
            None => return,
        }
    }
}

fn walk<K, V, F>(node: &Node<K, V>, levels: Split<'_, char>, budget: usize, visit: &mut F)
where
    F: FnMut(&K, &V),
{
    descend(node, levels, visit, |plus, rest, visit| {
        match budget.checked_sub(1) {
            Some(budget) => walk(plus, rest, budget, visit),
            None => walk_on_heap(plus, rest, visit),
        }
    });
}

fn walk_on_heap<K, V, F>(node: &Node<K, V>, levels: Split<'_, char>, visit: &mut F)
where
    F: FnMut(&K, &V),
{
    let mut pending = vec![(node, levels)];
    while let Some((node, levels)) = pending.pop() {
        descend(node, levels, visit, |plus, rest, _| {
            pending.push((plus, rest))
        });
    }
}

/// Every subscription of every client, indexed for matching topic names.
pub struct SubscriptionTrie<K, V> {
    root: Node<K, V>,
    len: usize,
}

impl<K: Eq + Hash + Clone, V> SubscriptionTrie<K, V> {
    pub fn new() -> Self {
        Self {
            root: Node::new(),
            len: 0,
        }
    }

    /// Inserts or replaces `key`'s subscription on `filter`; returns the replaced value.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let (path, multi_level) = edges(filter);
        // Popular filters already exist, so try without allocating the path first.
        let node = match self.root.descend_mut(path.clone()) {
            Some(node) => node,
            None => {
                let mut node = &mut self.root;
                for level in path {
                    node = node.child_or_insert(level);
                }
                node
            }
        };
        // An identical filter from the same client replaces its subscription [MQTT-3.8.4-3].
        let replaced = node.slot_mut(multi_level).insert(key, value);
        if replaced.is_none() {
            self.len += 1;
        }
        replaced
    }

    /// Removes `key`'s subscription on `filter`, pruning nodes left empty.
    pub fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        let (path, multi_level) = edges(filter);
        let node = self.root.descend_mut(path.clone())?;
        let removed = node.slot_mut(multi_level).remove(key)?;
        if node.is_empty() {
            self.root.prune(path);
        }
        self.len -= 1;
        Some(removed)
    }

    /// The subscription value of `key` on `filter`.
    pub fn get(&self, filter: &str, key: &K) -> Option<&V> {
        let (path, multi_level) = edges(filter);
        let mut node = &self.root;
        for level in path {
            node = node.child(level)?;
        }
        if multi_level {
            node.multi_level.get(key)
        } else {
            node.subscribers.get(key)
        }
    }

    /// Mutable access to an existing subscription value.
    pub fn get_mut(&mut self, filter: &str, key: &K) -> Option<&mut V> {
        let (path, multi_level) = edges(filter);
        self.root
            .descend_mut(path)?
            .slot_mut(multi_level)
            .get_mut(key)
    }

    /// Calls `visit(key, value)` once for every subscription whose filter matches the
    /// topic name `topic`; a key subscribed through several matching filters is visited
    /// once per filter.
    pub fn for_each_match(&self, topic: &str, mut visit: impl FnMut(&K, &V)) {
        self.for_each_match_within(topic, MAX_RECURSION, &mut visit);
    }

    fn for_each_match_within<F>(&self, topic: &str, budget: usize, visit: &mut F)
    where
        F: FnMut(&K, &V),
    {
        let mut levels = topic.split('/');
        if !topic.starts_with('$') {
            walk(&self.root, levels, budget, visit);
            return;
        }
        // A filter starting with a wildcard never matches a topic name starting with `$`
        // [MQTT-4.7.2-1], so only the root's exact children may lead to a match.
        if let Some(child) = levels
            .next()
            .and_then(|first| self.root.children.get(first))
        {
            walk(child, levels, budget, visit);
        }
    }

    /// Number of `(filter, key)` subscriptions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<K: Eq + Hash + Clone, V> Default for SubscriptionTrie<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

// Printing the nodes would recurse as deep as the deepest filter.
impl<K, V> fmt::Debug for SubscriptionTrie<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionTrie")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
impl<K, V> SubscriptionTrie<K, V> {
    fn nodes(&self) -> Vec<&Node<K, V>> {
        let mut nodes = vec![&self.root];
        let mut next = 0;
        while let Some(node) = nodes.get(next).copied() {
            nodes.extend(node.children.values());
            nodes.extend(node.plus.as_deref());
            next += 1;
        }
        nodes
    }

    /// Nodes including the root.
    fn node_count(&self) -> usize {
        self.nodes().len()
    }

    /// Non-root nodes that neither hold nor lead to a subscription; pruning keeps this 0.
    fn dead_nodes(&self) -> usize {
        self.nodes()
            .iter()
            .skip(1)
            .filter(|node| node.is_empty())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::topic::{examples, filter_matches};
    use crate::protocol::validate::is_valid_filter;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use std::collections::BTreeMap;

    fn matches<K: Eq + Hash + Clone + Ord, V: Clone + Ord>(
        trie: &SubscriptionTrie<K, V>,
        topic: &str,
    ) -> Vec<(K, V)> {
        let mut found = Vec::new();
        trie.for_each_match(topic, |key, value| found.push((key.clone(), value.clone())));
        found.sort();
        found
    }

    /// Checks one filter/topic pair against both the trie and the oracle, so the spec
    /// examples pin down the oracle the property tests rely on.
    fn assert_match(filter: &str, topic: &str, expected: bool) {
        let mut trie = SubscriptionTrie::new();
        trie.insert(filter, 1u8, ());
        assert_eq!(
            !matches(&trie, topic).is_empty(),
            expected,
            "trie: filter {filter:?} topic {topic:?}"
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
    fn insert_replaces_and_remove_returns_the_value() {
        let mut trie = SubscriptionTrie::new();
        assert!(trie.is_empty());
        assert_eq!(trie.insert("a/b", "c1", 0), None);
        assert_eq!(trie.insert("a/b", "c1", 1), Some(0));
        assert_eq!(trie.len(), 1);
        assert_eq!(trie.insert("a/b", "c2", 2), None);
        assert_eq!(trie.insert("a/+", "c1", 3), None);
        assert_eq!(trie.insert("a/#", "c1", 4), None);
        assert_eq!(trie.insert("a", "c1", 5), None);
        assert_eq!(trie.len(), 5);
        assert_eq!(
            matches(&trie, "a/b"),
            vec![("c1", 1), ("c1", 3), ("c1", 4), ("c2", 2)]
        );
        assert_eq!(matches(&trie, "a"), vec![("c1", 4), ("c1", 5)]);

        assert_eq!(trie.remove("a/b", &"c3"), None);
        assert_eq!(trie.remove("a/c", &"c1"), None);
        assert_eq!(trie.remove("a/#", &"c2"), None);
        assert_eq!(trie.len(), 5);
        assert_eq!(trie.remove("a/#", &"c1"), Some(4));
        assert_eq!(trie.remove("a/#", &"c1"), None);
        assert_eq!(trie.len(), 4);
        assert_eq!(matches(&trie, "a"), vec![("c1", 5)]);
        assert_eq!(matches(&trie, "a/b"), vec![("c1", 1), ("c1", 3), ("c2", 2)]);
    }

    #[test]
    fn get_mut_reaches_only_existing_subscriptions() {
        let mut trie = SubscriptionTrie::new();
        trie.insert("a/+/#", 7u8, 1);
        trie.insert("#", 7u8, 10);
        if let Some(value) = trie.get_mut("a/+/#", &7) {
            *value = 2;
        }
        assert_eq!(trie.get_mut("a/+/#", &7).copied(), Some(2));
        assert_eq!(trie.get_mut("#", &7).copied(), Some(10));
        assert_eq!(trie.get_mut("a/+", &7), None);
        assert_eq!(trie.get_mut("a/+/#", &8), None);
        assert_eq!(trie.get_mut("a/b/#", &7), None);
        assert_eq!(matches(&trie, "a/x"), vec![(7, 2), (7, 10)]);
        assert_eq!(trie.len(), 2);
    }

    #[test]
    fn removing_prunes_empty_nodes() {
        let filters = [
            "a/b/c", "a/b", "a/+/c", "a/#", "#", "+", "/", "a//", "x/y/z/#",
        ];
        let mut trie = SubscriptionTrie::new();
        for (id, filter) in filters.iter().enumerate() {
            trie.insert(filter, 1u8, id);
            trie.insert(filter, 2u8, id);
        }
        assert_eq!(trie.len(), 2 * filters.len());
        for filter in filters {
            assert!(trie.remove(filter, &1).is_some());
            assert_eq!(trie.dead_nodes(), 0);
        }
        // A prefix filter leaves the longer filters below it in place.
        assert!(trie.remove("a/b", &2).is_some());
        assert_eq!(
            matches(&trie, "a/b/c"),
            vec![(2, 0), (2, 2), (2, 3), (2, 4)]
        );
        for filter in filters {
            trie.remove(filter, &2);
            assert_eq!(trie.dead_nodes(), 0);
        }
        assert!(trie.is_empty());
        assert!(trie.root.is_empty());
        assert_eq!(trie.node_count(), 1);
    }

    #[test]
    fn churn_does_not_grow_the_trie() {
        let mut trie = SubscriptionTrie::new();
        trie.insert("keep/this", 0u32, ());
        let baseline = trie.node_count();
        for round in 0..1000u32 {
            let filter = format!("dev/{round}/+/#");
            trie.insert(&filter, round, ());
            assert_eq!(trie.remove(&filter, &round), Some(()));
        }
        assert_eq!(trie.node_count(), baseline);
        assert_eq!(trie.len(), 1);
    }

    #[test]
    fn deep_filters_fit_in_a_small_stack() {
        fn exercise() {
            // 65 535 bytes, the longest filter MQTT can carry [MQTT-4.7.3-3].
            let slashes = "/".repeat(65_535);
            let pluses = format!("{}+", "+/".repeat(32_767));
            let letters = format!("{}a", "a/".repeat(32_767));
            let under_hash = format!("{}#", "/".repeat(65_533));

            let mut trie = SubscriptionTrie::new();
            trie.insert(&slashes, 1u8, 1u8);
            trie.insert(&under_hash, 1, 2);
            trie.insert(&pluses, 1, 3);
            // Sharing every level with the `+` chain makes matching branch at each one.
            trie.insert(&letters, 1, 4);
            assert_eq!(matches(&trie, &slashes), vec![(1, 1), (1, 2)]);
            assert_eq!(matches(&trie, &letters), vec![(1, 3), (1, 4)]);
            assert_eq!(trie.get_mut(&pluses, &1).copied(), Some(3));

            assert_eq!(trie.remove(&slashes, &1), Some(1));
            assert_eq!(trie.remove(&pluses, &1), Some(3));
            assert_eq!(trie.len(), 2);
            assert_eq!(matches(&trie, &letters), vec![(1, 4)]);
            // The rest goes with the trie, which must not recurse either.
        }
        let worker = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(exercise)
            .unwrap();
        worker.join().unwrap();
    }

    fn filter_level() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "$s", "", "+"])
    }

    fn topic_level() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "$s", ""])
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

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(topic_level(), 1..=4).prop_map(|levels| levels.join("/"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn single_filter_matching_agrees_with_the_naive_matcher(
            unrelated in filter(),
            topic in topic(),
            edits in prop::collection::vec(0u8..5, 0..6),
        ) {
            // A filter made from the topic itself, so that matches are as common as misses.
            let mut derived: Vec<&str> = Vec::new();
            let mut levels = topic.split('/');
            for edit in &edits {
                match (edit, levels.next()) {
                    (0, Some(level)) => derived.push(level),
                    (1, Some(_)) => derived.push("+"),
                    (2, _) => {
                        derived.push("#");
                        break;
                    }
                    (3, _) => derived.push("x"),
                    _ => {}
                }
            }
            let derived = derived.join("/");
            for filter in [unrelated.as_str(), derived.as_str()] {
                if is_valid_filter(filter) {
                    prop_assert_eq!(filter_matches(filter, &topic), examples::naive_matches(filter, &topic));
                }
            }
        }

        #[test]
        fn matching_agrees_with_the_naive_matcher(
            subscriptions in prop::collection::vec((filter(), 0u8..3), 0..24),
            picks in prop::collection::vec(any::<Index>(), 0..12),
            misses in prop::collection::vec((filter(), 0u8..3), 0..6),
            topics in prop::collection::vec(topic(), 1..8),
        ) {
            let mut trie = SubscriptionTrie::new();
            let mut model = BTreeMap::new();
            for (id, (filter, key)) in (0u32..).zip(&subscriptions) {
                prop_assert_eq!(
                    trie.insert(filter, *key, id),
                    model.insert((filter.clone(), *key), id)
                );
            }
            let stored: Vec<(String, u8)> = model.keys().cloned().collect();
            let removals = picks
                .iter()
                .filter(|_| !stored.is_empty())
                .map(|pick| pick.get(&stored).clone())
                .chain(misses);
            for (filter, key) in removals {
                prop_assert_eq!(trie.remove(&filter, &key), model.remove(&(filter, key)));
            }
            prop_assert_eq!(trie.len(), model.len());
            prop_assert_eq!(trie.dead_nodes(), 0);

            for topic in &topics {
                let mut expected: Vec<(u8, u32)> = model
                    .iter()
                    .filter(|((filter, _), _)| examples::naive_matches(filter, topic))
                    .map(|((_, key), id)| (*key, *id))
                    .collect();
                expected.sort();
                // 0 and 1 push `+` branches onto the heap stack almost at once.
                for budget in [0, 1, MAX_RECURSION] {
                    let mut found = Vec::new();
                    trie.for_each_match_within(topic, budget, &mut |key: &u8, id: &u32| {
                        found.push((*key, *id))
                    });
                    found.sort();
                    prop_assert_eq!(&found, &expected, "topic {:?} budget {}", topic, budget);
                }
            }

            for ((filter, key), id) in &model {
                prop_assert_eq!(trie.get_mut(filter, key).copied(), Some(*id));
            }
            for (filter, key) in model.keys() {
                prop_assert!(trie.remove(filter, key).is_some());
            }
            prop_assert!(trie.is_empty());
            prop_assert_eq!(trie.node_count(), 1);
        }
    }
}
