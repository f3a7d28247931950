//! A map for the many places that hold one or a few entries per client: a subscription trie
//! node's subscribers, a session's subscriptions.
//!
//! With tens of thousands of idle clients, an empty-or-tiny `HashMap` per client is most of the
//! broker's memory: 48 bytes inline, and its first insert allocates room for three entries
//! plus control bytes (180 bytes for a 40-byte entry). Up to [`FEW`] entries live in a vector
//! grown one slot at a time and searched linearly, which for so few keys is as fast as hashing;
//! past that the map moves to a `HashMap` so a filter with ten thousand subscribers stays O(1).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;

/// Entries kept in the vector before the map becomes a `HashMap`.
const FEW: usize = 8;

/// Once a `HashMap`, the map returns to a vector only below this, so a count that hovers
/// around [`FEW`] does not convert on every insert and remove.
const FEW_AGAIN: usize = FEW / 2;

#[derive(Clone)]
pub enum SmallMap<K, V> {
    Few(Vec<(K, V)>),
    Many(Box<HashMap<K, V>>),
}

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Eq + Hash, V> SmallMap<K, V> {
    /// Inserts or replaces `key`'s value; returns the replaced value.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self {
            Self::Few(entries) => {
                if let Some((_, old)) = entries.iter_mut().find(|(k, _)| *k == key) {
                    return Some(std::mem::replace(old, value));
                }
                if entries.len() < FEW {
                    // One slot at a time: `push` would allocate four for the first entry.
                    entries.reserve_exact(1);
                    entries.push((key, value));
                } else {
                    let mut map: HashMap<K, V> = std::mem::take(entries).into_iter().collect();
                    map.insert(key, value);
                    *self = Self::Many(Box::new(map));
                }
                None
            }
            Self::Many(map) => map.insert(key, value),
        }
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self {
            Self::Few(entries) => {
                let index = entries.iter().position(|(k, _)| k.borrow() == key)?;
                let (_, value) = entries.swap_remove(index);
                if entries.is_empty() {
                    // An emptied map holds nothing, like a new one.
                    *entries = Vec::new();
                }
                Some(value)
            }
            Self::Many(map) => {
                let value = map.remove(key)?;
                if map.len() < FEW_AGAIN {
                    let mut entries = Vec::with_capacity(map.len());
                    entries.extend(map.drain());
                    *self = Self::Few(entries);
                }
                Some(value)
            }
        }
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self {
            Self::Few(entries) => entries
                .iter()
                .find(|(k, _)| k.borrow() == key)
                .map(|(_, v)| v),
            Self::Many(map) => map.get(key),
        }
    }

    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self {
            Self::Few(entries) => entries
                .iter_mut()
                .find(|(k, _)| k.borrow() == key)
                .map(|(_, v)| v),
            Self::Many(map) => map.get_mut(key),
        }
    }

    /// The value under `key`, inserted as `make()` under `make_key()` if absent. The owned
    /// key is made only when it is stored.
    pub fn get_or_insert_with<Q>(
        &mut self,
        key: &Q,
        make_key: impl FnOnce() -> K,
        make: impl FnOnce() -> V,
    ) -> &mut V
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Self::Few(entries) = self {
            if entries.len() >= FEW && !entries.iter().any(|(k, _)| k.borrow() == key) {
                let map: HashMap<K, V> = std::mem::take(entries).into_iter().collect();
                *self = Self::Many(Box::new(map));
            }
        }
        match self {
            Self::Few(entries) => {
                let index = match entries.iter().position(|(k, _)| k.borrow() == key) {
                    Some(index) => index,
                    None => {
                        entries.reserve_exact(1);
                        entries.push((make_key(), make()));
                        entries.len() - 1
                    }
                };
                &mut entries[index].1
            }
            Self::Many(map) => map.entry(make_key()).or_insert_with(make),
        }
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }
}

impl<K, V> SmallMap<K, V> {
    pub const fn new() -> Self {
        Self::Few(Vec::new())
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Few(entries) => entries.len(),
            Self::Many(map) => map.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> Iter<'_, K, V> {
        match self {
            Self::Few(entries) => Iter::Few(entries.iter()),
            Self::Many(map) => Iter::Many(map.iter()),
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }
}

pub enum Iter<'a, K, V> {
    Few(std::slice::Iter<'a, (K, V)>),
    Many(std::collections::hash_map::Iter<'a, K, V>),
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Few(entries) => entries.next().map(|(k, v)| (k, v)),
            Self::Many(map) => map.next(),
        }
    }
}

impl<'a, K, V> IntoIterator for &'a SmallMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

pub enum IntoIter<K, V> {
    Few(std::vec::IntoIter<(K, V)>),
    Many(std::collections::hash_map::IntoIter<K, V>),
}

impl<K, V> Iterator for IntoIter<K, V> {
    type Item = (K, V);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Few(entries) => entries.next(),
            Self::Many(map) => map.next(),
        }
    }
}

impl<K, V> IntoIterator for SmallMap<K, V> {
    type Item = (K, V);
    type IntoIter = IntoIter<K, V>;

    fn into_iter(self) -> Self::IntoIter {
        match self {
            Self::Few(entries) => IntoIter::Few(entries.into_iter()),
            Self::Many(map) => IntoIter::Many(map.into_iter()),
        }
    }
}

impl<K: Eq + Hash, V> FromIterator<(K, V)> for SmallMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut map = Self::new();
        for (key, value) in iter {
            map.insert(key, value);
        }
        map
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for SmallMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8, u16),
        Remove(u8),
        GetOrInsert(u8, u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Keys from a small range, so maps cross `FEW` both ways and keys repeat.
        prop_oneof![
            (0u8..24, any::<u16>()).prop_map(|(k, v)| Op::Insert(k, v)),
            (0u8..24).prop_map(Op::Remove),
            (0u8..24, any::<u16>()).prop_map(|(k, v)| Op::GetOrInsert(k, v)),
        ]
    }

    proptest! {
        /// Behaves as a `HashMap` through any sequence of operations.
        #[test]
        fn matches_a_hash_map(ops in proptest::collection::vec(op(), 0..200)) {
            let mut small = SmallMap::new();
            let mut model = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(small.insert(k, v), model.insert(k, v)),
                    Op::Remove(k) => prop_assert_eq!(small.remove(&k), model.remove(&k)),
                    Op::GetOrInsert(k, v) => prop_assert_eq!(
                        *small.get_or_insert_with(&k, || k, || v),
                        *model.entry(k).or_insert(v)
                    ),
                }
                prop_assert_eq!(small.len(), model.len());
                for k in 0u8..24 {
                    prop_assert_eq!(small.get(&k), model.get(&k));
                }
                let mut listed: Vec<_> = small.iter().map(|(k, v)| (*k, *v)).collect();
                listed.sort();
                let mut expected: Vec<_> = model.iter().map(|(k, v)| (*k, *v)).collect();
                expected.sort();
                prop_assert_eq!(listed, expected);
            }
        }
    }

    #[test]
    fn few_entries_take_one_slot_each_and_many_become_a_hash_map() {
        let mut map = SmallMap::new();
        map.insert("a".to_string(), 1);
        let SmallMap::Few(entries) = &map else {
            panic!("one entry is a vector");
        };
        assert_eq!(entries.capacity(), 1);
        for i in 0..FEW {
            map.insert(i.to_string(), i);
        }
        assert!(matches!(map, SmallMap::Many(_)));
        assert_eq!(map.get("a"), Some(&1));
        for i in 0..FEW {
            map.remove(i.to_string().as_str());
        }
        assert!(matches!(map, SmallMap::Few(_)));
        assert_eq!(map.remove("a"), Some(1));
        assert!(map.is_empty());
    }

    #[test]
    fn is_as_small_as_a_vector() {
        assert_eq!(
            std::mem::size_of::<SmallMap<String, u64>>(),
            std::mem::size_of::<Vec<(String, u64)>>()
        );
    }
}
