//! Pieces both emulators use to be scripted and observed: a bounded record list (memory stays
//! flat under load however long a benchmark runs) and a queue of injected failures.
//!
//! Owns: nothing shared; each emulator keeps its own instances. May touch: nothing.

use std::collections::VecDeque;

/// The last `capacity` items, plus how many were ever pushed.
#[derive(Debug)]
pub struct Ring<T> {
    capacity: usize,
    items: VecDeque<T>,
}

impl<T: Clone> Ring<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            items: VecDeque::new(),
        }
    }

    pub fn push(&mut self, item: T) {
        if self.capacity == 0 {
            return;
        }
        if self.items.len() == self.capacity {
            self.items.pop_front();
        }
        self.items.push_back(item);
    }

    pub fn to_vec(&self) -> Vec<T> {
        self.items.iter().cloned().collect()
    }

    pub fn clear(&mut self) {
        self.items.clear();
    }

    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        while self.items.len() > capacity {
            self.items.pop_front();
        }
    }
}

/// A failure to answer `remaining` more times, for one target or (no target) any.
#[derive(Clone, Debug)]
pub struct Injected<F> {
    pub target: Option<String>,
    pub remaining: u32,
    pub failure: F,
}

/// Takes one use of the first injected failure that applies to `target`, dropping used-up
/// entries. Entries for this very target win over catch-all ones.
pub fn take<F: Clone>(queue: &mut Vec<Injected<F>>, target: &str) -> Option<F> {
    let index = queue
        .iter()
        .position(|i| i.target.as_deref() == Some(target))
        .or_else(|| queue.iter().position(|i| i.target.is_none()))?;
    let entry = &mut queue[index];
    let failure = entry.failure.clone();
    entry.remaining = entry.remaining.saturating_sub(1);
    if entry.remaining == 0 {
        queue.remove(index);
    }
    Some(failure)
}
