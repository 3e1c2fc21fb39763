//! What the `push` scenario measures besides the rates themselves: the processes' CPU and
//! memory over a phase ([`Meter`], from `/proc` through [`crate::sysstat`]) and the latency
//! of each notification, from the emulator's receipts matched to when the call that caused
//! it returned ([`match_receipts`]).
//!
//! Owns: one sampling task per phase (Herald's RSS every 200 ms). May touch: `/proc`.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::pushwire::Receipt;
use crate::sysstat::{self, CoreUsage, CpuSample, SystemSample};

/// Processes' resource use over one phase.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub herald_cpu_percent: Option<f64>,
    pub herald_cpu_us_per_push: Option<f64>,
    pub herald_rss_peak_bytes: Option<u64>,
    pub mock_cpu_percent: f64,
    pub loadgen_cpu_percent: f64,
    pub cores: Vec<CoreUsage>,
    /// CPU used by processes other than Herald, the emulator and this one, percent of one
    /// core: other work on the machine.
    pub others_cpu_percent: f64,
}

/// Samples CPU over a phase and Herald's RSS every 200 ms.
pub struct Meter {
    herald: Option<u32>,
    mock: u32,
    herald_cpu: Option<CpuSample>,
    mock_cpu: CpuSample,
    self_cpu: CpuSample,
    system: SystemSample,
    all_cpu: f64,
    started: Instant,
    peak: Arc<AtomicU64>,
    sampler: tokio::task::JoinHandle<()>,
}

impl Meter {
    pub fn start(herald: Option<u32>, mock: u32) -> anyhow::Result<Self> {
        let peak = Arc::new(AtomicU64::new(0));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                let Some(pid) = herald else { return };
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                loop {
                    tick.tick().await;
                    if let Ok(rss) = sysstat::tree_rss_bytes(pid) {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                }
            })
        };
        Ok(Self {
            herald,
            mock,
            herald_cpu: herald.map(CpuSample::read_tree).transpose()?,
            mock_cpu: CpuSample::read_tree(mock)?,
            self_cpu: CpuSample::read(None)?,
            system: SystemSample::read()?,
            all_cpu: sysstat::all_processes_cpu_seconds(),
            started: Instant::now(),
            peak,
            sampler,
        })
    }

    pub fn finish(self, pushes: u64) -> anyhow::Result<Usage> {
        self.sampler.abort();
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let herald_cpu = match (self.herald, &self.herald_cpu) {
            (Some(pid), Some(start)) => Some(CpuSample::read_tree(pid)?.percent_since(start)),
            _ => None,
        };
        if let Some(pid) = self.herald {
            self.peak
                .fetch_max(sysstat::tree_rss_bytes(pid)?, Ordering::Relaxed);
        }
        let mock_cpu = CpuSample::read_tree(self.mock)?.percent_since(&self.mock_cpu);
        let self_cpu = CpuSample::read(None)?.percent_since(&self.self_cpu);
        let all = (sysstat::all_processes_cpu_seconds() - self.all_cpu) / wall * 100.0;
        let ours = herald_cpu.unwrap_or(0.0) + mock_cpu + self_cpu;
        Ok(Usage {
            herald_cpu_percent: herald_cpu,
            herald_cpu_us_per_push: herald_cpu
                .filter(|_| pushes > 0)
                .map(|cpu| cpu * 1e4 * wall / pushes as f64),
            herald_rss_peak_bytes: self.herald.map(|_| self.peak.load(Ordering::Relaxed)),
            mock_cpu_percent: mock_cpu,
            loadgen_cpu_percent: self_cpu,
            cores: SystemSample::read()?.usage_since(&self.system),
            others_cpu_percent: (all - ours).max(0.0),
        })
    }
}

/// Latency percentiles (µs) from a call returning to the emulator's receipt.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// Receipts stamped before their call returned (counted as 0: the emulator's clock is
    /// in whole milliseconds, and a push can overtake its HTTP answer).
    pub before_return: u64,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000, 3).context("histogram")
}

/// Receipts of a phase: distinct deliveries, duplicates, latency, last receipt (Unix µs).
pub struct Matched {
    pub delivered: u64,
    pub duplicates: u64,
    pub latency: Latency,
    pub last_us: u64,
}

/// Matches receipts with sequence numbers `base..` to when their calls returned
/// (`returned(seq - base)`, Unix µs). `by_token`: every receipt has the same sequence number
/// (the fan-out); distinct ones are counted by token instead.
pub fn match_receipts(
    receipts: &[Receipt],
    seqs: std::ops::Range<u64>,
    returned: impl Fn(u64) -> Option<u64>,
    by_token: bool,
) -> anyhow::Result<Matched> {
    let mut histogram = histogram()?;
    let mut seen_seq = HashSet::new();
    let mut seen_token = HashSet::new();
    let (mut delivered, mut duplicates, mut before, mut last_us) = (0, 0, 0, 0);
    for receipt in receipts {
        let Some(seq) = receipt.seq.filter(|s| seqs.contains(s)) else {
            continue;
        };
        let fresh = if by_token {
            seen_token.insert(receipt.token.as_str())
        } else {
            seen_seq.insert(seq)
        };
        if !fresh {
            duplicates += 1;
            continue;
        }
        delivered += 1;
        let at_us = receipt.time_ms * 1000;
        last_us = last_us.max(at_us);
        let Some(returned) = returned(seq - seqs.start).filter(|r| *r > 0) else {
            continue;
        };
        if at_us < returned {
            before += 1;
        }
        histogram.saturating_record(at_us.saturating_sub(returned).max(1));
    }
    Ok(Matched {
        delivered,
        duplicates,
        latency: Latency {
            p50_us: histogram.value_at_quantile(0.50),
            p90_us: histogram.value_at_quantile(0.90),
            p99_us: histogram.value_at_quantile(0.99),
            max_us: histogram.max(),
            before_return: before,
        },
        last_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(seq: u64, time_ms: u64, token: &str) -> Receipt {
        Receipt {
            seq: Some(seq),
            time_ms,
            token: token.to_owned(),
        }
    }

    #[test]
    fn receipts_are_matched_to_their_calls() {
        let receipts = [
            receipt(1, 1_000, "a"),
            receipt(100, 1_010, "a"),
            receipt(101, 1_030, "b"),
            receipt(101, 1_031, "b"),
            receipt(102, 1_004, "c"),
        ];
        let returned = [1_000_000, 1_010_000, 1_005_000];
        let matched = match_receipts(
            &receipts,
            100..103,
            |k| returned.get(k as usize).copied(),
            false,
        )
        .expect("matched");
        assert_eq!((matched.delivered, matched.duplicates), (3, 1));
        assert_eq!(matched.last_us, 1_030_000);
        assert_eq!(matched.latency.before_return, 1);
        assert!((19_900..=20_100).contains(&matched.latency.max_us));

        let fanout = [receipt(2, 5, "a"), receipt(2, 6, "b"), receipt(2, 7, "a")];
        let matched = match_receipts(&fanout, 2..3, |_| Some(4_000), true).expect("matched");
        assert_eq!((matched.delivered, matched.duplicates), (2, 1));
    }
}
