//! Rate limits as token buckets: one bucket (a connection's commands) or buckets per key (an
//! IP's new connections, an API key's or a user's publications), with the keyed state bounded
//! in memory. Pure logic: the caller passes the time, so tests need no clock.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
#[cfg(test)]
use std::time::Duration;
use std::time::Instant;

use parking_lot::Mutex;

/// `rate` tokens per second, holding at most `rate` (the burst).
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(per_second: u32, now: Instant) -> Self {
        let rate = f64::from(per_second);
        Self {
            rate,
            tokens: rate,
            updated: now,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has refilled completely (it then holds no information).
    fn is_full_at(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.rate
    }
}

/// A bucket per key, at most `max_keys` of them. When the map is full, full buckets are
/// dropped; if none is, an unseen key is let through (availability over strictness: nobody can
/// grow the map without bound by inventing keys, and nobody is locked out by it either).
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    per_second: u32,
    max_keys: usize,
    buckets: Mutex<HashMap<K, TokenBucket>>,
}

impl<K: Eq + Hash + Clone> KeyedLimiter<K> {
    /// `per_second` 0 means no limit.
    pub fn new(per_second: u32, max_keys: usize) -> Self {
        Self {
            per_second,
            max_keys,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.per_second == 0
    }

    /// Takes one token from `key`'s bucket. The key is borrowed (`&str` for `String` keys)
    /// and copied only for a new bucket, and nothing is done without a limit.
    pub fn try_take<Q>(&self, key: &Q, now: Instant) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if self.per_second == 0 {
            return true;
        }
        let mut buckets = self.buckets.lock();
        if let Some(bucket) = buckets.get_mut(key) {
            return bucket.try_take(now);
        }
        if buckets.len() >= self.max_keys {
            buckets.retain(|_, bucket| !bucket.is_full_at(now));
            if buckets.len() >= self.max_keys {
                return true;
            }
        }
        buckets
            .entry(key.to_owned())
            .or_insert_with(|| TokenBucket::new(self.per_second, now))
            .try_take(now)
    }

    /// Buckets held now (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.buckets.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(3, start);
        assert!((0..3).all(|_| bucket.try_take(start)));
        assert!(!bucket.try_take(start));
        assert!(bucket.try_take(start + Duration::from_millis(340)));
        assert!(!bucket.try_take(start + Duration::from_millis(340)));
    }

    #[test]
    fn keyed_buckets_are_separate_and_bounded() {
        let limiter = KeyedLimiter::new(1, 2);
        let now = Instant::now();
        assert!(limiter.try_take(&"a", now));
        assert!(!limiter.try_take(&"a", now));
        assert!(limiter.try_take(&"b", now));
        // Full map, no refilled bucket: an unseen key passes untracked.
        assert!(limiter.try_take(&"c", now));
        assert!(limiter.try_take(&"c", now));
        assert_eq!(limiter.tracked(), 2);
        // Later the refilled buckets are dropped to make room.
        let later = now + Duration::from_secs(2);
        assert!(limiter.try_take(&"c", later));
        assert!(!limiter.try_take(&"c", later));
        assert!(KeyedLimiter::new(0, 1).try_take(&"x", now), "0 = unlimited");
    }
}
