//! MQTT 5 shared subscriptions (`$share/<group>/<filter>`): every member of a group
//! subscribes to the filter, and each publication is delivered to one of them, taking turns.
//!
//! A group is one pattern subscriber of the hub ([`Group`]), made by its first member and
//! removed with its last. A publication goes to the next member whose queue is open and
//! takes it; one that no member can take (all gone or closed) is not delivered to the group.
//! Pattern subscriptions see only the channels of their own node, so shared subscriptions
//! are refused in a cluster (like wildcards).
//!
//! May touch: the node's pattern subscriptions, the members' outbound queues.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use herald_core::Node;
use herald_core::hub::{Delivery, PatternSubscriber, Subscriber, SubscriberId};
use herald_core::publication::ChannelEvent;
use parking_lot::{Mutex, RwLock};

use super::delivery::MqttEncoder;
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

struct Member {
    connection: u64,
    outbound: Arc<Outbound>,
    encoder: Arc<MqttEncoder>,
}

/// One group's subscription: its members, taking turns.
pub struct Group {
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

/// Every group of the node, with its hub subscription.
#[derive(Default)]
pub struct SharedGroups {
    groups: Mutex<HashMap<SharedFilter, (Arc<Group>, SubscriberId)>>,
}

impl SharedGroups {
    /// Adds connection `connection` to the group of `shared` (subscribing the group at its
    /// first member); again for a member already in it changes nothing.
    pub fn join(
        &self,
        node: &Node,
        topics: &TopicMap,
        shared: &SharedFilter,
        connection: u64,
        outbound: &Arc<Outbound>,
        encoder: &Arc<MqttEncoder>,
    ) -> Result<(), String> {
        let mut groups = self.groups.lock();
        let group = match groups.get(shared) {
            Some((group, _)) => group.clone(),
            None => {
                let group = Arc::new(Group {
                    filter: shared.filter.clone(),
                    topics: topics.clone(),
                    members: RwLock::new(Vec::new()),
                    next: AtomicUsize::new(0),
                });
                if !node.hub().sees_every_channel() {
                    return Err("shared subscriptions need a single-node engine".into());
                }
                let id = node.subscribe_pattern(group.clone());
                groups.insert(shared.clone(), (group.clone(), id));
                group
            }
        };
        let mut members = group.members.write();
        if !members.iter().any(|m| m.connection == connection) {
            members.push(Member {
                connection,
                outbound: outbound.clone(),
                encoder: encoder.clone(),
            });
        }
        Ok(())
    }

    /// Removes connection `connection` from the group of `shared` (unsubscribing the group
    /// with its last member); false if it was not a member.
    pub fn leave(&self, node: &Node, shared: &SharedFilter, connection: u64) -> bool {
        let mut groups = self.groups.lock();
        let Some((group, id)) = groups.get(shared) else {
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
