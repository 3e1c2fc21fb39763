//! `herald-bench fanout-table`: Markdown table rows from `fanout --json` and `idle --json`
//! reports (one per line, one row each), so `bench/fanout` needs no `jq` or Python.
//!
//! Owns only formatting; reports are read leniently (missing fields print as `–`), so an
//! older report still makes a row.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::Value;

/// Which report kind the rows are made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Fanout,
    Idle,
}

/// Flags of `herald-bench fanout-table`.
#[derive(Debug, Clone, clap::Args)]
pub struct TableArgs {
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// Print the table header instead of rows.
    #[arg(long)]
    pub header: bool,
    /// First column of every row.
    #[arg(long, default_value = "")]
    pub label: String,
    /// Last column of every row (e.g. how busy the machine was).
    #[arg(long, default_value = "")]
    pub note: String,
    /// File with one report per line (default: standard input).
    pub file: Option<PathBuf>,
}

pub const FANOUT_HEADER: &str = "| scenario | subscribers × channels | publications/s (target) | deliveries/s (expected) | p50 | p99 | p99.9 | max | missed / dup | set-up conns/s | ended early | server CPU (µs/delivery) | server RSS (peak) | load-gen CPU (subscribers: µs/delivery) | cores busy | note |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|";

pub const IDLE_HEADER: &str = "| scenario | connections (measured) | channels | set-up conns/s | server RSS before → after | **bytes/connection** (anonymous) | kernel TCP buffers/conn (both ends) | open at end / closed early / pings answered | ≤ target? | note |\n|---|---:|---:|---:|---:|---:|---:|---:|---|---|";

fn num(value: &Value) -> Option<f64> {
    value.as_f64()
}

fn ms(value: &Value) -> String {
    num(value).map_or_else(|| "–".to_owned(), |us| format!("{:.2} ms", us / 1000.0))
}

fn mib(value: &Value) -> String {
    num(value).map_or_else(|| "–".to_owned(), |b| format!("{:.1} MiB", b / 1048576.0))
}

fn int(value: &Value) -> String {
    num(value).map_or_else(|| "–".to_owned(), |v| format!("{v:.0}"))
}

fn closed(value: &Value) -> String {
    let Some(map) = value.as_object() else {
        return "–".to_owned();
    };
    if map.is_empty() {
        return "0".to_owned();
    }
    map.iter()
        .map(|(how, n)| format!("{} × {how}", int(n)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn cores(value: &Value) -> String {
    value.as_array().map_or_else(String::new, |cores| {
        cores
            .iter()
            .map(|c| {
                format!(
                    "cpu{} {:.0}%",
                    int(&c["cpu"]),
                    num(&c["busy_percent"]).unwrap_or(0.0)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// One row from a `fanout --json` report.
pub fn fanout_row(label: &str, note: &str, r: &Value) -> String {
    let server = &r["server"];
    let server_cpu = match num(&server["cpu_percent"]) {
        Some(cpu) => format!(
            "{cpu:.0}% ({:.2} µs)",
            num(&r["server_cpu_us_per_delivery"]).unwrap_or(0.0)
        ),
        None => "–".to_owned(),
    };
    let note = match num(&r["other_processes_cpu_percent"]) {
        Some(other) if other > 15.0 => {
            format!("{note}; **busy during the run: other processes used {other:.0}% of a core**")
        }
        Some(other) => format!("{note}; {other:.0}% other during"),
        None => note.to_owned(),
    };
    format!(
        "| {label} | {} × {} | {} ({}) | **{}** ({}) | {} | {} | {} | {} | {} / {} | {} | {} | {server_cpu} | {} | {:.0}% ({:.2} µs) | {} | {note} |",
        int(&r["setup"]["subscribed"]),
        int(&r["channels"]),
        int(&r["publications_per_sec"]),
        int(&r["rate_target"]),
        int(&r["deliveries_per_sec"]),
        int(&r["expected_deliveries_per_sec"]),
        ms(&r["latency"]["p50_us"]),
        ms(&r["latency"]["p99_us"]),
        ms(&r["latency"]["p999_us"]),
        ms(&r["latency"]["max_us"]),
        int(&r["missed"]),
        int(&r["duplicates"]),
        int(&r["setup"]["per_sec"]),
        closed(&r["closed"]),
        mib(&server["rss_bytes_peak"]),
        num(&r["loadgen_cpu_percent"]).unwrap_or(0.0),
        num(&r["subscribers_cpu_us_per_delivery"]).unwrap_or(0.0),
        cores(&r["cores"]),
    )
}

/// One row from an `idle --json` report.
pub fn idle_row(label: &str, note: &str, r: &Value) -> String {
    let met = match r["target_met"].as_bool() {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "–",
    };
    format!(
        "| {label} | {} ({}) | {} | {} | {} → {} | **{}** ({}) | {} | {} / {} / {} | {met} (≤ {} B) | {note}{} |",
        int(&r["connections"]),
        int(&r["measured_connections"]),
        int(&r["channels"]),
        int(&r["setup"]["per_sec"]),
        mib(&r["before"]["rss_bytes"]),
        mib(&r["after"]["rss_bytes"]),
        int(&r["bytes_per_connection"]),
        int(&r["anon_bytes_per_connection"]),
        int(&r["tcp_kernel_bytes_per_connection"]),
        int(&r["still_open"]),
        closed(&r["closed"]),
        int(&r["pings_answered"]),
        int(&r["target_bytes_per_connection"]),
        if r["settled"].as_bool() == Some(false) {
            " (RSS did not settle)"
        } else {
            ""
        },
    )
}

pub fn run(args: &TableArgs) -> anyhow::Result<String> {
    if args.header {
        return Ok(match args.kind {
            Kind::Fanout => FANOUT_HEADER,
            Kind::Idle => IDLE_HEADER,
        }
        .to_owned());
    }
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
    let mut rows = Vec::new();
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let report: Value =
            serde_json::from_str(line).with_context(|| format!("report {} is not JSON", i + 1))?;
        rows.push(match args.kind {
            Kind::Fanout => fanout_row(&args.label, &args.note, &report),
            Kind::Idle => idle_row(&args.label, &args.note, &report),
        });
    }
    if rows.is_empty() {
        bail!("no reports to tabulate");
    }
    Ok(rows.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns(line: &str) -> usize {
        line.matches('|').count()
    }

    #[test]
    fn rows_match_their_headers() {
        let fanout = serde_json::json!({
            "setup": {"subscribed": 1000, "per_sec": 5000.0}, "channels": 1,
            "publications_per_sec": 99.8, "rate_target": 100.0,
            "deliveries_per_sec": 99800.0, "expected_deliveries_per_sec": 99800.0,
            "latency": {"p50_us": 1500, "p99_us": 4000, "p999_us": 9000, "max_us": 12000},
            "missed": 0, "duplicates": 0, "closed": {"3008": 2},
            "server": {"cpu_percent": 55.0, "rss_bytes_peak": 52428800},
            "server_cpu_us_per_delivery": 5.5, "loadgen_cpu_percent": 40.0,
            "subscribers_cpu_us_per_delivery": 3.9,
            "cores": [{"cpu": 0, "busy_percent": 60.0}],
            "other_processes_cpu_percent": 42.0
        });
        let row = fanout_row("ws broadcast", "quiet", &fanout);
        assert!(row.contains("| 1000 × 1 |"), "{row}");
        assert!(row.contains("**99800** (99800)"), "{row}");
        assert!(row.contains("1.50 ms"), "{row}");
        assert!(row.contains("2 × 3008"), "{row}");
        assert!(row.contains("50.0 MiB"), "{row}");
        assert!(
            row.contains("quiet; **busy during the run: other processes used 42%"),
            "{row}"
        );
        assert_eq!(
            columns(&row),
            columns(FANOUT_HEADER.lines().next().unwrap_or(""))
        );
        let idle = serde_json::json!({
            "connections": 10000, "measured_connections": 9900, "channels": 10000,
            "setup": {"per_sec": 3000.0}, "before": {"rss_bytes": 10485760},
            "after": {"rss_bytes": 104857600}, "bytes_per_connection": 9532.0,
            "anon_bytes_per_connection": 9500.0, "tcp_kernel_bytes_per_connection": 0.0,
            "still_open": 10000, "closed": {}, "pings_answered": 10000,
            "target_met": false, "target_bytes_per_connection": 4096, "settled": true
        });
        let row = idle_row("ws personal", "", &idle);
        assert!(row.contains("**9532** (9500)"), "{row}");
        assert!(row.contains("**no** (≤ 4096 B)"), "{row}");
        assert_eq!(
            columns(&row),
            columns(IDLE_HEADER.lines().next().unwrap_or(""))
        );
    }
}
