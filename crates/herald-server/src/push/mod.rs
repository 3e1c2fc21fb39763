//! Push notifications in the server: `[push]` config, the running parts built from it (the
//! registry, the queue, the senders, the workers), the push API methods and the client's own
//! device calls.
//!
//! Owns: [`PushRuntime`] and its background tasks (one worker per job kind, and pruning
//! inactive devices).
//!
//! May touch: the stores it is built with, the providers through the senders.

pub mod api;
pub mod client;
pub mod config;
pub mod live;

use std::sync::Arc;

use herald_core::device::{DeviceStore, Provider};
use herald_core::outbound::OutboundQueue;
use herald_core::time::now_ms;
use herald_outbound::push::batch::{BatchHandler, batch_kind};
use herald_outbound::push::deliver::{AnySender, DeliveryHandler};
use herald_outbound::push::fanout::FanoutHandler;
use herald_outbound::push::{FANOUT_KIND, PushService, PushStats, delivery_kind};
use herald_outbound::worker::{Backoff, JobHandler, Wakeup, WorkerConfig, run_worker};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use config::PushConfig;

/// One sender per provider, where credentials are configured.
#[derive(Clone, Default)]
pub struct Senders {
    pub fcm: Option<Arc<dyn AnySender>>,
    pub apns: Option<Arc<dyn AnySender>>,
    pub webpush: Option<Arc<dyn AnySender>>,
    pub email: Option<Arc<dyn AnySender>>,
    /// Each Web Push app's VAPID public key (base64url), which browsers subscribe with.
    pub vapid_public_keys: std::collections::BTreeMap<String, String>,
}

impl Senders {
    fn get(&self, provider: Provider) -> Option<Arc<dyn AnySender>> {
        match provider {
            Provider::Fcm => self.fcm.clone(),
            Provider::Apns => self.apns.clone(),
            Provider::Webpush => self.webpush.clone(),
            Provider::Email => self.email.clone(),
        }
    }
}

/// Builds a sender for each provider that has credentials in `config`.
pub fn senders(config: &PushConfig) -> Result<Senders, String> {
    let mut senders = Senders::default();
    if let Some(apns) = &config.apns {
        let sender =
            herald_outbound::apns::ApnsSender::new(apns).map_err(|e| format!("push.apns: {e}"))?;
        senders.apns = Some(Arc::new(sender));
    }
    if let Some(fcm) = &config.fcm {
        let sender =
            herald_outbound::fcm::FcmSender::new(fcm).map_err(|e| format!("push.fcm: {e}"))?;
        senders.fcm = Some(Arc::new(sender));
    }
    if let Some(webpush) = &config.webpush {
        let sender = herald_outbound::webpush::WebpushSender::new(webpush)
            .map_err(|e| format!("push.webpush: {e}"))?;
        for app in &webpush.apps {
            if let Some(key) = sender.public_key(&app.app) {
                senders
                    .vapid_public_keys
                    .insert(app.app.clone(), key.to_string());
            }
        }
        senders.webpush = Some(Arc::new(sender));
    }
    if let Some(email) = &config.email {
        let sender = herald_outbound::email::EmailSender::new(email)
            .map_err(|e| format!("push.email: {e}"))?;
        senders.email = Some(Arc::new(sender));
    }
    Ok(senders)
}

/// Everything push needs at run time.
pub struct PushRuntime {
    pub service: PushService,
    pub config: PushConfig,
    senders: Senders,
    wakeup: Arc<Wakeup>,
    stop: watch::Sender<bool>,
    /// Told of failed deliveries and removed devices (webhooks), when they are on.
    events: Option<Arc<dyn herald_outbound::push::deliver::PushEvents>>,
}

impl std::fmt::Debug for PushRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushRuntime").finish_non_exhaustive()
    }
}

impl PushRuntime {
    pub fn new(
        config: PushConfig,
        queue: Arc<dyn OutboundQueue>,
        devices: Arc<dyn DeviceStore>,
        senders: Senders,
        events: Option<Arc<dyn herald_outbound::push::deliver::PushEvents>>,
    ) -> Self {
        let wakeup = Arc::new(Wakeup::default());
        let stats = Arc::new(PushStats::default());
        let service =
            PushService::new(queue, devices, wakeup.clone(), stats).with_batch_size(config.batch);
        Self {
            service,
            config,
            senders,
            wakeup,
            stop: watch::channel(false).0,
            events,
        }
    }

    fn worker_config(&self, kind: &str, concurrency: usize) -> WorkerConfig {
        let c = &self.config;
        WorkerConfig {
            kind: kind.to_string(),
            concurrency,
            batch: c.batch,
            lease: c.lease.as_duration(),
            poll_interval: c.poll_interval.as_duration(),
            retry: Backoff {
                base: c.retry_base.as_duration(),
                max: c.retry_max.as_duration(),
                attempts: c.max_attempts,
            }
            .into(),
        }
    }

    /// Starts the workers and the maintenance task; they run until [`PushRuntime::stop`].
    pub fn start(self: &Arc<Self>) -> JoinSet<()> {
        let mut tasks = JoinSet::new();
        let queue = self.service.queue().clone();
        let devices = self.service.devices().clone();
        let stats = self.service.stats().clone();
        let fanout: Arc<dyn JobHandler> = Arc::new(FanoutHandler {
            queue: queue.clone(),
            devices: devices.clone(),
            wakeup: self.wakeup.clone(),
            batch_size: self.config.batch,
        });
        let c = &self.config.concurrency;
        let mut kinds: Vec<(Arc<dyn JobHandler>, WorkerConfig)> =
            vec![(fanout, self.worker_config(FANOUT_KIND, c.fanout))];
        for (provider, concurrency) in [
            (Provider::Fcm, c.fcm),
            (Provider::Apns, c.apns),
            (Provider::Webpush, c.webpush),
            (Provider::Email, c.email),
        ] {
            // The provider's sends in flight, shared by its single deliveries and batches.
            let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
            let delivery = Arc::new(DeliveryHandler {
                provider,
                sender: self.senders.get(provider),
                devices: devices.clone(),
                stats: stats.clone(),
                events: self.events.clone(),
                slots: Some(slots),
            });
            let single = self.worker_config(delivery_kind(provider), concurrency);
            let batches: Arc<dyn JobHandler> = Arc::new(BatchHandler {
                queue: queue.clone(),
                delivery: delivery.clone(),
                retry: single.retry.clone(),
            });
            // Enough batches at once to keep the sends in flight busy while one settles.
            let batch_concurrency = (2 * concurrency).div_ceil(self.config.batch).max(2);
            kinds.push((
                batches,
                self.worker_config(batch_kind(provider), batch_concurrency),
            ));
            kinds.push((delivery as Arc<dyn JobHandler>, single));
        }
        for (handler, config) in kinds {
            let stop = self.stopped();
            tasks.spawn(run_worker(
                queue.clone(),
                handler,
                config,
                self.wakeup.clone(),
                stop,
            ));
        }
        tasks.spawn(maintain(self.clone()));
        tasks
    }

    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        }
    }

    /// The VAPID public key of Web Push app `app`, for browsers to subscribe with.
    pub fn vapid_public_key(&self, app: &str) -> Option<&str> {
        self.senders.vapid_public_keys.get(app).map(String::as_str)
    }

    /// Tells the workers to stop claiming; running sends finish and are recorded.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

/// Prunes inactive devices, every `maintenance_interval` (finished jobs are purged by the
/// outbound queue's own retention task, [`crate::outbound::purge_finished`]).
async fn maintain(push: Arc<PushRuntime>) {
    let stop = push.stopped();
    tokio::pin!(stop);
    let every = push.config.maintenance_interval.as_duration();
    loop {
        let inactive = push.config.device_inactive_after.as_duration();
        if !inactive.is_zero() {
            let now = now_ms();
            let before = now.saturating_sub(inactive.as_millis() as u64);
            match push.service.devices().prune(before, now).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "inactive devices removed"),
                Err(error) => tracing::warn!(%error, "pruning inactive devices failed"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = &mut stop => return,
        }
    }
}
