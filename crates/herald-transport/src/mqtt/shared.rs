//! MQTT 5 shared subscriptions (`$share/<group>/<filter>`): every member of a group
//! subscribes to the filter, and each publication is delivered to one of them, taking turns.
//!
//! A group is one pattern subscriber of the hub ([`Group`]), made by its first member and
//! removed with its last. A publication goes to the next member whose queue is open and
//! takes it; one that no member can take (all gone or closed) is not delivered to the group.
//! In a cluster a group of this node holds its filter's prefix (so the channels of every
//! node reach it) and takes only the publications [`Membership`] says are this node's; the
//! nodes with members are known through the document store ([`super::membership`]).
//!
//! May touch: the node's pattern subscriptions and prefixes, the members' outbound queues,
//! the membership.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use herald_core::Node;
use herald_core::hub::{Delivery, PatternSubscriber, PrefixHold, Subscriber, SubscriberId};
use herald_core::publication::ChannelEvent;
use parking_lot::{Mutex, RwLock};

use super::delivery::MqttEncoder;
use super::membership::Membership;
use super::topic::{Filter, TopicMap};
use crate::outbound::Outbound;

/// A shared subscription's name as it is subscribed: `$share/<group>/<filter>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SharedFilter {
    pub group: String,
    pub filter: Filter,
}

impl SharedFilter {
    /// Reads `$share/<group>/<filter>`; `None` for another filter, `Err` for a malformed one.
    pub fn parse(text: &str) -> Option<Result<Self, String>> {
        let rest = text.strip_prefix("$share/")?;
        let Some((group, filter)) = rest.split_once('/') else {
            return Some(Err(
                "a shared subscription is $share/<group>/<filter>".into()
            ));
        };
        if group.is_empty() || group.contains(['+', '#']) {
            return Some(Err("a share name is not empty and has no wildcards".into()));
        }
        Some(
            Filter::parse(filter)
                .map(|filter| Self {
                    group: group.to_owned(),
                    filter,
                })
                .map_err(|e| e.0),
        )
    }

    /// The text it was subscribed with.
    pub fn text(&self) -> String {
        format!("$share/{}/{}", self.group, self.filter.as_str())
    }
}

/// A connection in a group.
pub struct Member {
    pub connection: u64,
    pub outbound: Arc<Outbound>,
    pub encoder: Arc<MqttEncoder>,
}

/// One group's subscription: its members, taking turns.
pub struct Group {
    /// `$share/<group>/<filter>`.
    key: String,
    /// In a cluster: which publications are this node's.
    membership: Option<Arc<Membership>>,
    filter: Filter,
    topics: TopicMap,
    members: RwLock<Vec<Member>>,
    next: AtomicUsize,
}

impl Subscriber for Group {
    fn deliver(&self, event: &ChannelEvent) -> Delivery {
        let ChannelEvent::Publication(publication) = event else {
            return Delivery::Queued;
        };
        if let Some(membership) = &self.membership
            && !membership.delivers_here(&self.key, publication)
        {
            return Delivery::Queued;
        }
        let members = self.members.read();
        let count = members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..count {
            let member = &members[(start + i) % count];
            if member.outbound.closed().is_some() {
                continue;
            }
            if let Some(frame) = member.encoder.frame(publication)
                && member.outbound.push(frame)
            {
                return Delivery::Queued;
            }
        }
        Delivery::Queued
    }
}

impl PatternSubscriber for Group {
    fn matches(&self, channel: &str) -> bool {
        self.topics
            .topic(channel)
            .is_some_and(|topic| self.filter.matches(topic))
    }
}

/// One group's hub subscription, and (in a cluster) the prefix it holds.
type Subscribed = (Arc<Group>, SubscriberId, Option<PrefixHold>);

/// Every group of the node, with its hub subscription.
#[derive(Default)]
pub struct SharedGroups {
    groups: Mutex<HashMap<SharedFilter, Subscribed>>,
    /// Set in a cluster.
    membership: Option<Arc<Membership>>,
}

impl SharedGroups {
    /// Groups of a node in a cluster, whose members are known to the others through
    /// `membership`.
    pub fn clustered(membership: Membership) -> Self {
        Self {
            groups: Mutex::new(HashMap::new()),
            membership: Some(Arc::new(membership)),
        }
    }

    pub fn membership(&self) -> Option<&Arc<Membership>> {
        self.membership.as_ref()
    }

    /// The groups this node has members of.
    pub fn keys(&self) -> std::collections::BTreeSet<String> {
        self.groups.lock().keys().map(SharedFilter::text).collect()
    }

    /// Adds connection `connection` to the group of `shared` (subscribing the group at its
    /// first member); again for a member already in it changes nothing. In a cluster it
    /// returns once the filter's channels reach this node and the other nodes can read
    /// that this node has members.
    pub async fn join(
        &self,
        node: &Node,
        topics: &TopicMap,
        shared: &SharedFilter,
        member: Member,
    ) -> Result<(), String> {
        let hold = if self.membership.is_some() {
            let prefix = topics.channel_prefix(&shared.filter);
            Some(node.want_prefix(&prefix).await.map_err(|e| e.to_string())?)
        } else if node.hub().sees_every_channel() {
            None
        } else {
            return Err("shared subscriptions in a cluster need the document store".into());
        };
        let connection = member.connection;
        self.add_member(node, topics, shared, hold, member);
        if let Some(membership) = &self.membership
            && let Err(error) = membership.refresh(self.keys()).await
        {
            self.leave(node, shared, connection);
            return Err(format!("the group membership could not be saved: {error}"));
        }
        Ok(())
    }

    fn add_member(
        &self,
        node: &Node,
        topics: &TopicMap,
        shared: &SharedFilter,
        hold: Option<PrefixHold>,
        member: Member,
    ) {
        let mut groups = self.groups.lock();
        let group = match groups.get(shared) {
            Some((group, _, _)) => group.clone(),
            None => {
                let group = Arc::new(Group {
                    key: shared.text(),
                    membership: self.membership.clone(),
                    filter: shared.filter.clone(),
                    topics: topics.clone(),
                    members: RwLock::new(Vec::new()),
                    next: AtomicUsize::new(0),
                });
                let id = node.subscribe_pattern(group.clone());
                groups.insert(shared.clone(), (group.clone(), id, hold));
                group
            }
        };
        let mut members = group.members.write();
        if !members.iter().any(|m| m.connection == member.connection) {
            members.push(member);
        }
    }

    /// Removes connection `connection` from the group of `shared` (unsubscribing the group
    /// with its last member); false if it was not a member.
    pub fn leave(&self, node: &Node, shared: &SharedFilter, connection: u64) -> bool {
        let mut groups = self.groups.lock();
        let Some((group, id, _)) = groups.get(shared) else {
            return false;
        };
        let mut members = group.members.write();
        let before = members.len();
        members.retain(|m| m.connection != connection);
        let left = members.len() != before;
        if members.is_empty() {
            let id = *id;
            drop(members);
            groups.remove(shared);
            node.unsubscribe_pattern(id);
            if let Some(membership) = self.membership.clone() {
                // The others stop choosing this node for the group at their next read.
                let keys: std::collections::BTreeSet<String> =
                    groups.keys().map(SharedFilter::text).collect();
                tokio::spawn(async move {
                    if let Err(error) = membership.refresh(keys).await {
                        tracing::warn!(%error, "mqtt: could not update the shared subscription groups");
                    }
                });
            }
        }
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_names_are_read_from_the_filter() {
        let shared = SharedFilter::parse("$share/workers/jobs/+").and_then(Result::ok);
        assert_eq!(
            shared.map(|s| (s.group, s.filter.as_str().to_owned())),
            Some(("workers".into(), "jobs/+".into()))
        );
        assert!(SharedFilter::parse("jobs/+").is_none(), "not shared");
        for bad in [
            "$share/",
            "$share/g",
            "$share//t",
            "$share/a+/t",
            "$share/g/a/#/b",
        ] {
            assert!(
                matches!(SharedFilter::parse(bad), Some(Err(_))),
                "{bad} is refused"
            );
        }
        assert_eq!(
            SharedFilter::parse("$share/g/a/b")
                .and_then(Result::ok)
                .map(|s| s.text()),
            Some("$share/g/a/b".into())
        );
    }
}
