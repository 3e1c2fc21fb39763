//! What turns Herald's events into webhook jobs: publications ([`PublicationWebhooks`], a
//! node publication observer that queues durably before the publish returns), client
//! lifecycle events ([`ClientEventWebhooks`], best effort through a bounded buffer, since
//! they happen on connections' own tasks) and push failures ([`PushFailureWebhooks`]).
//!
//! Owns: the `data` of each event type (see `docs/integrations.md#webhooks`).
//!
//! May touch: the [`WebhookService`] (its endpoints and queue).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use herald_core::channel::ChannelName;
use herald_core::error::HeraldError;
use herald_core::events::{ClientEvent, ClientEventKind, ClientEventObserver};
use herald_core::namespace::NamespaceOptions;
use herald_core::node::{PublishObserver, Published};
use herald_core::outbound::QueueError;
use herald_core::publication::Payload;
use herald_core::time::now_ms;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use super::event::{Event, EventType, random_key};
use super::{WebhookService, WebhookStats};
use crate::push::deliver::{PushEvents, PushFailure};

/// How long a publication's webhooks wait for an unreachable queue before they are dropped.
const ENQUEUE_PATIENCE: Duration = Duration::from_secs(15);

/// `data` of `publication`.
#[derive(Serialize)]
struct PublicationData<'a> {
    channel: &'a str,
    /// 0 for publications not kept in history.
    offset: u64,
    #[serde(skip_serializing_if = "str::is_empty")]
    epoch: &'a str,
    /// JSON data as published.
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
    /// Binary data, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    b64data: Option<String>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    tags: &'a std::collections::BTreeMap<String, String>,
    /// The publishing client, for client publications.
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<&'a herald_core::publication::ClientInfo>,
}

/// Queues a `publication` event per publication an endpoint wants. Publications that happen
/// at once (a batch publish, many publishers) are queued together: while one enqueue is being
/// written, the events that arrive wait and go in the next, one call for all of them, so
/// deliveries to the same endpoint become batches ([`super::batch`]). Each publisher still
/// hears back only once its own event is durable.
pub struct PublicationWebhooks {
    service: Arc<WebhookService>,
    waiting: Arc<Mutex<Waiting>>,
}

/// Events waiting for the next enqueue, and whether a task is writing them.
#[derive(Default)]
struct Waiting {
    events: Vec<(Event, oneshot::Sender<Result<(), QueueError>>)>,
    writing: bool,
}

impl PublicationWebhooks {
    pub fn new(service: Arc<WebhookService>) -> Self {
        Self {
            service,
            waiting: Arc::default(),
        }
    }

    /// Queues `event` with whatever else is waiting; resolves once it is durable.
    async fn enqueue(&self, event: Event) -> Result<(), QueueError> {
        let (done, result) = oneshot::channel();
        let start_writer = {
            let mut waiting = self.waiting.lock();
            waiting.events.push((event, done));
            !std::mem::replace(&mut waiting.writing, true)
        };
        if start_writer {
            // A task of its own, so that no publisher waits for others' events.
            tokio::spawn(write_waiting(self.service.clone(), self.waiting.clone()));
        }
        result.await.unwrap_or_else(|_| {
            Err(QueueError::Unavailable(
                "the webhook writer stopped".to_owned(),
            ))
        })
    }

    fn event(published: &Published<'_>) -> Result<Event, String> {
        let publication = published.publication;
        let channel = published.channel.as_str();
        let (offset, epoch) = published
            .position
            .map_or((0, ""), |p| (p.offset, p.epoch.as_str()));
        let (data, b64data) = match &publication.data {
            Payload::Json(bytes) => {
                let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
                let raw: &RawValue = serde_json::from_str(text).map_err(|e| e.to_string())?;
                (Some(raw), None)
            }
            Payload::Binary(bytes) => {
                use base64::Engine as _;
                (
                    None,
                    Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                )
            }
        };
        // A stored publication is identified by its place in history (a retried publish with
        // an idempotency key never reaches here twice, but a replayed stream would); one
        // without history only by itself.
        let key = match published.position {
            Some(p) => format!("publication:{channel}:{}:{}", p.epoch, p.offset),
            None => random_key(EventType::Publication),
        };
        let data = PublicationData {
            channel,
            offset,
            epoch,
            data,
            b64data,
            tags: &publication.tags,
            info: publication.info.as_deref(),
        };
        Event::new(
            EventType::Publication,
            key,
            Some(channel.to_owned()),
            publication.time_ms,
            &data,
        )
        .map_err(|e| e.to_string())
    }
}

#[async_trait]
impl PublishObserver for PublicationWebhooks {
    fn wants(
        &self,
        channel: &ChannelName,
        _options: &NamespaceOptions,
        _push: Option<&serde_json::Value>,
    ) -> Result<bool, HeraldError> {
        Ok(self
            .service
            .endpoints
            .any_wants(EventType::Publication, Some(channel.as_str())))
    }

    async fn published(&self, published: Published<'_>) {
        let event = match Self::event(&published) {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(channel = published.channel.as_str(), %error, "publication webhook not built");
                return;
            }
        };
        // The publication stands whatever happens here. A queue that is briefly unreachable
        // (a Redis restart) is waited for by the writer, holding the publisher's answer back,
        // so that what it hears acknowledged has its webhooks queued; past the patience the
        // event's webhooks are lost, which the log says loudly.
        if let Err(error) = self.enqueue(event).await {
            WebhookStats::add(&self.service.stats.dropped_events, 1);
            tracing::error!(channel = published.channel.as_str(), %error, "queueing publication webhooks failed");
        }
    }
}

/// Enqueues what waits, in rounds, until nothing does. A round the queue cannot take right
/// now (unavailable) is tried again for up to [`ENQUEUE_PATIENCE`], once for all its events.
async fn write_waiting(service: Arc<WebhookService>, waiting: Arc<Mutex<Waiting>>) {
    loop {
        let round = {
            let mut waiting = waiting.lock();
            if waiting.events.is_empty() {
                waiting.writing = false;
                return;
            }
            std::mem::take(&mut waiting.events)
        };
        let (events, done): (Vec<Event>, Vec<_>) = round.into_iter().unzip();
        let deadline = tokio::time::Instant::now() + ENQUEUE_PATIENCE;
        let mut delay = Duration::from_millis(50);
        let result = loop {
            match service.enqueue(&events).await {
                Err(QueueError::Unavailable(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                other => break other.map(|_| ()),
            }
        };
        for done in done {
            let _ = done.send(result.clone());
        }
    }
}

/// `data` of the client lifecycle events.
#[derive(Serialize)]
struct ClientData<'a> {
    client: &'a str,
    user: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    transport: &'a str,
}

/// Queues lifecycle events through a bounded buffer (a full buffer drops and counts).
pub struct ClientEventWebhooks {
    service: Arc<WebhookService>,
    buffer: mpsc::Sender<ClientEvent>,
}

impl ClientEventWebhooks {
    /// The observer, and the task that queues what it buffers (run it until shutdown).
    pub fn new(
        service: Arc<WebhookService>,
        capacity: usize,
    ) -> (Self, impl std::future::Future<Output = ()> + Send) {
        let (buffer, events) = mpsc::channel(capacity.max(1));
        let drain = drain_client_events(service.clone(), events);
        (Self { service, buffer }, drain)
    }
}

impl ClientEventObserver for ClientEventWebhooks {
    fn wants(&self, kind: ClientEventKind, channel: Option<&str>) -> bool {
        let kind = EventType::of_client_event(kind);
        match channel {
            Some(channel) => self.service.endpoints.any_wants(kind, Some(channel)),
            None => self.service.endpoints.any_wants(kind, None),
        }
    }

    fn observe(&self, event: ClientEvent) {
        if self.buffer.try_send(event).is_err() {
            WebhookStats::add(&self.service.stats.dropped_events, 1);
        }
    }
}

async fn drain_client_events(
    service: Arc<WebhookService>,
    mut events: mpsc::Receiver<ClientEvent>,
) {
    let mut batch = Vec::with_capacity(256);
    while events.recv_many(&mut batch, 256).await > 0 {
        let built: Vec<Event> = batch
            .drain(..)
            .filter_map(|event| {
                let kind = EventType::of_client_event(event.kind);
                let data = ClientData {
                    client: &event.client,
                    user: &event.user,
                    channel: event.channel.as_deref(),
                    transport: event.transport,
                };
                Event::new(
                    kind,
                    random_key(kind),
                    event.channel.as_deref().map(str::to_owned),
                    event.time_ms,
                    &data,
                )
                .ok()
            })
            .collect();
        if let Err(error) = service.enqueue(&built).await {
            WebhookStats::add(&service.stats.dropped_events, built.len() as u64);
            tracing::warn!(%error, events = built.len(), "queueing client event webhooks failed");
        }
    }
}

/// `data` of `push.failed` and `push.device_removed`.
#[derive(Serialize)]
struct PushData<'a> {
    uid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<&'a str>,
    provider: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    app: &'a str,
    reason: &'a str,
}

/// Queues `push.failed` (and `push.device_removed` when the device went with it).
pub struct PushFailureWebhooks {
    pub service: Arc<WebhookService>,
}

#[async_trait]
impl PushEvents for PushFailureWebhooks {
    async fn push_failed(&self, failure: PushFailure) {
        let provider = failure.provider.to_string();
        let data = PushData {
            uid: &failure.uid,
            device: failure.device.as_deref(),
            provider: &provider,
            app: &failure.app,
            reason: &failure.reason,
        };
        let target = failure.device.as_deref().unwrap_or("-");
        let now = now_ms();
        let mut events = Vec::with_capacity(2);
        for (kind, wanted) in [
            (EventType::PushFailed, true),
            (EventType::PushDeviceRemoved, failure.device_removed),
        ] {
            if !wanted || !self.service.endpoints.any_wants(kind, None) {
                continue;
            }
            let key = format!("{}:{}:{provider}:{target}", kind.as_str(), failure.uid);
            if let Ok(event) = Event::new(kind, key, None, now, &data) {
                events.push(event);
            }
        }
        if events.is_empty() {
            return;
        }
        if let Err(error) = self.service.enqueue(&events).await {
            WebhookStats::add(&self.service.stats.dropped_events, events.len() as u64);
            tracing::warn!(%error, "queueing push failure webhooks failed");
        }
    }
}
