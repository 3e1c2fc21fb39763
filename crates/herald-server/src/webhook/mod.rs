//! Webhooks in the server: `[webhooks]` config, the running parts built from it (the
//! endpoints, the service, the observers the node calls), their background tasks and the
//! server API methods.
//!
//! Owns: [`WebhookRuntime`] and its tasks — the `webhook` worker, the attempt log's writer,
//! the lifecycle-event drain, the endpoint refresh (changes from other nodes) and dead-letter
//! retention.
//!
//! May touch: the outbound stores it is built with and the node (to observe it).

pub mod api;
pub mod config;

use std::pin::Pin;
use std::sync::Arc;

use herald_core::Node;
use herald_core::time::now_ms;
use herald_outbound::webhook::batch::{BATCH_KIND, WebhookBatchHandler};
use herald_outbound::webhook::deliver::{WebhookHandler, record_attempts};
use herald_outbound::webhook::endpoints::Endpoints;
use herald_outbound::webhook::event::KIND;
use herald_outbound::webhook::observe::{
    ClientEventWebhooks, PublicationWebhooks, PushFailureWebhooks,
};
use herald_outbound::webhook::{
    DEAD_LETTERS, DeadLetter, WebhookService, WebhookSettings, WebhookStats,
};
use herald_outbound::worker::{JobHandler, RetrySchedule, Wakeup, WorkerConfig, run_worker};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use config::WebhooksConfig;

use crate::outbound::OutboundStores;

type Drain = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Everything webhooks need at run time.
pub struct WebhookRuntime {
    pub service: Arc<WebhookService>,
    pub config: WebhooksConfig,
    client_events: Mutex<Option<Drain>>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for WebhookRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookRuntime").finish_non_exhaustive()
    }
}

impl WebhookRuntime {
    /// Loads the endpoints (writing the config file's to the store) and makes `node` tell
    /// webhooks of publications and client lifecycle events.
    pub async fn build(
        config: WebhooksConfig,
        stores: &OutboundStores,
        node: &Node,
    ) -> Result<Arc<Self>, String> {
        let endpoints = Endpoints::load(stores.webhooks.clone(), &config.endpoints)
            .await
            .map_err(|e| format!("loading webhook endpoints: {e}"))?;
        let schedule = schedule(&config);
        let service = Arc::new(WebhookService {
            endpoints: Arc::new(endpoints),
            queue: stores.queue.clone(),
            store: stores.webhooks.clone(),
            wakeup: Arc::new(Wakeup::default()),
            stats: Arc::new(WebhookStats::default()),
            settings: WebhookSettings {
                allow_private_addresses: config.allow_private_addresses,
                timeout: config.timeout.as_duration(),
                disable_after: config.disable_after.as_duration(),
                attempts: schedule.attempts(),
                batch: config.batch,
            },
        });
        node.observe_publications(Arc::new(PublicationWebhooks::new(service.clone())));
        let (observer, drain) = ClientEventWebhooks::new(service.clone(), config.event_buffer);
        node.observe_client_events(Arc::new(observer));
        Ok(Arc::new(Self {
            service,
            config,
            client_events: Mutex::new(Some(Box::pin(drain))),
            stop: watch::channel(false).0,
        }))
    }

    /// What push tells of failed deliveries and removed devices.
    pub fn push_events(&self) -> Arc<dyn herald_outbound::push::deliver::PushEvents> {
        Arc::new(PushFailureWebhooks {
            service: self.service.clone(),
        })
    }

    /// Starts the worker and the background tasks; they run until [`WebhookRuntime::stop`].
    pub fn start(self: &Arc<Self>) -> Result<JoinSet<()>, String> {
        let mut tasks = JoinSet::new();
        let (handler, log) = WebhookHandler::new(self.service.clone(), self.config.concurrency)?;
        let handler = Arc::new(handler);
        let c = &self.config;
        let retry = herald_outbound::worker::Retry::Schedule(schedule(c));
        let batches: Arc<dyn JobHandler> = Arc::new(WebhookBatchHandler {
            queue: self.service.queue.clone(),
            handler: handler.clone(),
            retry: retry.clone(),
        });
        // Single deliveries, and batches: enough of those at once to keep the requests in
        // flight busy while one settles.
        let batch_concurrency = (2 * c.concurrency).div_ceil(c.batch).max(2);
        for (kind, handler, concurrency) in [
            (KIND, handler as Arc<dyn JobHandler>, c.concurrency),
            (BATCH_KIND, batches, batch_concurrency),
        ] {
            let worker = WorkerConfig {
                kind: kind.to_owned(),
                concurrency,
                batch: c.batch,
                lease: c.lease.as_duration(),
                poll_interval: c.poll_interval.as_duration(),
                retry: retry.clone(),
            };
            tasks.spawn(run_worker(
                self.service.queue.clone(),
                handler,
                worker,
                self.service.wakeup.clone(),
                self.stopped(),
            ));
        }
        // Ends when the handler (its only sender) is dropped with the workers.
        tasks.spawn(record_attempts(self.service.store.clone(), log));
        if let Some(drain) = self.client_events.lock().take() {
            let stop = self.stopped();
            tasks.spawn(async move {
                tokio::select! {
                    () = drain => {}
                    () = stop => {}
                }
            });
        }
        tasks.spawn(maintain(self.clone()));
        Ok(tasks)
    }

    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        }
    }

    /// Tells the tasks to stop; deliveries in flight finish and are recorded.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    pub fn stats(&self) -> &WebhookStats {
        &self.service.stats
    }
}

fn schedule(config: &WebhooksConfig) -> RetrySchedule {
    RetrySchedule::new(
        config
            .retry_schedule
            .iter()
            .map(|d| d.as_duration())
            .collect(),
    )
}

/// Re-reads the endpoints every `refresh_interval` and drops dead letters past retention
/// every `maintenance_interval`.
async fn maintain(runtime: Arc<WebhookRuntime>) {
    let stop = runtime.stopped();
    tokio::pin!(stop);
    let mut refresh = tokio::time::interval(runtime.config.refresh_interval.as_duration());
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retention = tokio::time::interval(runtime.config.maintenance_interval.as_duration());
    retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = refresh.tick() => {
                if let Err(error) = runtime.service.endpoints.refresh().await {
                    tracing::warn!(%error, "re-reading webhook endpoints failed");
                }
            }
            _ = retention.tick() => purge_dead_letters(&runtime).await,
            () = &mut stop => return,
        }
    }
}

async fn purge_dead_letters(runtime: &WebhookRuntime) {
    let keep = runtime.config.status_retention.as_duration().as_millis() as u64;
    let before = now_ms().saturating_sub(keep);
    let store = &runtime.service.store;
    let letters = match store.documents(DEAD_LETTERS).await {
        Ok(letters) => letters,
        Err(error) => {
            tracing::warn!(%error, "reading webhook dead letters failed");
            return;
        }
    };
    for (id, document) in letters {
        let old = serde_json::from_slice::<DeadLetter>(&document)
            .map_or(true, |letter| letter.failed_at < before);
        if old && let Err(error) = store.delete_document(DEAD_LETTERS, &id).await {
            tracing::warn!(%error, "removing a webhook dead letter failed");
            return;
        }
    }
}
