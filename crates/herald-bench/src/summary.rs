//! `herald-bench summarize`: turns the JSON lines of several `publish --json` runs into one
//! Markdown table row, so the bench scripts need no `jq` or Python.
//!
//! The row reports the median run by publications/s (its latencies and resource use, so the
//! numbers in a row all come from one real run) and the min–max throughput of all runs.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde::Deserialize;

/// Flags of `herald-bench summarize`.
#[derive(Debug, Clone, clap::Args)]
pub struct SummarizeArgs {
    /// First column of the row (e.g. the sync policy).
    #[arg(long)]
    pub label: String,
    /// Second column: where the server ran (e.g. "core 0").
    #[arg(long)]
    pub server_cores: String,
    /// File with one `publish --json` report per line (default: standard input).
    pub file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
struct Run {
    connections: usize,
    publications_per_sec: f64,
    errors: u64,
    latency: Latency,
    loadgen_cpu_percent: f64,
    #[serde(default)]
    loadgen_cpu_us_per_request: f64,
    server: Option<Server>,
    #[serde(default)]
    cores: Vec<Core>,
}

#[derive(Debug, Deserialize)]
struct Latency {
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
}

#[derive(Debug, Deserialize)]
struct Server {
    cpu_percent: f64,
    #[serde(default)]
    cpu_us_per_publication: f64,
    rss_bytes_peak: u64,
}

#[derive(Debug, Deserialize)]
struct Core {
    cpu: usize,
    busy_percent: f64,
}

/// The table header matching [`row`].
pub const HEADER: &str = "| setup | server on | conns | publications/s (median; min–max) | p50 | p99 | p99.9 | errors | server CPU (µs CPU/pub) | server RSS (peak) | load-gen CPU (µs CPU/req) | cores busy (all processes) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|";

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

/// One Markdown row from the reports in `text` (one JSON object per line).
pub fn row(label: &str, server_cores: &str, text: &str) -> anyhow::Result<String> {
    let mut runs: Vec<Run> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("run {} is not a publish report", i + 1))
        })
        .collect::<anyhow::Result<_>>()?;
    if runs.is_empty() {
        bail!("no runs to summarize");
    }
    runs.sort_by(|a, b| a.publications_per_sec.total_cmp(&b.publications_per_sec));
    let min = runs[0].publications_per_sec;
    let max = runs[runs.len() - 1].publications_per_sec;
    let errors: u64 = runs.iter().map(|r| r.errors).sum();
    let median = &runs[runs.len() / 2];
    let (server_cpu, server_rss) = match &median.server {
        Some(s) => (
            format!("{:.0}% ({:.1} µs)", s.cpu_percent, s.cpu_us_per_publication),
            format!("{:.1} MiB", s.rss_bytes_peak as f64 / 1048576.0),
        ),
        None => ("–".to_owned(), "–".to_owned()),
    };
    let cores: Vec<String> = median
        .cores
        .iter()
        .map(|c| format!("cpu{} {:.0}%", c.cpu, c.busy_percent))
        .collect();
    Ok(format!(
        "| {label} | {server_cores} | {} | **{:.0}** ({:.0}–{:.0}, {} run{}) | {} | {} | {} | {} | {server_cpu} | {server_rss} | {:.0}% ({:.1} µs) | {} |",
        median.connections,
        median.publications_per_sec,
        min,
        max,
        runs.len(),
        if runs.len() == 1 { "" } else { "s" },
        ms(median.latency.p50_us),
        ms(median.latency.p99_us),
        ms(median.latency.p999_us),
        errors,
        median.loadgen_cpu_percent,
        median.loadgen_cpu_us_per_request,
        cores.join(", ")
    ))
}

pub fn run(args: &SummarizeArgs) -> anyhow::Result<String> {
    let text = match &args.file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read standard input")?;
            text
        }
    };
    row(&args.label, &args.server_cores, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rate: f64, p50: u64) -> String {
        serde_json::json!({
            "connections": 64, "publications_per_sec": rate, "errors": 0,
            "latency": {"p50_us": p50, "p99_us": 2000, "p999_us": 3000},
            "loadgen_cpu_percent": 40.0,
            "server": {"cpu_percent": 99.0, "rss_bytes_peak": 30 * 1048576},
            "cores": [{"cpu": 0, "busy_percent": 100.0}, {"cpu": 1, "busy_percent": 41.0}]
        })
        .to_string()
    }

    #[test]
    fn median_run_is_reported() {
        let text = [
            report(30000.0, 900),
            report(10000.0, 100),
            report(20000.0, 500),
        ]
        .join("\n");
        let row = row("normal", "core 0", &text).expect("row");
        assert!(row.contains("**20000** (10000–30000, 3 runs)"), "{row}");
        assert!(row.contains("0.50 ms"), "{row}");
        assert!(row.contains("30.0 MiB"), "{row}");
        assert!(row.contains("cpu0 100%, cpu1 41%"), "{row}");
        assert_eq!(
            row.matches('|').count(),
            HEADER.lines().next().expect("header").matches('|').count()
        );
    }

    #[test]
    fn empty_input_is_an_error() {
        assert!(row("x", "y", "\n").is_err());
    }
}
