//! A bounded in-memory window of idempotency keys and the results they produced.
//!
//! Used by the memory history store and by the node for publications that skip history.
//! Memory is bounded twice: entries expire with their window, and past `capacity` the oldest
//! entries are evicted early (a flood of unique keys cannot grow memory without bound).

use std::collections::{HashMap, VecDeque};

use crate::publication::StreamPosition;

/// Remembers `(channel, key) -> result` until a deadline.
#[derive(Debug)]
pub struct IdempotencyWindow<V = Option<StreamPosition>> {
    entries: HashMap<(String, String), (V, u64)>,
    order: VecDeque<(u64, (String, String))>,
    capacity: usize,
}

impl<V: Clone> IdempotencyWindow<V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// The remembered result for `key` on `channel`, if still inside its window at `now_ms`.
    pub fn get(&mut self, channel: &str, key: &str, now_ms: u64) -> Option<V> {
        self.expire(now_ms);
        self.entries
            .get(&(channel.to_owned(), key.to_owned()))
            .filter(|(_, deadline)| *deadline > now_ms)
            .map(|(value, _)| value.clone())
    }

    /// Remembers `value` for `key` until `deadline_ms`.
    pub fn insert(&mut self, channel: &str, key: &str, value: V, deadline_ms: u64) {
        let id = (channel.to_owned(), key.to_owned());
        while self.entries.len() >= self.capacity {
            match self.order.pop_front() {
                Some((_, old)) => {
                    self.entries.remove(&old);
                }
                None => break,
            }
        }
        self.order.push_back((deadline_ms, id.clone()));
        self.entries.insert(id, (value, deadline_ms));
    }

    fn expire(&mut self, now_ms: u64) {
        while let Some((deadline, _)) = self.order.front() {
            if *deadline > now_ms {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                // Only remove if the entry was not re-inserted with a later deadline.
                if self.entries.get(&id).is_some_and(|(_, d)| *d <= now_ms) {
                    self.entries.remove(&id);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_deadline_and_stays_bounded() {
        let mut window: IdempotencyWindow<u32> = IdempotencyWindow::new(3);
        window.insert("c", "k", 7, 100);
        assert_eq!(window.get("c", "k", 50), Some(7));
        assert_eq!(window.get("other", "k", 50), None);
        assert_eq!(window.get("c", "k", 100), None);
        for i in 0..10 {
            window.insert("c", &format!("k{i}"), i, 1_000);
        }
        assert_eq!(window.len(), 3);
        assert_eq!(window.get("c", "k9", 0), Some(9));
        assert_eq!(window.get("c", "k0", 0), None);
    }
}
