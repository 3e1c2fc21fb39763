//! The `push.fanout` job: expands one accepted push into one delivery job per device (or raw
//! token), applying the request's limits. Deliveries due now go in batches of `batch_size`
//! per provider (`push.<provider>.batch`, see [`super::batch`]), each delivery still a member
//! job of its own; deliveries a limit holds back are single `push.<provider>` jobs.
//!
//! Owns: recipient expansion, the email fallback rule, and the ids of delivery jobs. Delivery
//! ids are `<uid>:<device id>` (raw tokens: `<uid>:<provider>:<token hash>`), so re-running an
//! interrupted expansion — its node died, the lease ran out, another node claimed it — adds
//! only the deliveries that are missing: each device gets a push once.
//!
//! Email fallback: when the filter does not name providers, a user's email "devices" get the
//! push only if none of that user's other matched devices does.
//!
//! May touch: the queue and the device registry.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use herald_core::device::{Device, DeviceStore, PageRequest, Provider};
use herald_core::outbound::{Job, NewJob, OutboundQueue};
use herald_core::time::now_ms;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::batch::{Batch, Member, batch_jobs};
use super::request::{LimitStrategy, SendPush};
use super::{Delivery, delivery_kind, limits};
use crate::sender::{Destination, Target};
use crate::worker::{JobHandler, JobResult, Wakeup};

/// Devices read from the registry per page, and deliveries enqueued per batch.
const PAGE: usize = 1000;

pub struct FanoutHandler {
    pub queue: Arc<dyn OutboundQueue>,
    pub devices: Arc<dyn DeviceStore>,
    pub wakeup: Arc<Wakeup>,
    /// Deliveries due now per `push.<provider>.batch` job (1: one job per delivery).
    pub batch_size: usize,
}

/// What an expansion produced.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub deliveries: u64,
    /// Devices of providers the notification has nothing for.
    pub skipped: u64,
    /// Dropped by `rate_limit.drop_if_rate_limited`.
    pub rate_limited: u64,
}

/// Expands `request` (known as `uid`) into delivery jobs on `queue`: the `push.fanout` job's
/// work, and [`super::PushService`]'s for the small requests it expands when accepting them.
pub(crate) async fn expand(
    queue: &dyn OutboundQueue,
    devices: &dyn DeviceStore,
    wakeup: &Wakeup,
    request: &SendPush,
    uid: &str,
    expire_at: Option<u64>,
    batch_size: usize,
) -> Result<Counts, String> {
    let mut expansion = Expansion {
        batch_size,
        batches: Default::default(),
        queue,
        devices,
        wakeup,
        request,
        // Encoded once here, copied into each delivery.
        parts: Provider::ALL.map(|provider| request.notification.part(provider)),
        uid,
        expire_at,
        now: now_ms(),
        pending: Vec::new(),
        counts: Counts::default(),
    };
    expansion.run().await?;
    Ok(expansion.counts)
}

struct Expansion<'a> {
    queue: &'a dyn OutboundQueue,
    devices: &'a dyn DeviceStore,
    wakeup: &'a Wakeup,
    request: &'a SendPush,
    /// The notification's part per provider (index of [`Provider::ALL`]).
    parts: [Option<Box<RawValue>>; 4],
    uid: &'a str,
    expire_at: Option<u64>,
    now: u64,
    pending: Vec<NewJob>,
    /// Deliveries per batch (1: none are batched).
    batch_size: usize,
    /// Per provider (index of [`Provider::ALL`]): deliveries due now waiting for their
    /// batch, with their recipients.
    batches: [Vec<(Member, String)>; 4],
    counts: Counts,
}

#[async_trait]
impl JobHandler for FanoutHandler {
    async fn run(&self, job: &Job) -> JobResult {
        let request: SendPush = match serde_json::from_slice(&job.payload) {
            Ok(request) => request,
            Err(error) => {
                return JobResult::Failed {
                    reason: format!("unreadable push request: {error}"),
                };
            }
        };
        let expanded = expand(
            self.queue.as_ref(),
            self.devices.as_ref(),
            &self.wakeup,
            &request,
            &job.group,
            job.expire_at,
            self.batch_size,
        )
        .await;
        match expanded {
            Ok(counts) => JobResult::Done {
                detail: format!(
                    "{} deliveries, {} devices without a notification for their provider, {} \
                     rate limited",
                    counts.deliveries, counts.skipped, counts.rate_limited
                ),
            },
            Err(reason) => JobResult::Retry {
                reason,
                after: None,
            },
        }
    }
}

impl Expansion<'_> {
    async fn run(&mut self) -> Result<(), String> {
        let recipient = &self.request.recipient;
        let app = recipient.app.clone();
        if let Some(filter) = &recipient.filter {
            let fallback = filter.providers.is_empty();
            self.expand_filter(filter.to_device_filter(), fallback)
                .await?;
        } else if let Some(topic) = &recipient.fcm_topic {
            let to = Destination::FcmTopic(topic.clone());
            self.add_raw(Provider::Fcm, &app, to, topic).await?;
        } else if let Some(condition) = &recipient.fcm_condition {
            let to = Destination::FcmCondition(condition.clone());
            self.add_raw(Provider::Fcm, &app, to, condition).await?;
        } else {
            for (tokens, provider) in [
                (&recipient.fcm_tokens, Provider::Fcm),
                (&recipient.apns_tokens, Provider::Apns),
                (&recipient.webpush_tokens, Provider::Webpush),
                (&recipient.emails, Provider::Email),
            ] {
                for token in tokens.iter().flatten() {
                    let to = Destination::Token(token.clone());
                    self.add_raw(provider, &app, to, token).await?;
                }
            }
        }
        self.flush().await
    }

    async fn expand_filter(
        &mut self,
        filter: herald_core::device::DeviceFilter,
        email_fallback: bool,
    ) -> Result<(), String> {
        let mut cursor = String::new();
        // Users that get a push through a non-email device, and email devices held back
        // until every page has been seen.
        let mut reached: HashSet<String> = HashSet::new();
        let mut emails: Vec<Device> = Vec::new();
        loop {
            let page = PageRequest {
                cursor: cursor.clone(),
                limit: PAGE,
                include_total: false,
            };
            let page = self
                .devices
                .list(&filter, false, &page)
                .await
                .map_err(|e| format!("reading devices: {e}"))?;
            for device in page.items {
                if !self.request.notification.has(device.provider) {
                    self.counts.skipped += 1;
                    continue;
                }
                if device.provider == Provider::Email && email_fallback {
                    emails.push(device);
                    continue;
                }
                if !device.user.is_empty() {
                    reached.insert(device.user.clone());
                }
                self.add_device(&device).await?;
            }
            if page.next_cursor.is_empty() {
                break;
            }
            cursor = page.next_cursor;
        }
        for device in emails {
            if device.user.is_empty() || !reached.contains(&device.user) {
                self.add_device(&device).await?;
            }
        }
        Ok(())
    }

    async fn add_device(&mut self, device: &Device) -> Result<(), String> {
        let target = Target {
            provider: device.provider,
            app: device.app.clone(),
            to: Destination::Token(device.token.clone()),
        };
        let id = format!("{}:{}", self.uid, device.id);
        let not_before = match self.limited(&device.id, Some(device)).await? {
            Some(at) => at,
            None => return Ok(()),
        };
        self.push(
            id,
            device.id.clone(),
            target,
            Some(device.id.clone()),
            not_before,
        )
        .await
    }

    async fn add_raw(
        &mut self,
        provider: Provider,
        app: &str,
        to: Destination,
        token: &str,
    ) -> Result<(), String> {
        let digest = hex::encode(&Sha256::digest(token.as_bytes())[..12]);
        let id = format!("{}:{provider}:{digest}", self.uid);
        // Short tokens name themselves in statuses; a Web Push subscription is long JSON.
        let recipient = if token.len() <= 200 {
            token.to_string()
        } else {
            format!("{provider}:{digest}")
        };
        let target = Target {
            provider,
            app: app.to_string(),
            to,
        };
        let not_before = match self.limited(&recipient, None).await? {
            Some(at) => at,
            None => return Ok(()),
        };
        self.push(id, recipient, target, None, not_before).await
    }

    /// When the delivery may go (`None`: dropped by the rate limit).
    async fn limited(
        &mut self,
        recipient: &str,
        device: Option<&Device>,
    ) -> Result<Option<u64>, String> {
        let Some(LimitStrategy {
            rate_limit,
            time_limit,
        }) = &self.request.limit_strategy
        else {
            return Ok(Some(self.now));
        };
        let mut at = self.now;
        if let Some(time) = time_limit {
            let timezone = device.map(|d| d.timezone.as_str()).unwrap_or("");
            at = limits::window_start(time, timezone, self.now)?;
        }
        if let Some(rate) = rate_limit {
            let key = limits::rate_key(rate, recipient, device);
            for (index, policy) in rate.policies.iter().enumerate() {
                let window = std::time::Duration::from_millis(policy.interval_ms);
                let allowed = self
                    .queue
                    .take_rate(&format!("{key}:{index}"), policy.rate, window, at)
                    .await
                    .map_err(|e| format!("rate limit: {e}"))?;
                if !allowed {
                    if rate.drop_if_rate_limited {
                        self.counts.rate_limited += 1;
                        return Ok(None);
                    }
                    // The start of the next window of the policy that said no.
                    at = (at / policy.interval_ms + 1) * policy.interval_ms;
                }
            }
        }
        Ok(Some(at))
    }

    async fn push(
        &mut self,
        id: String,
        recipient: String,
        target: Target,
        device: Option<String>,
        not_before: u64,
    ) -> Result<(), String> {
        let Some(index) = Provider::ALL.iter().position(|p| *p == target.provider) else {
            return Ok(());
        };
        if self.parts[index].is_none() {
            self.counts.skipped += 1;
            return Ok(());
        }
        self.counts.deliveries += 1;
        if self.batch_size > 1 && not_before <= self.now {
            self.batches[index].push((Member { id, target, device }, recipient));
            if self.batches[index].len() >= self.batch_size {
                self.flush_batch(index).await?;
            }
            return Ok(());
        }
        self.single(Member { id, target, device }, recipient, index, not_before)?;
        if self.pending.len() >= PAGE {
            self.flush().await?;
        }
        Ok(())
    }

    /// Adds the `push.<provider>` job of one delivery to what the next flush enqueues.
    fn single(
        &mut self,
        member: Member,
        recipient: String,
        index: usize,
        not_before: u64,
    ) -> Result<(), String> {
        let Some(notification) = self.parts[index].clone() else {
            return Ok(());
        };
        let kind = delivery_kind(member.target.provider);
        let delivery = Delivery {
            target: member.target,
            device: member.device,
            notification,
        };
        let payload = serde_json::to_vec(&delivery).map_err(|e| e.to_string())?;
        self.pending.push(NewJob {
            id: member.id,
            kind: kind.to_string(),
            group: self.uid.to_string(),
            recipient,
            payload: Bytes::from(payload),
            not_before,
            expire_at: self.expire_at,
            order_key: None,
        });
        Ok(())
    }

    /// Enqueues the waiting deliveries of provider `index` as one batch (a lone one as a
    /// single delivery: a batch of one costs more than it saves).
    async fn flush_batch(&mut self, index: usize) -> Result<(), String> {
        let waiting = std::mem::take(&mut self.batches[index]);
        let Some(notification) = self.parts[index].clone() else {
            return Ok(());
        };
        if waiting.len() <= 1 {
            for (member, recipient) in waiting {
                self.single(member, recipient, index, self.now)?;
            }
            return Ok(());
        }
        let (members, recipients): (Vec<Member>, Vec<String>) = waiting.into_iter().unzip();
        let batch = Batch {
            provider: Provider::ALL[index],
            notification,
            expire_at: self.expire_at,
            members,
        };
        let (job, members) = batch_jobs(self.uid, &batch, recipients, self.now)?;
        self.queue
            .enqueue_batch(job, members)
            .await
            .map_err(|e| format!("enqueueing a batch of deliveries: {e}"))?;
        self.wakeup.wake();
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), String> {
        for index in 0..self.batches.len() {
            self.flush_batch(index).await?;
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        let jobs = std::mem::take(&mut self.pending);
        self.queue
            .enqueue(jobs)
            .await
            .map_err(|e| format!("enqueueing deliveries: {e}"))?;
        self.wakeup.wake();
        Ok(())
    }
}
