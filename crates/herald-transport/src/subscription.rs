//! The one subscribe-with-recovery step every transport takes after admission: hold the
//! channel's live events, subscribe in the hub, read what the client missed (or the stream's
//! top), refuse or report an unrecoverable position, and announce the join (and, in
//! [`end_subscription`], the way back). The transport
//! then queues its own reply with the recovered publications and calls
//! [`Outbound::finish_recovery`], which lets the held live events follow in order.
//!
//! May touch: the node (subscribe, recover, history, join, unsubscribe) and the connection's
//! outbound queue.

use std::sync::Arc;

use herald_core::admission::Admitted;
use herald_core::channel::ChannelName;
use herald_core::events::ClientEventKind;
use herald_core::hub::SubscriberId;
use herald_core::namespace::NamespaceOptions;
use herald_core::publication::{ClientInfo, StreamPosition};
use herald_core::store::HistoryQuery;
use herald_core::{ErrorCode, HeraldError, Node, Publication};

use crate::outbound::{ChannelSink, EventEncoder, Outbound};

/// How a subscription starts.
#[derive(Clone, Debug, Default)]
pub struct StartFrom {
    /// The position the client saw last; `None` starts at the top.
    pub since: Option<StreamPosition>,
    /// Most publications recovered; more missed means "not recovered".
    pub max_recovery: usize,
    /// Most bytes of publication data recovered; more means "not recovered". What is
    /// recovered goes through the connection's queue, and a recovery the queue cannot hold
    /// would close the connection as slow on every reconnect.
    pub max_recovery_bytes: usize,
    /// An unrecoverable `since` is refused with error 112 instead of `recovered: false`.
    pub reject_unrecovered: bool,
}

/// A subscription in place, live events held until the transport calls
/// [`Outbound::finish_recovery`] with [`Subscribed::last_offset`].
#[derive(Debug)]
pub struct Subscribed {
    pub id: SubscriberId,
    /// The stream's top when history was read; `None` when the namespace keeps no history.
    pub position: Option<StreamPosition>,
    /// Exactly what was missed since `since`, oldest first (empty unless recovered).
    pub publications: Vec<Publication>,
    /// Whether `since` was recovered; `None` when there was nothing to recover from.
    pub recovered: Option<bool>,
}

impl Subscribed {
    /// The offset the held live events continue after.
    pub fn last_offset(&self) -> u64 {
        self.position.as_ref().map_or(0, |p| p.offset)
    }
}

/// Subscribes `admitted` for a connection whose queue is `outbound`, recovers per `start`,
/// and joins presence as `info` (when the client has an identity there). On error nothing is
/// left behind: the hub subscription and the held events are dropped.
pub async fn subscribe_with_recovery(
    node: &Node,
    outbound: &Arc<Outbound>,
    admitted: &Admitted,
    encoder: Arc<dyn EventEncoder>,
    start: &StartFrom,
    info: Option<Arc<ClientInfo>>,
) -> Result<Subscribed, HeraldError> {
    let name = &admitted.name;
    let channel = name.as_arc().clone();
    outbound.begin_recovery(&channel);
    let sink = Arc::new(ChannelSink {
        channel: channel.clone(),
        outbound: outbound.clone(),
        encoder,
        conflate: admitted.options.conflate,
    });
    let id = match node.subscribe(name, sink).await {
        Ok(id) => id,
        Err(error) => {
            outbound.forget(&channel);
            return Err(error);
        }
    };
    let subscribed = match read_start(node, admitted, id, start).await {
        Ok(subscribed) => subscribed,
        Err(error) => {
            node.unsubscribe(name.as_str(), id).await;
            outbound.forget(&channel);
            return Err(error);
        }
    };
    if let Some(info) = info {
        node.client_event(ClientEventKind::Subscribed, Some(name.as_arc()), &info, "");
        node.join(name, &admitted.options, info).await;
    }
    Ok(subscribed)
}

/// Ends a subscription [`subscribe_with_recovery`] made: leaves the hub and presence and
/// announces `client.unsubscribed` (every transport ends its subscriptions here).
pub async fn end_subscription(
    node: &Node,
    name: &ChannelName,
    options: &NamespaceOptions,
    id: SubscriberId,
    info: Option<Arc<ClientInfo>>,
) {
    node.unsubscribe(name.as_str(), id).await;
    if let Some(info) = info {
        node.client_event(
            ClientEventKind::Unsubscribed,
            Some(name.as_arc()),
            &info,
            "",
        );
        node.leave(name, options, info).await;
    }
}

async fn read_start(
    node: &Node,
    admitted: &Admitted,
    id: SubscriberId,
    start: &StartFrom,
) -> Result<Subscribed, HeraldError> {
    let name = admitted.name.as_str();
    if !admitted.options.history_enabled() {
        return Ok(Subscribed {
            id,
            position: None,
            publications: Vec::new(),
            recovered: None,
        });
    }
    match &start.since {
        Some(since) => {
            let mut recovery = node.recover(name, since, start.max_recovery).await?;
            let bytes: usize = recovery
                .publications
                .iter()
                .map(|p| p.data.bytes().len())
                .sum();
            if bytes > start.max_recovery_bytes {
                recovery.recovered = false;
                recovery.publications = Vec::new();
            }
            if !recovery.recovered && start.reject_unrecovered {
                return Err(HeraldError::new(ErrorCode::UnrecoverablePosition, ""));
            }
            Ok(Subscribed {
                id,
                position: Some(recovery.position),
                publications: recovery.publications,
                recovered: Some(recovery.recovered),
            })
        }
        None => {
            let query = HistoryQuery {
                limit: Some(0),
                ..HistoryQuery::default()
            };
            let top = node.history(name, query).await?.position;
            Ok(Subscribed {
                id,
                position: Some(top),
                publications: Vec::new(),
                recovered: None,
            })
        }
    }
}
