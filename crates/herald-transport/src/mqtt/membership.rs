//! Shared subscriptions across the nodes of a cluster: which nodes have members of which
//! group, and which node delivers a publication.
//!
//! Each node keeps one document in the collection [`COLLECTION`] of the document store beside
//! the outbound queue (the cluster's Redis), id = the node's uid: the groups
//! (`$share/<group>/<filter>`) it has local members of, and when the document stops counting
//! (`expires_at_ms`, [`TTL`] after it was written). Every node rewrites its document and reads
//! every node's every [`REFRESH`] (and at once when it gains or loses a group), and keeps a
//! *view*: per group, the sorted uids of the nodes whose unexpired documents name it.
//!
//! A publication matching a group's filter reaches every node with members (each holds the
//! filter's prefix, see `herald_core::Node::want_prefix`); each computes the same hash of
//! (group, channel, offset) over its view's nodes of the group and delivers only if the
//! choice is itself — then to one of its local members, taking turns. While every node has
//! the same view, each publication goes to exactly one member cluster-wide.
//!
//! May touch: the document store it is given.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use herald_core::publication::PublicationEvent;
use herald_core::webhook_store::WebhookStore;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

/// The collection of the nodes' group documents.
pub const COLLECTION: &str = "mqtt_shared_groups";

/// How often a node rewrites its document and reads the others'.
pub const REFRESH: Duration = Duration::from_secs(1);

/// How long a document counts after it was written: a node killed without a word stops
/// being chosen (by the other nodes) within `TTL + REFRESH`.
pub const TTL: Duration = Duration::from_secs(3);

/// One node's document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct NodeGroups {
    expires_at_ms: u64,
    groups: BTreeSet<String>,
}

/// This node's side of the cluster's shared subscriptions.
pub struct Membership {
    store: Arc<dyn WebhookStore>,
    uid: Arc<str>,
    /// Per group, the nodes with members, sorted (from the last read).
    view: RwLock<HashMap<String, Vec<Arc<str>>>>,
    /// One refresh at a time, so an older write never lands after a newer one.
    writing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("uid", &self.uid)
            .finish_non_exhaustive()
    }
}

impl Membership {
    pub fn new(store: Arc<dyn WebhookStore>) -> Self {
        Self {
            store,
            uid: Arc::from(herald_core::publication::new_epoch().as_str()),
            view: RwLock::new(HashMap::new()),
            writing: tokio::sync::Mutex::new(()),
        }
    }

    /// Writes this node's groups (deletes its document when there are none) and reads every
    /// node's into the view.
    pub async fn refresh(&self, groups: BTreeSet<String>) -> Result<(), String> {
        let _writing = self.writing.lock().await;
        let now = herald_core::time::now_ms();
        if groups.is_empty() {
            self.store
                .delete_document(COLLECTION, &self.uid)
                .await
                .map_err(|e| e.to_string())?;
        } else {
            let document = NodeGroups {
                expires_at_ms: now + TTL.as_millis() as u64,
                groups,
            };
            let bytes = serde_json::to_vec(&document).map_err(|e| e.to_string())?;
            self.store
                .put_document(COLLECTION, &self.uid, Bytes::from(bytes))
                .await
                .map_err(|e| e.to_string())?;
        }
        let documents = self
            .store
            .documents(COLLECTION)
            .await
            .map_err(|e| e.to_string())?;
        *self.view.write() = view_of(&documents, now);
        Ok(())
    }

    /// Deletes this node's document (shutdown): the others stop choosing it at their next read.
    pub async fn leave_all(&self) {
        if let Err(error) = self.refresh(BTreeSet::new()).await {
            tracing::warn!(%error, "mqtt: could not remove this node's shared subscription groups");
        }
    }

    /// Whether this node delivers `publication` to its members of `group`.
    pub fn delivers_here(&self, group: &str, publication: &PublicationEvent) -> bool {
        let view = self.view.read();
        let Some(nodes) = view.get(group) else {
            return false;
        };
        let chosen = choose(group, publication, nodes.len());
        nodes.get(chosen).is_some_and(|uid| *uid == self.uid)
    }
}

/// Per group, the sorted uids of the nodes whose documents are unexpired at `now`.
fn view_of(documents: &BTreeMap<String, Bytes>, now: u64) -> HashMap<String, Vec<Arc<str>>> {
    let mut view: HashMap<String, Vec<Arc<str>>> = HashMap::new();
    // BTreeMap: node uids come in order, so each group's list is sorted.
    for (uid, bytes) in documents {
        let Ok(document) = serde_json::from_slice::<NodeGroups>(bytes) else {
            tracing::warn!(node = %uid, "mqtt: unreadable shared subscription document skipped");
            continue;
        };
        if document.expires_at_ms <= now {
            continue;
        }
        let uid: Arc<str> = Arc::from(uid.as_str());
        for group in document.groups {
            view.entry(group).or_default().push(uid.clone());
        }
    }
    view
}

/// The index of the node that delivers `publication` to `group`, among `count`: FNV-1a of
/// the group, the channel and the offset (and the time, for publications without an
/// offset), so every node computes the same.
fn choose(group: &str, publication: &PublicationEvent, count: usize) -> usize {
    if count <= 1 {
        return 0;
    }
    let offset = publication.publication.offset;
    let extra = if offset == 0 {
        publication.publication.time_ms
    } else {
        0
    };
    let hash = [
        group.as_bytes(),
        &[0],
        publication.channel.as_bytes(),
        &[0],
        &offset.to_le_bytes(),
        &extra.to_le_bytes(),
    ]
    .iter()
    .flat_map(|part| part.iter())
    .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % count as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::publication::{Payload, Publication};

    fn publication(offset: u64) -> PublicationEvent {
        PublicationEvent::new(
            Arc::from("mqtt:jobs/1"),
            Arc::from("ep"),
            Publication {
                offset,
                time_ms: 5,
                data: Payload::Json(Bytes::from_static(b"{}")),
                tags: Default::default(),
                info: None,
            },
        )
    }

    #[test]
    fn the_view_keeps_unexpired_nodes_sorted_and_the_choice_spreads() {
        let doc = |expires_at_ms: u64, groups: &[&str]| {
            let document = NodeGroups {
                expires_at_ms,
                groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            };
            Bytes::from(serde_json::to_vec(&document).expect("json"))
        };
        let mut documents = BTreeMap::new();
        documents.insert("b".to_owned(), doc(100, &["$share/g/jobs/+"]));
        documents.insert("a".to_owned(), doc(100, &["$share/g/jobs/+", "$share/h/#"]));
        documents.insert("c".to_owned(), doc(10, &["$share/g/jobs/+"]));
        documents.insert("d".to_owned(), Bytes::from_static(b"not json"));
        let view = view_of(&documents, 50);
        let nodes: Vec<&str> = view["$share/g/jobs/+"].iter().map(|u| &**u).collect();
        assert_eq!(nodes, ["a", "b"], "sorted, the expired one left out");
        assert_eq!(view["$share/h/#"].len(), 1);
        let mut counts = [0; 3];
        for offset in 1..=300 {
            let chosen = choose("$share/g/jobs/+", &publication(offset), 3);
            assert_eq!(chosen, choose("$share/g/jobs/+", &publication(offset), 3));
            counts[chosen] += 1;
        }
        assert!(counts.iter().all(|c| *c > 60), "{counts:?}");
        assert_eq!(choose("g", &publication(7), 1), 0);
    }
}
