//! This node's place in a cluster (`storage.engine = "redis"`), and the commands that act on
//! every node.
//!
//! Owns: [`ControlCommand`] — what the server API's `disconnect`, `unsubscribe`,
//! `revoke_token` and `invalidate_user_tokens` do, applied by [`apply`] on this node and,
//! in a cluster, sent to every other node through the engine's control channel; and
//! [`Cluster`]: the node registry heartbeat (every node writes what it holds; `info` lists
//! every live node) and the task that applies other nodes' commands here.
//!
//! May touch: the Redis engine and registry (through `herald-store`), the application state
//! it acts on (connections by user, token revocations).

use std::collections::BTreeMap;
use std::sync::Arc;
#[cfg(feature = "redis")]
use std::sync::atomic::Ordering;

use herald_core::error::HeraldError;
use herald_transport::outbound::CloseReason;
use serde::{Deserialize, Serialize};

#[cfg(feature = "redis")]
use herald_store::redis::{NodeRecord, NodeRegistry, RedisEngine};

use crate::app::AppState;

/// A server API command that acts on every node's connections or token checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlCommand {
    /// Close the user's connections (one, or all but `whitelist`) with `code` and `reason`
    /// (empty: the code range's).
    Disconnect {
        user: String,
        client: Option<String>,
        whitelist: Vec<String>,
        code: u16,
        // Absent in messages from nodes that predate it.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// End the user's subscriptions to `channel`.
    Unsubscribe {
        user: String,
        client: Option<String>,
        channel: String,
    },
    /// Refuse the token with this `jti` until `until` (Unix seconds).
    RevokeToken { uid: String, until: u64 },
    /// Refuse the user's tokens issued before `before`, until `until` (Unix seconds).
    InvalidateUser {
        user: String,
        before: u64,
        until: u64,
    },
    /// A query, not an action: every node records its channels matching `pattern` (with
    /// subscriber counts) as its answer to `request`.
    Channels {
        request: String,
        pattern: Option<String>,
    },
}

/// What travels on the control channel: the command and the node that sent it (which applied
/// it already).
#[derive(Debug, Serialize, Deserialize)]
struct ControlMessage {
    from: String,
    command: ControlCommand,
}

/// Longest reason a server API `disconnect` may give: what a WebSocket close frame holds.
pub const MAX_DISCONNECT_REASON: usize = 123;

/// Most distinct custom disconnect reasons a process keeps (see [`custom_reason`]).
const MAX_CUSTOM_REASONS: usize = 1024;

/// The close reason of a server API disconnect: its code (`None`: force disconnect) and the
/// reason given (empty: the code range's). Codes from 3000 to 3499 make clients reconnect,
/// from 3500 to 4999 not.
pub fn disconnect_reason(code: Option<u16>, reason: &str) -> Result<CloseReason, HeraldError> {
    if reason.len() > MAX_DISCONNECT_REASON {
        return Err(HeraldError::bad_request(format!(
            "disconnect.reason is longer than {MAX_DISCONNECT_REASON} bytes"
        )));
    }
    let fixed = fixed_disconnect_reason(code)?;
    Ok(CloseReason {
        code: fixed.code,
        reason: custom_reason(reason, fixed.reason),
    })
}

/// `reason` as the `&'static str` every connection's close state holds (a [`CloseReason`] is
/// copied into each queue it closes): the texts given to `disconnect` are kept for the
/// process's life, each once, at most [`MAX_CUSTOM_REASONS`] of them (≤ 126 KiB); past that
/// a new text falls back to `fixed`, the code range's reason. Empty: `fixed`.
fn custom_reason(reason: &str, fixed: &'static str) -> &'static str {
    static KEPT: std::sync::LazyLock<parking_lot::Mutex<std::collections::HashSet<&'static str>>> =
        std::sync::LazyLock::new(Default::default);
    if reason.is_empty() || reason == fixed {
        return fixed;
    }
    let mut kept = KEPT.lock();
    if let Some(known) = kept.get(reason) {
        return known;
    }
    if kept.len() >= MAX_CUSTOM_REASONS {
        return fixed;
    }
    let leaked: &'static str = Box::leak(reason.to_owned().into_boxed_str());
    kept.insert(leaked);
    leaked
}

fn fixed_disconnect_reason(code: Option<u16>) -> Result<CloseReason, HeraldError> {
    match code {
        None => Ok(CloseReason::FORCE_DISCONNECT),
        Some(code @ 3000..=3499) => Ok(CloseReason {
            code,
            reason: "force reconnect",
        }),
        Some(code @ 3500..=4999) => Ok(CloseReason {
            code,
            reason: "force disconnect",
        }),
        Some(code) => Err(HeraldError::bad_request(format!(
            "disconnect.code {code} is outside 3000..=4999"
        ))),
    }
}

/// Applies `command` to this node.
pub fn apply(state: &AppState, command: &ControlCommand) -> Result<(), HeraldError> {
    let now = herald_core::time::now_ms() / 1000;
    match command {
        ControlCommand::Disconnect {
            user,
            client,
            whitelist,
            code,
            reason,
        } => {
            let reason = disconnect_reason(Some(*code), reason)?;
            let closed =
                state
                    .realtime
                    .sessions
                    .disconnect(user, client.as_deref(), whitelist, reason);
            tracing::info!(%user, closed, code, "disconnected by the server API");
        }
        ControlCommand::Unsubscribe {
            user,
            client,
            channel,
        } => {
            state
                .realtime
                .sessions
                .unsubscribe(user, client.as_deref(), channel);
        }
        ControlCommand::RevokeToken { uid, until } => {
            state.tokens.revocations.revoke_token(uid, *until, now)?;
        }
        ControlCommand::InvalidateUser {
            user,
            before,
            until,
        } => {
            state
                .tokens
                .revocations
                .invalidate_user(user, *before, *until, now)?;
        }
        // Answered by the cluster task, which can reach the engine.
        ControlCommand::Channels { .. } => {}
    }
    Ok(())
}

/// Applies `command` here and, in a cluster, on every other node. Fails (503) when the other
/// nodes could not be told; applying again is harmless, so the caller may retry.
pub async fn apply_everywhere(
    state: &AppState,
    command: ControlCommand,
) -> Result<(), HeraldError> {
    apply(state, &command)?;
    #[cfg(feature = "redis")]
    if let Some(cluster) = &state.cluster {
        let message = ControlMessage {
            from: state.node.uid().to_owned(),
            command,
        };
        let bytes =
            serde_json::to_vec(&message).map_err(|e| HeraldError::internal(e.to_string()))?;
        // Revocations must hold on nodes that start later too.
        if let ControlCommand::RevokeToken { until, .. }
        | ControlCommand::InvalidateUser { until, .. } = &message.command
        {
            cluster.engine.keep_control(bytes.clone(), *until).await?;
        }
        cluster.engine.send_control(bytes).await?;
    }
    Ok(())
}

/// The cluster engine and registry of this node.
#[derive(Debug)]
pub struct Cluster {
    #[cfg(feature = "redis")]
    pub engine: Arc<RedisEngine>,
    #[cfg(feature = "redis")]
    pub registry: NodeRegistry,
}

#[cfg(feature = "redis")]
impl Cluster {
    pub fn new(engine: Arc<RedisEngine>, registry: NodeRegistry) -> Self {
        Self { engine, registry }
    }

    /// What this node reports about itself.
    pub fn record(state: &AppState) -> NodeRecord {
        let info = state.node.info();
        NodeRecord {
            uid: info.uid,
            name: info.name,
            version: info.version,
            num_clients: state.realtime.connections.load(Ordering::Relaxed),
            num_users: state.realtime.sessions.user_count() as u64,
            num_channels: info.num_channels,
            num_subs: info.num_subscriptions,
            uptime_secs: info.uptime.as_secs(),
            updated_ms: 0,
        }
    }

    /// Writes this node's record every heartbeat interval, and applies the commands other
    /// nodes send, until the task is aborted.
    pub async fn run(state: Arc<AppState>) {
        let Some(cluster) = state.cluster.clone() else {
            return;
        };
        let mut control = cluster.engine.control_messages();
        let mut tick = tokio::time::interval(cluster.registry.heartbeat_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(error) = cluster.registry.heartbeat(Self::record(&state)).await {
                        tracing::debug!(%error, "node heartbeat failed");
                    }
                }
                message = async { control.as_mut()?.recv().await }, if control.is_some() => {
                    match message {
                        Some(bytes) => cluster.apply_remote(&state, &bytes).await,
                        None => control = None,
                    }
                }
            }
        }
    }

    /// Applies the revocations other nodes kept (before this node serves anything).
    pub async fn apply_kept(&self, state: &AppState) -> Result<usize, HeraldError> {
        let now = herald_core::time::now_ms() / 1000;
        let kept = self.engine.kept_controls(now).await?;
        let mut applied = 0;
        for bytes in &kept {
            match serde_json::from_slice::<ControlMessage>(bytes) {
                Ok(message) => {
                    apply(state, &message.command)?;
                    applied += 1;
                }
                Err(error) => tracing::warn!(%error, "undecodable kept cluster command ignored"),
            }
        }
        Ok(applied)
    }

    /// Every live node (this one from memory if the registry cannot be read).
    pub async fn nodes(&self, state: &AppState) -> Vec<NodeRecord> {
        match self.registry.live().await {
            Ok(nodes) if !nodes.is_empty() => nodes,
            Ok(_) => vec![Self::record(state)],
            Err(error) => {
                tracing::warn!(%error, "node registry unreadable; info shows this node only");
                vec![Self::record(state)]
            }
        }
    }
}

#[cfg(feature = "redis")]
impl Cluster {
    /// Applies another node's command here (this node's own were applied when they were
    /// made), or answers its query.
    async fn apply_remote(&self, state: &AppState, bytes: &[u8]) {
        let message = match serde_json::from_slice::<ControlMessage>(bytes) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "undecodable cluster command ignored");
                return;
            }
        };
        if message.from == state.node.uid() {
            return;
        }
        if let ControlCommand::Channels { request, pattern } = &message.command {
            let channels = channel_counts(state, pattern.as_deref());
            let result = match serde_json::to_vec(&channels) {
                Ok(answer) => self.engine.answer(request, state.node.uid(), answer).await,
                Err(error) => Err(herald_core::store::StoreError::Backend(error.to_string())),
            };
            if let Err(error) = result {
                tracing::warn!(%error, "could not answer a channels query");
            }
            return;
        }
        if let Err(error) = apply(state, &message.command) {
            tracing::warn!(%error, command = ?message.command, "a cluster command failed here");
        }
    }

    /// Channels with subscribers on any live node matching `pattern`, with the number of
    /// subscribers over all nodes. Nodes that do not answer within a second are left out.
    pub async fn channels(
        &self,
        state: &AppState,
        pattern: Option<&str>,
    ) -> Result<BTreeMap<String, u64>, HeraldError> {
        let others = self
            .registry
            .live()
            .await?
            .iter()
            .filter(|node| node.uid != state.node.uid())
            .count();
        let mut total = channel_counts(state, pattern);
        if others == 0 {
            return Ok(total);
        }
        let request = format!(
            "{}-{}",
            state.node.uid(),
            herald_core::publication::new_epoch()
        );
        let message = ControlMessage {
            from: state.node.uid().to_owned(),
            command: ControlCommand::Channels {
                request: request.clone(),
                pattern: pattern.map(str::to_owned),
            },
        };
        let bytes =
            serde_json::to_vec(&message).map_err(|e| HeraldError::internal(e.to_string()))?;
        self.engine.send_control(bytes).await?;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut answers = self.engine.answers(&request).await?;
        while answers.len() < others && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            answers = self.engine.answers(&request).await?;
        }
        if answers.len() < others {
            tracing::warn!(
                answered = answers.len(),
                others,
                "not every node answered the channels query in time"
            );
        }
        for (_, answer) in answers {
            let Ok(counts) = serde_json::from_slice::<BTreeMap<String, u64>>(&answer) else {
                continue;
            };
            for (channel, count) in counts {
                *total.entry(channel).or_default() += count;
            }
        }
        Ok(total)
    }
}

/// This node's channels matching `pattern`, with their local subscriber counts.
pub fn channel_counts(state: &AppState, pattern: Option<&str>) -> BTreeMap<String, u64> {
    state
        .node
        .channels(pattern)
        .into_iter()
        .map(|(name, count)| (name.to_string(), count as u64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_travel_as_tagged_json() {
        let command = ControlCommand::RevokeToken {
            uid: "jti-1".into(),
            until: 9,
        };
        let json = serde_json::to_string(&ControlMessage {
            from: "n".into(),
            command: command.clone(),
        })
        .expect("encode");
        assert_eq!(
            json,
            r#"{"from":"n","command":{"op":"revoke_token","uid":"jti-1","until":9}}"#
        );
        let back: ControlMessage = serde_json::from_str(&json).expect("decode");
        assert_eq!(back.command, command);
    }

    #[test]
    fn disconnect_codes_outside_the_range_are_refused() {
        assert_eq!(disconnect_reason(None, "").map(|r| r.code), Ok(3503));
        assert_eq!(
            disconnect_reason(Some(3001), "").map(|r| r.reason),
            Ok("force reconnect")
        );
        assert!(disconnect_reason(Some(2999), "").is_err());
        assert!(disconnect_reason(Some(5000), "moved").is_err());
    }

    #[test]
    fn a_given_reason_is_kept_once_and_bounded_in_length() {
        let moved = disconnect_reason(Some(4000), "moved").expect("reason");
        assert_eq!((moved.code, moved.reason), (4000, "moved"));
        let again = disconnect_reason(Some(3000), "moved").expect("reason");
        assert!(std::ptr::eq(moved.reason, again.reason), "kept once");
        assert_eq!(
            disconnect_reason(None, "bye").map(|r| (r.code, r.reason)),
            Ok((3503, "bye"))
        );
        let longest = "x".repeat(MAX_DISCONNECT_REASON);
        assert!(disconnect_reason(None, &longest).is_ok());
        assert!(disconnect_reason(None, &format!("{longest}y")).is_err());
    }

    #[test]
    fn disconnect_without_a_reason_decodes_from_older_nodes() {
        let old = r#"{"op":"disconnect","user":"u","client":null,"whitelist":[],"code":3503}"#;
        let command: ControlCommand = serde_json::from_str(old).expect("decode");
        assert!(matches!(command, ControlCommand::Disconnect { reason, .. } if reason.is_empty()));
    }
}
