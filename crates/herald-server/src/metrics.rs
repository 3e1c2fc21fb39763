//! Prometheus metrics for one server instance.
//!
//! Uses a per-instance recorder (not the process-global one) so that several servers in one
//! test process keep separate numbers. Node counters are copied in at scrape time; API
//! request counts and latencies are recorded as they happen.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use herald_core::node::NodeStats;
use herald_transport::realtime::RealtimeState;
use metrics::{Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

const METADATA: Metadata<'static> = Metadata::new("herald", Level::INFO, Some(module_path!()));

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Job kinds the queue reported due before: reported as 0 once none is due (the queue
    /// leaves them out), so a lag gauge falls back instead of keeping its last value.
    due_kinds: parking_lot::Mutex<std::collections::BTreeSet<String>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let buckets = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        let builder = PrometheusBuilder::new();
        // Setting buckets only fails for an empty list.
        let builder = builder
            .set_buckets(&buckets)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        Self {
            recorder,
            handle,
            due_kinds: Default::default(),
        }
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> metrics::Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &METADATA)
    }

    fn gauge(&self, name: &'static str) -> metrics::Gauge {
        self.recorder
            .register_gauge(&Key::from_name(name), &METADATA)
    }

    /// Counts a connection refused by a limit (`reason`: server_full, per_ip, accept_rate).
    pub fn connection_refused(&self, reason: &'static str) {
        self.counter(
            "herald_connections_refused_total",
            vec![Label::new("reason", reason)],
        )
        .increment(1);
    }

    /// Counts one API request and its latency.
    pub fn api_request(&self, method: Option<crate::api::Method>, status: u16, elapsed: Duration) {
        let method = method.map_or("unknown", crate::api::Method::name);
        self.counter(
            "herald_api_requests_total",
            vec![
                Label::new("method", method),
                Label::new("status", status.to_string()),
            ],
        )
        .increment(1);
        self.recorder
            .register_histogram(
                &Key::from_parts(
                    "herald_api_request_duration_seconds",
                    vec![Label::new("method", method)],
                ),
                &METADATA,
            )
            .record(elapsed.as_secs_f64());
    }

    /// Counts one gRPC API call and its latency. `outcome`: `ok`, `error` (the method's own
    /// error, in the response's `error` field) or the gRPC status code (`unauthenticated`, …).
    pub fn grpc_request(
        &self,
        method: crate::api::Method,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        self.counter(
            "herald_grpc_requests_total",
            vec![
                Label::new("method", method.name()),
                Label::new("outcome", outcome),
            ],
        )
        .increment(1);
        self.recorder
            .register_histogram(
                &Key::from_parts(
                    "herald_grpc_request_duration_seconds",
                    vec![Label::new("method", method.name())],
                ),
                &METADATA,
            )
            .record(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition, with node counters brought up to date.
    pub fn render(
        &self,
        stats: &Arc<NodeStats>,
        realtime: &RealtimeState,
        channels: u64,
    ) -> String {
        let connections = realtime.connections.load(Ordering::Relaxed);
        let budget = &realtime.queue_budget;
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        self.counter("herald_publications_total", vec![])
            .absolute(load(&stats.publications));
        self.counter("herald_duplicate_publications_total", vec![])
            .absolute(load(&stats.duplicate_publications));
        self.counter("herald_history_writes_total", vec![])
            .absolute(load(&stats.history_writes));
        self.counter("herald_fanout_deliveries_total", vec![])
            .absolute(load(&stats.deliveries));
        self.counter("herald_fanout_dropped_total", vec![])
            .absolute(load(&stats.dropped_deliveries));
        self.counter("herald_errors_total", vec![])
            .absolute(load(&stats.errors));
        self.gauge("herald_connections").set(connections as f64);
        self.gauge("herald_channels").set(channels as f64);
        self.gauge("herald_outbound_queued_bytes")
            .set(budget.used() as f64);
        if budget.limit() != usize::MAX {
            self.gauge("herald_outbound_queued_bytes_limit")
                .set(budget.limit() as f64);
        }
        self.counter("herald_slow_disconnects_over_budget_total", vec![])
            .absolute(budget.closed_over_budget());
        self.handle.render()
    }

    /// The cluster engine's counters (`storage.engine = "redis"`).
    pub fn record_cluster(&self, cluster: &ClusterCounters) {
        self.gauge("herald_engine_healthy")
            .set(if cluster.healthy { 1.0 } else { 0.0 });
        self.counter("herald_engine_unreachable_errors_total", vec![])
            .absolute(cluster.unreachable_errors);
        self.counter("herald_engine_pubsub_reconnects_total", vec![])
            .absolute(cluster.reconnects);
        self.counter("herald_engine_gap_publications_healed_total", vec![])
            .absolute(cluster.healed);
        self.counter("herald_engine_unrecoverable_gaps_total", vec![])
            .absolute(cluster.unrecoverable);
    }
}

impl Metrics {
    /// Push counters per provider.
    pub fn record_push(&self, stats: &herald_outbound::push::PushStats) {
        use herald_core::device::Provider;
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        self.counter("herald_push_accepted_total", vec![])
            .absolute(load(&stats.accepted));
        for (index, provider) in Provider::ALL.into_iter().enumerate() {
            let label = || vec![Label::new("provider", provider.as_str())];
            self.counter("herald_push_sent_total", label())
                .absolute(load(&stats.sent[index]));
            self.counter("herald_push_failed_total", label())
                .absolute(load(&stats.failed[index]));
            self.counter("herald_push_retried_total", label())
                .absolute(load(&stats.retried[index]));
            self.counter("herald_push_devices_removed_total", label())
                .absolute(load(&stats.removed_devices[index]));
        }
    }

    /// Sink counters per sink, and each sink's backlog (publications its broker has not
    /// acknowledged yet).
    pub fn record_sinks(
        &self,
        sinks: &crate::sink::SinkRuntime,
        backlogs: &[(&str, crate::sink::SinkKind, Option<u64>)],
    ) {
        for (name, kind, backlog) in backlogs {
            if let Some(backlog) = backlog {
                self.recorder
                    .register_gauge(
                        &Key::from_parts(
                            "herald_sink_backlog",
                            vec![
                                Label::new("sink", name.to_string()),
                                Label::new("broker", kind.as_str()),
                            ],
                        ),
                        &METADATA,
                    )
                    .set(*backlog as f64);
            }
        }
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        for (name, kind, stats) in sinks.stats() {
            let label = || {
                vec![
                    Label::new("sink", name.to_string()),
                    Label::new("broker", kind.as_str()),
                ]
            };
            self.counter("herald_sink_delivered_total", label())
                .absolute(load(&stats.delivered));
            self.counter("herald_sink_retried_total", label())
                .absolute(load(&stats.retried));
            self.counter("herald_sink_rejected_total", label())
                .absolute(load(&stats.rejected));
        }
        self.counter("herald_sink_enqueue_errors_total", vec![])
            .absolute(sinks.enqueue_errors());
    }

    /// The outbound queue's due jobs per kind (its lag).
    pub fn record_outbound_due(&self, due: &[(String, u64)]) {
        let mut kinds = self.due_kinds.lock();
        kinds.extend(due.iter().map(|(kind, _)| kind.clone()));
        for kind in kinds.iter() {
            let count = due
                .iter()
                .find(|(due_kind, _)| due_kind == kind)
                .map_or(0, |(_, count)| *count);
            self.recorder
                .register_gauge(
                    &Key::from_parts(
                        "herald_outbound_jobs_due",
                        vec![Label::new("kind", kind.clone())],
                    ),
                    &METADATA,
                )
                .set(count as f64);
        }
    }

    /// Webhook counters.
    pub fn record_webhooks(&self, stats: &herald_outbound::webhook::WebhookStats) {
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        for (name, counter) in [
            ("herald_webhook_enqueued_total", &stats.enqueued),
            ("herald_webhook_delivered_total", &stats.delivered),
            (
                "herald_webhook_failed_attempts_total",
                &stats.failed_attempts,
            ),
            ("herald_webhook_dead_letters_total", &stats.dead),
            (
                "herald_webhook_endpoints_disabled_total",
                &stats.disabled_endpoints,
            ),
            ("herald_webhook_events_dropped_total", &stats.dropped_events),
        ] {
            self.counter(name, vec![]).absolute(load(counter));
        }
    }
}

impl Metrics {
    /// Each source's messages by result, its reconnects, whether it is connected, and its lag
    /// where the broker reports one (per partition too, for Kafka).
    pub fn record_sources(&self, sources: &[(String, Arc<herald_bridge::SourceStats>)]) {
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        for (name, stats) in sources {
            let label = || Label::new("source", name.clone());
            for (result, counter) in [
                ("published", &stats.published),
                ("duplicate", &stats.duplicates),
                ("rejected", &stats.rejected),
                ("failed", &stats.failed),
            ] {
                self.counter(
                    "herald_source_messages_total",
                    vec![label(), Label::new("result", result)],
                )
                .absolute(load(counter));
            }
            self.counter("herald_source_reconnects_total", vec![label()])
                .absolute(load(&stats.reconnects));
            let gauge = |name: &'static str| {
                self.recorder
                    .register_gauge(&Key::from_parts(name, vec![label()]), &METADATA)
            };
            gauge("herald_source_connected").set(if stats.connected.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            });
            if let Some(lag) = stats.lag() {
                gauge("herald_source_lag").set(lag as f64);
            }
            if let Some(assigned) = stats.assigned_partitions() {
                gauge("herald_source_assigned_partitions").set(assigned as f64);
            }
            for partition in stats.partition_lags() {
                let labels = vec![
                    label(),
                    Label::new("topic", partition.topic),
                    Label::new("partition", partition.partition.to_string()),
                ];
                self.recorder
                    .register_gauge(
                        &Key::from_parts("herald_source_partition_lag", labels),
                        &METADATA,
                    )
                    .set(partition.lag as f64);
            }
        }
    }
}

/// What [`Metrics::record_cluster`] exports.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClusterCounters {
    pub healthy: bool,
    pub unreachable_errors: u64,
    pub reconnects: u64,
    pub healed: u64,
    pub unrecoverable: u64,
}
