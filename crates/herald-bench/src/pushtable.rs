//! The `push` scenario's output: the text report of one run ([`print`]), and
//! `herald-bench push-table`, the Markdown table of `docs/benchmarks.md`'s push section from
//! the JSON lines of several `herald-bench push --json` runs: per provider and phase the
//! median pushes/s with the range over the runs, the bare sender's median beside it and the
//! ratio, and the latency and resource use of the median run.
//!
//! Owns: nothing but the formatting. May touch: the files it is given (read only).

use std::path::PathBuf;

use anyhow::Context;
use serde_json::Value;

use crate::pushbench::PushReport;
use crate::pushmeasure::Usage;

/// Flags of `herald-bench push-table`.
#[derive(Debug, Clone, clap::Args)]
pub struct PushTableArgs {
    /// Files of `herald-bench push --json` lines (one run per line).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

const HEADER: &str = "| provider | phase | pushes per run | Herald pushes/s (median; min–max) | bare sender /s (median; min–max) | Herald ÷ bare | latency p50 / p99 | API answers p50 / p99 | Herald CPU (µs/push) | Herald RSS peak | emulator CPU | load gen CPU | other processes | runs |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn ms_table(us: u64) -> String {
    if us >= 100_000 {
        format!("{:.0} ms", us as f64 / 1000.0)
    } else {
        format!("{:.1} ms", us as f64 / 1000.0)
    }
}

/// Median (upper of the two middle ones), min and max of `values`, with the index of the
/// median in the input.
fn median(values: &[f64]) -> (f64, f64, f64, usize) {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|a, b| values[*a].total_cmp(&values[*b]));
    let Some(&mid) = order.get(values.len() / 2) else {
        return (0.0, 0.0, 0.0, 0);
    };
    let min = order.first().map_or(0.0, |i| values[*i]);
    let max = order.last().map_or(0.0, |i| values[*i]);
    (values[mid], min, max, mid)
}

fn range(values: &[f64]) -> String {
    let (mid, min, max, _) = median(values);
    if values.len() > 1 {
        format!("**{mid:.0}** ({min:.0}–{max:.0})")
    } else {
        format!("**{mid:.0}**")
    }
}

fn usage_cells(usage: &Value, herald: bool) -> [String; 5] {
    let herald_cpu = if herald {
        format!(
            "{:.0}% ({:.1})",
            f(&usage["herald_cpu_percent"]),
            f(&usage["herald_cpu_us_per_push"])
        )
    } else {
        "—".to_owned()
    };
    let rss = if herald {
        format!(
            "{:.0} MiB",
            u(&usage["herald_rss_peak_bytes"]) as f64 / 1048576.0
        )
    } else {
        "—".to_owned()
    };
    [
        herald_cpu,
        rss,
        format!("{:.0}%", f(&usage["mock_cpu_percent"])),
        format!("{:.0}%", f(&usage["loadgen_cpu_percent"])),
        format!("{:.0}%", f(&usage["others_cpu_percent"])),
    ]
}

/// The table for `runs` (parsed `push --json` reports).
pub fn table(runs: &[Value]) -> anyhow::Result<String> {
    let first = runs.first().context("no runs")?;
    let mut out = vec![HEADER.to_owned()];
    for (p, provider) in first["providers"]
        .as_array()
        .context("no providers")?
        .iter()
        .enumerate()
    {
        let name = provider["provider"].as_str().unwrap_or("?");
        let of_run = |run: &Value| run["providers"][p].clone();
        let bare: Vec<Value> = runs
            .iter()
            .map(|r| of_run(r)["bare"].clone())
            .filter(|b| !b.is_null())
            .collect();
        let bare_rates: Vec<f64> = bare.iter().map(|b| f(&b["per_sec"])).collect();
        let bare_median = median(&bare_rates).0;
        let phases = provider["phases"].as_array().cloned().unwrap_or_default();
        for (k, phase) in phases.iter().enumerate() {
            let same: Vec<Value> = runs
                .iter()
                .map(|r| of_run(r)["phases"][k].clone())
                .filter(|ph| ph["phase"] == phase["phase"])
                .collect();
            let rates: Vec<f64> = same.iter().map(|ph| f(&ph["pushes_per_sec"])).collect();
            let (mid, _, _, at) = median(&rates);
            let run = &same[at];
            let label = match run["phase"].as_str().unwrap_or("?") {
                "fanout" => "fan-out: 1 request → every device".to_owned(),
                "rate" => format!(
                    "request path, {:.0} req/s offered",
                    f(&run["offered_per_sec"])
                ),
                "max" => "request path, max rate".to_owned(),
                other => other.to_owned(),
            };
            let missing = u(&run["expected"]).saturating_sub(u(&run["delivered"]));
            let pushes = if missing > 0 || u(&run["duplicates"]) > 0 {
                format!(
                    "{} ({missing} missing, {} dup)",
                    u(&run["delivered"]),
                    u(&run["duplicates"])
                )
            } else {
                u(&run["delivered"]).to_string()
            };
            let [cpu, rss, mock, loadgen, others] = usage_cells(&run["usage"], true);
            let ratio = if bare_median > 0.0 {
                format!("{:.0}%", mid * 100.0 / bare_median)
            } else {
                "—".to_owned()
            };
            let api = if run["phase"] == "fanout" {
                ms_table(u(&run["api_p50_us"]))
            } else {
                format!(
                    "{} / {}",
                    ms_table(u(&run["api_p50_us"])),
                    ms_table(u(&run["api_p99_us"]))
                )
            };
            out.push(format!(
                "| {name} | {label} | {pushes} | {} | {} | {ratio} | {} / {} | {api} | {cpu} | {rss} | {mock} | {loadgen} | {others} | {} |",
                range(&rates),
                if bare_rates.is_empty() { "—".to_owned() } else { range(&bare_rates) },
                ms_table(u(&run["latency"]["p50_us"])),
                ms_table(u(&run["latency"]["p99_us"])),
                rates.len()
            ));
        }
        if !bare.is_empty() {
            let (_, _, _, at) = median(&bare_rates);
            let b = &bare[at];
            // The sender is a thread of the load generator: its own CPU is shown apart.
            let mut usage = b["usage"].clone();
            usage["loadgen_cpu_percent"] = (f(&usage["loadgen_cpu_percent"])
                - f(&b["cpu_percent"]))
            .max(0.0)
            .into();
            let [_, _, mock, loadgen, others] = usage_cells(&usage, false);
            out.push(format!(
                "| {name} | bare HTTP/2 sender ({} in flight, sender CPU {:.0}% = {:.1} µs/push) | {} | — | {} | — | RTT {} / {} | — | — | — | {mock} | {loadgen} | {others} | {} |",
                first["concurrency"],
                f(&b["cpu_percent"]),
                f(&b["cpu_us_per_push"]),
                u(&b["sent"]),
                range(&bare_rates),
                ms_table(u(&b["rtt_p50_us"])),
                ms_table(u(&b["rtt_p99_us"])),
                bare_rates.len()
            ));
        }
    }
    Ok(out.join("\n"))
}

/// Reads the files and renders the table.
pub fn run(args: &PushTableArgs) -> anyhow::Result<String> {
    let mut runs = Vec::new();
    for path in &args.files {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            runs.push(
                serde_json::from_str::<Value>(line)
                    .with_context(|| format!("bad JSON line in {}", path.display()))?,
            );
        }
    }
    table(&runs)
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("—".to_owned(), |b| {
        format!("{:.0} MiB", b as f64 / 1048576.0)
    })
}

fn cores(usage: &Usage) -> String {
    usage
        .cores
        .iter()
        .map(|c| format!("cpu{} {:.0}%", c.cpu, c.busy_percent))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The report as text.
pub fn print(report: &PushReport) {
    println!(
        "push: {} devices, concurrency {} (fan-out {}), claim batch {}, {} API connections, rate {}/s, {:.0}s phases",
        report.devices,
        report.concurrency,
        report.fanout_concurrency,
        report.claim_batch,
        report.connections,
        report.rate,
        report.duration_s
    );
    for p in &report.providers {
        println!(
            "{}: registered {} devices in {:.1}s ({:.0}/s)",
            p.provider.name(),
            p.devices,
            p.register_seconds,
            p.registered_per_sec
        );
        let ceiling = p.bare.as_ref().map(|b| b.sender.per_sec);
        for ph in &p.phases {
            let ratio = ceiling
                .filter(|c| *c > 0.0)
                .map(|c| format!(" ({:.0}% of the ceiling)", ph.pushes_per_sec * 100.0 / c))
                .unwrap_or_default();
            println!(
                "  {:<6} {:>6} of {:>6} delivered ({} dup) in {:.2}s: {:.0} pushes/s{ratio}; API {:.0}/s (p50 {}, p99 {}), drain {:.2}s",
                format!("{:?}", ph.phase).to_lowercase(),
                ph.delivered,
                ph.expected,
                ph.duplicates,
                ph.seconds,
                ph.pushes_per_sec,
                ph.api_per_sec,
                ms(ph.api_p50_us),
                ms(ph.api_p99_us),
                ph.drain_seconds
            );
            let u = &ph.usage;
            println!(
                "         latency p50 {} p90 {} p99 {} max {}; Herald CPU {:.0}% ({:.1} µs/push), RSS peak {}; emulator {:.0}%; load gen {:.0}%; others {:.0}%; {}",
                ms(ph.latency.p50_us),
                ms(ph.latency.p90_us),
                ms(ph.latency.p99_us),
                ms(ph.latency.max_us),
                u.herald_cpu_percent.unwrap_or(0.0),
                u.herald_cpu_us_per_push.unwrap_or(0.0),
                mib(u.herald_rss_peak_bytes),
                u.mock_cpu_percent,
                u.loadgen_cpu_percent,
                u.others_cpu_percent,
                cores(u)
            );
            if let Some(error) = &ph.first_error {
                println!("         {} API errors, first: {error}", ph.api_errors);
            }
            if !ph.refused.is_empty() {
                println!("         emulator refused: {:?}", ph.refused);
            }
        }
        if let Some(b) = &p.bare {
            println!(
                "  bare   {:>6} sent ({} failed, {} accepted) in {:.2}s: {:.0} pushes/s; RTT p50 {} p99 {}; sender CPU {:.0}% ({:.1} µs/push); emulator {:.0}%; others {:.0}%; {}",
                b.sender.sent,
                b.sender.failed,
                b.accepted_by_mock,
                b.sender.seconds,
                b.sender.per_sec,
                ms(b.sender.rtt_p50_us),
                ms(b.sender.rtt_p99_us),
                b.sender.cpu_percent,
                b.sender.cpu_us_per_push,
                b.usage.mock_cpu_percent,
                b.usage.others_cpu_percent,
                cores(&b.usage)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ranges() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0, 2));
        assert_eq!(range(&[5.0]), "**5**");
        assert_eq!(range(&[5.0, 7.0, 6.0]), "**6** (5–7)");
    }

    #[test]
    fn renders_a_run() {
        let usage = serde_json::json!({"herald_cpu_percent": 90.0, "herald_cpu_us_per_push": 45.0,
            "herald_rss_peak_bytes": 50u64 << 20, "mock_cpu_percent": 60.0,
            "loadgen_cpu_percent": 5.0, "others_cpu_percent": 0.0});
        let run = serde_json::json!({"concurrency": 256, "providers": [{"provider": "apns",
            "phases": [{"phase": "fanout", "pushes_per_sec": 10000.0, "expected": 100,
                "delivered": 100, "duplicates": 0, "api_p50_us": 900, "api_p99_us": 900,
                "latency": {"p50_us": 5000, "p99_us": 9000}, "usage": usage}],
            "bare": {"per_sec": 40000.0, "sent": 1000, "cpu_percent": 80.0,
                "cpu_us_per_push": 20.0, "rtt_p50_us": 6000, "rtt_p99_us": 9000,
                "usage": usage}}]});
        let table = table(&[run]).expect("table");
        assert!(table.contains("| apns | fan-out"), "{table}");
        assert!(table.contains("| 25% |"), "{table}");
        assert!(table.contains("bare HTTP/2 sender"), "{table}");
    }
}
