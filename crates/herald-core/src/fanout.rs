//! The ordered queue between "stored" and "delivered".
//!
//! History backends hand every stored publication to a [`FanoutFeed`] (it is their
//! [`CommitListener`]); publications that skip history enter the same queue. One task drains
//! the queue into the broker, so each channel's events reach subscribers in the order they
//! were stored, and never before they were stored.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::publication::{ChannelEvent, PublicationEvent};
use crate::store::CommitListener;

/// What the queue carries: events, and markers that tell whoever waits on them that
/// everything queued before has been handed on.
#[derive(Debug)]
pub(crate) enum Queued {
    Event(ChannelEvent),
    Drained(oneshot::Sender<()>),
}

/// The sending side: cheap to clone, never blocks.
#[derive(Clone, Debug)]
pub struct FanoutFeed {
    tx: mpsc::UnboundedSender<Queued>,
}

/// The receiving side, drained by the node's fan-out task.
#[derive(Debug)]
pub struct FanoutQueue {
    pub(crate) rx: mpsc::UnboundedReceiver<Queued>,
}

/// A connected feed and queue.
pub fn channel() -> (FanoutFeed, FanoutQueue) {
    let (tx, rx) = mpsc::unbounded_channel();
    (FanoutFeed { tx }, FanoutQueue { rx })
}

impl FanoutFeed {
    /// Queues an event; silently dropped only if the node has shut down.
    pub fn push(&self, event: ChannelEvent) {
        let _ = self.tx.send(Queued::Event(event));
    }

    /// Resolves once every event queued before the call has been handed to the broker (at
    /// once if the fan-out task is gone).
    pub async fn drained(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Queued::Drained(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

impl FanoutQueue {
    /// The next queued event, for whoever drains the queue other than the node (tests,
    /// conformance suites); drain markers are answered on the way.
    pub async fn next_event(&mut self) -> Option<ChannelEvent> {
        loop {
            match self.rx.recv().await? {
                Queued::Event(event) => return Some(event),
                Queued::Drained(done) => {
                    let _ = done.send(());
                }
            }
        }
    }
}

impl CommitListener for FanoutFeed {
    fn committed(&self, event: Arc<PublicationEvent>) {
        self.push(ChannelEvent::Publication(event));
    }
}
