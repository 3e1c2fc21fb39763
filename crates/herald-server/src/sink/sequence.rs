//! Puts a channel's stored publications in offset order before they are queued for sinks.
//!
//! History hands out a channel's offsets in order, but concurrent publishes on one channel
//! can reach the observer in either order; the queue keeps *enqueue* order per order key,
//! so without this a sink could get offset 8 before 7. A publication waits (briefly) for
//! its predecessor when this node has queued the channel before and the predecessor is
//! missing; it goes on after [`MAX_WAIT`] when the predecessor never comes (another node
//! published it, in a cluster).
//!
//! Owns: the last queued offset per channel (memory only; forgotten past [`MAX_CHANNELS`]).
//! May touch: nothing else.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// The longest a publication waits for its predecessor.
pub const MAX_WAIT: Duration = Duration::from_millis(200);
/// Channels remembered before the table is cleared (a cleared channel is not waited on).
const MAX_CHANNELS: usize = 100_000;

#[derive(Debug, Default)]
pub struct ChannelSequence {
    /// Channel → (epoch, highest offset queued).
    last: Mutex<HashMap<String, (String, u64)>>,
    advanced: Notify,
}

/// Held while a publication is queued; dropping it records the offset and lets the next go.
#[derive(Debug)]
pub struct Turn<'a> {
    sequence: &'a ChannelSequence,
    channel: String,
    epoch: String,
    offset: u64,
    /// No publication of this channel and epoch was queued through this table before.
    pub first: bool,
}

impl ChannelSequence {
    /// Waits until `offset`'s predecessor on `channel` has been queued here (or
    /// [`MAX_WAIT`] passed, or it is unknown), then returns the turn to queue it.
    pub async fn turn(&self, channel: &str, epoch: &str, offset: u64) -> Turn<'_> {
        let deadline = tokio::time::Instant::now() + MAX_WAIT;
        let mut first;
        loop {
            let notified = self.advanced.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let waiting = match self.last.lock().get(channel) {
                Some((known, last)) => {
                    first = known != epoch;
                    !first && last.saturating_add(1) < offset
                }
                None => {
                    first = true;
                    false
                }
            };
            if !waiting || tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        Turn {
            sequence: self,
            channel: channel.to_string(),
            epoch: epoch.to_string(),
            offset,
            first,
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut last = self.sequence.last.lock();
        if last.len() >= MAX_CHANNELS && !last.contains_key(&self.channel) {
            last.clear();
        }
        let entry = last
            .entry(std::mem::take(&mut self.channel))
            .or_insert_with(|| (self.epoch.clone(), self.offset));
        if entry.0 != self.epoch {
            *entry = (std::mem::take(&mut self.epoch), self.offset);
        } else if entry.1 < self.offset {
            entry.1 = self.offset;
        }
        drop(last);
        self.sequence.advanced.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_successor_waits_for_its_predecessor() {
        let sequence = Arc::new(ChannelSequence::default());
        assert!(sequence.turn("c", "e", 1).await.first);
        assert!(sequence.turn("d", "e", 1).await.first);
        assert!(!sequence.turn("d", "e", 2).await.first);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let early = {
            let (sequence, tx) = (sequence.clone(), tx.clone());
            tokio::spawn(async move {
                let turn = sequence.turn("c", "e", 3).await;
                let _ = tx.send(3);
                drop(turn);
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let turn = sequence.turn("c", "e", 2).await;
        let _ = tx.send(2);
        assert!(!turn.first);
        drop(turn);
        early.await.expect("joins");
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
    }

    #[tokio::test]
    async fn a_missing_predecessor_is_waited_for_at_most_max_wait() {
        let sequence = ChannelSequence::default();
        drop(sequence.turn("c", "e", 1).await);
        let started = tokio::time::Instant::now();
        drop(sequence.turn("c", "e", 5).await);
        let waited = started.elapsed();
        assert!(waited >= MAX_WAIT && waited < MAX_WAIT * 5, "{waited:?}");
        // Unknown channels and new epochs do not wait.
        let started = tokio::time::Instant::now();
        drop(sequence.turn("other", "e", 9).await);
        drop(sequence.turn("c", "e2", 9).await);
        assert!(started.elapsed() < MAX_WAIT, "{:?}", started.elapsed());
    }
}
