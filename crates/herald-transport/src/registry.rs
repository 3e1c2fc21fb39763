//! Who is connected: every real-time connection of a named user, so the server API can
//! disconnect a user's connections (`/api/disconnect`) or unsubscribe them from a channel
//! (`/api/unsubscribe`) on any transport. Anonymous connections are not registered (nothing
//! can address them by user).
//!
//! Owns only the index; a connection registers a [`Control`] handle when it starts and
//! removes it when it ends. Sharded by user so that registration never contends globally.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use parking_lot::Mutex;

use crate::outbound::{CloseReason, Outbound};

const SHARDS: usize = 64;

/// A request to a connection's own loop (it owns its subscriptions).
#[derive(Debug)]
pub enum ControlMessage {
    /// End the subscription to `channel` and tell the client (unsubscribe push, code 2000).
    Unsubscribe { channel: String },
}

/// A connection's mailbox for [`ControlMessage`]s: an empty `Vec` and a waker, so it costs
/// no allocation until a message arrives (a channel would allocate its first block at once,
/// per connection).
#[derive(Debug, Default)]
pub struct Inbox {
    messages: Mutex<Vec<ControlMessage>>,
    ready: AtomicWaker,
}

impl Inbox {
    fn push(&self, message: ControlMessage) {
        self.messages.lock().push(message);
        self.ready.wake();
    }

    /// The next message, if one is waiting; otherwise wakes the task when one arrives.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<ControlMessage> {
        self.ready.register(cx.waker());
        let mut messages = self.messages.lock();
        if messages.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(messages.remove(0))
        }
    }
}

/// What the registry holds per connection.
#[derive(Debug, Clone)]
pub struct Control {
    outbound: Arc<Outbound>,
    /// `None` for transports without server-side unsubscribe (the one-way ones, whose
    /// channel list is fixed for the connection's life).
    inbox: Option<Arc<Inbox>>,
}

impl Control {
    pub fn new(outbound: Arc<Outbound>, inbox: Option<Arc<Inbox>>) -> Self {
        Self { outbound, inbox }
    }
}

type Shard = HashMap<String, HashMap<String, Control>>;

/// Connections by user, then by client id.
pub struct Sessions {
    shards: Vec<Mutex<Shard>>,
    hasher: std::collections::hash_map::RandomState,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").finish_non_exhaustive()
    }
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        }
    }
}

/// Removes its connection from the registry when dropped.
#[derive(Debug)]
pub struct Registration {
    sessions: Arc<Sessions>,
    user: String,
    client: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut shard = self.sessions.shard(&self.user).lock();
        if let Some(clients) = shard.get_mut(&self.user) {
            clients.remove(&self.client);
            if clients.is_empty() {
                shard.remove(&self.user);
            }
        }
    }
}

impl Sessions {
    fn shard(&self, user: &str) -> &Mutex<Shard> {
        // The modulo keeps the index below SHARDS, so the cast cannot truncate a used bit.
        &self.shards[(self.hasher.hash_one(user) % SHARDS as u64) as usize]
    }

    /// Registers a connection of `user` (nothing for anonymous users).
    pub fn register(
        self: &Arc<Self>,
        user: &str,
        client: &str,
        control: Control,
    ) -> Option<Registration> {
        if user.is_empty() {
            return None;
        }
        self.shard(user)
            .lock()
            .entry(user.to_owned())
            .or_default()
            .insert(client.to_owned(), control);
        Some(Registration {
            sessions: self.clone(),
            user: user.to_owned(),
            client: client.to_owned(),
        })
    }

    /// Distinct users with at least one connection.
    pub fn user_count(&self) -> usize {
        self.shards.iter().map(|shard| shard.lock().len()).sum()
    }

    /// The user's connections (one client's, when `client` is given), except those listed.
    fn controls(&self, user: &str, client: Option<&str>, except: &[String]) -> Vec<Control> {
        let shard = self.shard(user).lock();
        let Some(clients) = shard.get(user) else {
            return Vec::new();
        };
        clients
            .iter()
            .filter(|(id, _)| client.is_none_or(|c| c == id.as_str()) && !except.contains(id))
            .map(|(_, control)| control.clone())
            .collect()
    }

    /// Closes the user's connections (but those in `except`) with `reason`; returns how many.
    pub fn disconnect(
        &self,
        user: &str,
        client: Option<&str>,
        except: &[String],
        reason: CloseReason,
    ) -> usize {
        let controls = self.controls(user, client, except);
        for control in &controls {
            control.outbound.close(reason);
        }
        controls.len()
    }

    /// Asks the user's connections to unsubscribe from `channel`; returns how many were
    /// asked (connections that cannot unsubscribe one channel are not counted).
    pub fn unsubscribe(&self, user: &str, client: Option<&str>, channel: &str) -> usize {
        let controls = self.controls(user, client, &[]);
        let inboxes: Vec<_> = controls.iter().filter_map(|c| c.inbox.as_ref()).collect();
        for inbox in &inboxes {
            inbox.push(ControlMessage::Unsubscribe {
                channel: channel.to_owned(),
            });
        }
        inboxes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn registers_disconnects_and_forgets_on_drop() {
        let sessions = Arc::new(Sessions::default());
        let a = Outbound::new(1024);
        let b = Outbound::new(1024);
        let inbox = Arc::new(Inbox::default());
        let first = sessions.register("alice", "c1", Control::new(a.clone(), Some(inbox.clone())));
        let second = sessions.register("alice", "c2", Control::new(b.clone(), None));
        assert!(
            sessions
                .register("", "anon", Control::new(a.clone(), None))
                .is_none()
        );
        assert_eq!(sessions.unsubscribe("alice", None, "news"), 1);
        assert!(matches!(
            std::future::poll_fn(|cx| inbox.poll_next(cx)).await,
            ControlMessage::Unsubscribe { channel } if channel == "news"
        ));
        assert_eq!(
            sessions.disconnect("alice", Some("c2"), &[], CloseReason::FORCE_DISCONNECT),
            1
        );
        assert_eq!(b.closed(), Some(CloseReason::FORCE_DISCONNECT));
        assert_eq!(a.closed(), None);
        assert_eq!(
            sessions.disconnect("alice", None, &["c1".into()], CloseReason::FORCE_DISCONNECT),
            1,
            "c1 is kept (and c2 is asked again)"
        );
        assert_eq!(a.closed(), None);
        drop(first);
        drop(second);
        assert_eq!(
            sessions.disconnect("alice", None, &[], CloseReason::FORCE_DISCONNECT),
            0
        );
        assert!(sessions.shards.iter().all(|s| s.lock().is_empty()));
    }
}
