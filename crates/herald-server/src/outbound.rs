//! The one outbound queue per server and the stores beside it, shared by push, webhooks and
//! (next) bridges out: built once by [`crate::build`] when any of them is on, where history
//! lives (`<data_dir>/outbound.db` with SQLite, the cluster's Redis, memory with the memory
//! engine).
//!
//! Owns: [`OutboundStores`] and the queue's retention task ([`purge_finished`]): finished jobs
//! are kept for the longest retention any enabled part asks for, so no part loses statuses
//! earlier than its own setting says.
//!
//! May touch: the stores it holds.

use std::sync::Arc;
use std::time::Duration;

use herald_core::device::DeviceStore;
use herald_core::outbound::OutboundQueue;
use herald_core::time::now_ms;
use herald_core::webhook_store::WebhookStore;

/// The queue and the stores that live beside it.
#[derive(Clone)]
pub struct OutboundStores {
    pub queue: Arc<dyn OutboundQueue>,
    /// The push device registry.
    pub devices: Arc<dyn DeviceStore>,
    /// Webhook endpoints and the attempt log.
    pub webhooks: Arc<dyn WebhookStore>,
}

impl std::fmt::Debug for OutboundStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundStores").finish_non_exhaustive()
    }
}

/// How long finished jobs are kept, and how often that is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    pub keep: Duration,
    pub every: Duration,
}

impl Retention {
    /// The longer keep and the shorter interval of two parts.
    pub fn merge(self, other: Retention) -> Retention {
        Retention {
            keep: self.keep.max(other.keep),
            every: self.every.min(other.every),
        }
    }
}

/// Removes finished jobs (and webhook attempts) past `retention`, every `retention.every`,
/// until `stop` resolves.
pub async fn purge_finished(
    stores: OutboundStores,
    retention: Retention,
    stop: impl std::future::Future<Output = ()> + Send,
) {
    tokio::pin!(stop);
    loop {
        let before = now_ms().saturating_sub(retention.keep.as_millis() as u64);
        match stores.queue.purge(before).await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "finished outbound jobs past retention removed"),
            Err(error) => tracing::warn!(%error, "purging finished outbound jobs failed"),
        }
        if let Err(error) = stores.webhooks.purge_attempts(before).await {
            tracing::warn!(%error, "purging webhook attempts failed");
        }
        tokio::select! {
            () = tokio::time::sleep(retention.every) => {}
            () = &mut stop => return,
        }
    }
}
