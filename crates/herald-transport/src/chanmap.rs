//! A map keyed by channel name, sized for the common case of a connection with one or a few
//! channels.
//!
//! Per-connection maps live as long as the connection; a `HashMap`'s first insert allocates
//! room for several entries plus control bytes (≈ 200–450 bytes per map here), which at 20k
//! idle connections is most of the budget. This keeps up to [`SMALL`] entries in a `Vec` grown
//! one slot at a time (linear lookups, with a pointer comparison first because callers usually
//! pass the same `Arc` the key was made from) and switches to a `HashMap` beyond that.
//!
//! May touch: nothing but itself.

use std::collections::HashMap;
use std::sync::Arc;

/// Entries kept in the `Vec` before switching to a `HashMap`.
const SMALL: usize = 16;

/// A map from channel name to `V`.
#[derive(Debug)]
pub enum ChannelMap<V> {
    Small(Vec<(Arc<str>, V)>),
    /// Boxed: the map is 48 bytes inline; boxed, the enum is as small as the `Vec`.
    Large(Box<HashMap<Arc<str>, V>>),
}

impl<V> Default for ChannelMap<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> ChannelMap<V> {
    pub const fn new() -> Self {
        Self::Small(Vec::new())
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Small(entries) => entries.len(),
            Self::Large(map) => map.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn position(entries: &[(Arc<str>, V)], key: &str) -> Option<usize> {
        let pointer = key.as_ptr();
        entries
            .iter()
            .position(|(k, _)| k.as_ptr() == pointer && k.len() == key.len())
            .or_else(|| entries.iter().position(|(k, _)| &**k == key))
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        match self {
            Self::Small(entries) => Self::position(entries, key).map(|i| &entries[i].1),
            Self::Large(map) => map.get(key),
        }
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        match self {
            Self::Small(entries) => Self::position(entries, key).map(|i| &mut entries[i].1),
            Self::Large(map) => map.get_mut(key),
        }
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Inserts or replaces; returns the value it replaced.
    pub fn insert(&mut self, key: Arc<str>, value: V) -> Option<V> {
        match self {
            Self::Small(entries) => {
                if let Some(i) = Self::position(entries, &key) {
                    return Some(std::mem::replace(&mut entries[i].1, value));
                }
                if entries.len() < SMALL {
                    if entries.len() == entries.capacity() {
                        // Grow 1, 2, 4, …: most connections never get past the first slot.
                        entries.reserve_exact(entries.len().max(1));
                    }
                    entries.push((key, value));
                    return None;
                }
                let mut map: HashMap<Arc<str>, V> = std::mem::take(entries).into_iter().collect();
                map.insert(key, value);
                *self = Self::Large(Box::new(map));
                None
            }
            Self::Large(map) => map.insert(key, value),
        }
    }

    /// The value for `key`, inserted with `make` if missing.
    pub fn get_or_insert_with(&mut self, key: &Arc<str>, make: impl FnOnce() -> V) -> &mut V {
        if let Self::Small(entries) = self
            && entries.len() >= SMALL
            && Self::position(entries, key).is_none()
        {
            *self = Self::Large(Box::new(std::mem::take(entries).into_iter().collect()));
        }
        match self {
            Self::Small(entries) => {
                let i = match Self::position(entries, key) {
                    Some(i) => i,
                    None => {
                        if entries.len() == entries.capacity() {
                            entries.reserve_exact(entries.len().max(1));
                        }
                        entries.push((key.clone(), make()));
                        entries.len() - 1
                    }
                };
                &mut entries[i].1
            }
            Self::Large(map) => map.entry(key.clone()).or_insert_with(make),
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        match self {
            Self::Small(entries) => {
                let i = Self::position(entries, key)?;
                let (_, value) = entries.swap_remove(i);
                if entries.is_empty() {
                    // An idle connection that unsubscribed keeps nothing.
                    *entries = Vec::new();
                }
                Some(value)
            }
            Self::Large(map) => map.remove(key),
        }
    }

    /// Removes everything and frees the memory.
    pub fn clear(&mut self) {
        *self = Self::new();
    }

    pub fn iter(&self) -> Iter<'_, V> {
        match self {
            Self::Small(entries) => Iter::Small(entries.iter()),
            Self::Large(map) => Iter::Large(map.iter()),
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &Arc<str>> + '_ {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.iter().map(|(_, v)| v)
    }
}

/// Iterates a [`ChannelMap`] without allocating.
pub enum Iter<'a, V> {
    Small(std::slice::Iter<'a, (Arc<str>, V)>),
    Large(std::collections::hash_map::Iter<'a, Arc<str>, V>),
}

impl<'a, V> Iterator for Iter<'a, V> {
    type Item = (&'a Arc<str>, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Small(entries) => entries.next().map(|(k, v)| (k, v)),
            Self::Large(map) => map.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_map_across_the_switch_to_a_hash_map() {
        let mut map = ChannelMap::new();
        let keys: Vec<Arc<str>> = (0..40).map(|i| Arc::from(format!("c{i}"))).collect();
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(map.insert(key.clone(), i), None);
            assert_eq!(map.len(), i + 1);
        }
        assert!(matches!(map, ChannelMap::Large(_)));
        // Lookups by a different allocation of the same name.
        assert_eq!(map.get("c7"), Some(&7));
        assert_eq!(map.insert(Arc::from("c7"), 70), Some(7));
        *map.get_or_insert_with(&keys[3], || 0) += 1;
        assert_eq!(map.get("c3"), Some(&4));
        assert_eq!(map.remove("c3"), Some(4));
        assert!(!map.contains_key("c3"));
        assert_eq!(map.iter().count(), 39);
        map.clear();
        assert!(map.is_empty());
    }

    #[test]
    fn small_map_grows_one_slot_first_and_frees_when_emptied() {
        let mut map = ChannelMap::new();
        let key: Arc<str> = Arc::from("only");
        *map.get_or_insert_with(&key, || 1u64) += 1;
        let ChannelMap::Small(entries) = &map else {
            panic!("one entry stays small");
        };
        assert_eq!(entries.capacity(), 1);
        assert_eq!(map.get("only"), Some(&2));
        for i in 0..20 {
            map.get_or_insert_with(&Arc::from(format!("k{i}")), || i);
        }
        assert_eq!(map.len(), 21);
        assert_eq!(map.get("k19"), Some(&19));
        assert_eq!(map.values().sum::<u64>(), 2 + (0..20).sum::<u64>());
        let mut small = ChannelMap::new();
        small.insert(key.clone(), 1);
        small.remove(&key);
        let ChannelMap::Small(entries) = &small else {
            panic!("still small");
        };
        assert_eq!(entries.capacity(), 0, "memory given back");
    }
}
