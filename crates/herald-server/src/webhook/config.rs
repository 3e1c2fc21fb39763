//! `[webhooks]`: whether webhooks are on, how deliveries are retried and timed, the egress
//! rule, how the queue's worker runs, and the endpoints defined in the file
//! (`[[webhooks.endpoints]]`, each the outbound crate's [`Endpoint`]).

use std::collections::BTreeSet;
use std::time::Duration;

use herald_core::duration::HumanDuration;
use herald_outbound::webhook::endpoint::Endpoint;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// The webhook worker, the publication and lifecycle observers and the API methods.
    pub enabled: bool,
    /// Delays between attempts (after the first, immediate one); the delivery is given up
    /// after the last. Standard Webhooks' schedule by default.
    pub retry_schedule: Vec<HumanDuration>,
    /// How long one request may take (an endpoint's own `timeout` wins).
    pub timeout: HumanDuration,
    /// An endpoint failing without any success for this long is disabled (and reported).
    pub disable_after: HumanDuration,
    /// Allow endpoints on private, loopback and link-local addresses. Off: refused (SSRF).
    pub allow_private_addresses: bool,
    /// Deliveries in flight at once on this node.
    pub concurrency: usize,
    /// Most jobs claimed at once.
    pub batch: usize,
    /// How long a claimed delivery belongs to this node (longer than any request).
    pub lease: HumanDuration,
    /// How often an idle worker looks for deliveries other nodes queued or that became due.
    pub poll_interval: HumanDuration,
    /// How long finished deliveries, attempts and dead letters are kept.
    pub status_retention: HumanDuration,
    /// How often retention is applied.
    pub maintenance_interval: HumanDuration,
    /// How often endpoints are re-read from the store (changes made on other nodes).
    pub refresh_interval: HumanDuration,
    /// Lifecycle events waiting to be queued; past it they are dropped (and counted).
    pub event_buffer: usize,
    pub endpoints: Vec<Endpoint>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        let schedule = [5, 300, 1800, 7200, 18000, 36000, 36000];
        Self {
            enabled: false,
            retry_schedule: schedule.map(HumanDuration::from_secs).to_vec(),
            timeout: HumanDuration::from_secs(15),
            disable_after: HumanDuration::from_secs(5 * 24 * 3600),
            allow_private_addresses: false,
            concurrency: 256,
            batch: 256,
            lease: HumanDuration::from_secs(60),
            poll_interval: HumanDuration(Duration::from_millis(500)),
            status_retention: HumanDuration::from_secs(7 * 24 * 3600),
            maintenance_interval: HumanDuration::from_secs(3600),
            refresh_interval: HumanDuration::from_secs(5),
            event_buffer: 65_536,
            endpoints: Vec::new(),
        }
    }
}

impl WebhooksConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        if self.timeout.is_zero() {
            return Err("webhooks.timeout must be above 0".into());
        }
        if self.concurrency == 0 || self.batch == 0 || self.event_buffer == 0 {
            return Err(
                "webhooks.concurrency, webhooks.batch and webhooks.event_buffer must be at least 1"
                    .into(),
            );
        }
        if self.poll_interval.is_zero() || self.refresh_interval.is_zero() {
            return Err(
                "webhooks.poll_interval and webhooks.refresh_interval must be above 0".into(),
            );
        }
        let mut ids = BTreeSet::new();
        for (index, endpoint) in self.endpoints.iter().enumerate() {
            endpoint
                .validate()
                .map_err(|e| format!("webhooks.endpoints[{index}]: {e}"))?;
            if !ids.insert(endpoint.id.as_str()) {
                return Err(format!(
                    "webhooks.endpoints[{index}]: id {:?} is used twice",
                    endpoint.id
                ));
            }
        }
        let longest = self
            .endpoints
            .iter()
            .filter_map(|e| e.timeout)
            .chain([self.timeout])
            .max()
            .map_or(Duration::ZERO, HumanDuration::as_duration);
        if self.lease.as_duration() < longest + Duration::from_secs(5) {
            return Err(format!(
                "webhooks.lease must exceed the longest timeout ({longest:?}) by at least 5s"
            ));
        }
        Ok(())
    }

    /// The longest timeout a new endpoint (server API) may ask for under this lease.
    pub fn max_endpoint_timeout(&self) -> Duration {
        self.lease
            .as_duration()
            .saturating_sub(Duration::from_secs(5))
    }
}
