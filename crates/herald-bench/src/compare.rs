//! `herald-bench compare-table`: the one Markdown table `bench/run` prints, comparing Herald,
//! its peers and the ceiling server scenario by scenario, from the `fanout --json` and
//! `idle --json` reports of several interleaved runs.
//!
//! Owns only the arithmetic and formatting: medians over runs, Herald's share of the ceiling
//! (the median of the per-run ratios, each from runs made back to back, so a slow phase of
//! the machine affects both sides of a ratio alike), and the cells. Input is JSON lines, one
//! per run: `{"scenario":…,"kind":"fanout"|"idle","target":…,"run":N,"report":{…}}`, or with
//! `"error"` instead of `"report"` for a run that failed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use serde_json::Value;

/// Flags of `herald-bench compare-table`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// JSON lines, one per run.
    pub file: PathBuf,
    /// Columns, in order (target names as `fanout --target` takes them).
    #[arg(long, value_delimiter = ',', default_value = "herald,ceiling")]
    pub targets: Vec<String>,
    /// The column Herald is compared with.
    #[arg(long, default_value = "ceiling")]
    pub ceiling: String,
}

/// One run's line.
#[derive(Debug, Clone)]
struct Run {
    scenario: String,
    kind: String,
    target: String,
    run: u64,
    report: Option<Value>,
    error: Option<String>,
}

fn parse_line(line: &str) -> anyhow::Result<Run> {
    let value: Value = serde_json::from_str(line).context("a line is not JSON")?;
    let text = |key: &str| value[key].as_str().unwrap_or("").to_owned();
    Ok(Run {
        scenario: text("scenario"),
        kind: text("kind"),
        target: text("target"),
        run: value["run"].as_u64().unwrap_or(0),
        report: value.get("report").filter(|r| r.is_object()).cloned(),
        error: value
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// The median (the mean of the middle two for an even count); `None` for no values.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

/// `1234567.8` → `1,234,568`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ms(us: f64) -> String {
    if us >= 100_000.0 {
        format!("{:.2} s", us / 1e6)
    } else if us >= 10_000.0 {
        format!("{:.0} ms", us / 1000.0)
    } else {
        format!("{:.1} ms", us / 1000.0)
    }
}

fn size(bytes: f64) -> String {
    if bytes.abs() >= 10.0 * 1024.0 {
        format!("{:.0} KiB", bytes / 1024.0)
    } else {
        format!("{:.1} KiB", bytes / 1024.0)
    }
}

/// The value at a JSON pointer as a number.
fn num(report: &Value, pointer: &str) -> Option<f64> {
    report.pointer(pointer).and_then(Value::as_f64)
}

/// The runs of one cell, with the reports that exist.
struct Cell<'a> {
    runs: Vec<&'a Run>,
}

impl Cell<'_> {
    fn values(&self, pointer: &str) -> Vec<f64> {
        self.runs
            .iter()
            .filter_map(|r| r.report.as_ref().and_then(|rep| num(rep, pointer)))
            .collect()
    }

    /// Like [`Self::values`], from the runs that delivered something: a run in which nothing
    /// arrived within the drain has no latency and no cost per delivery (its report says 0).
    fn values_delivered(&self, pointer: &str) -> Vec<f64> {
        self.runs
            .iter()
            .filter_map(|r| r.report.as_ref())
            .filter(|rep| num(rep, "/deliveries_per_sec").is_some_and(|d| d > 0.0))
            .filter_map(|rep| num(rep, pointer))
            .collect()
    }

    /// Per run: the target publication rate × subscribers per channel.
    fn offered(&self) -> Vec<f64> {
        self.runs
            .iter()
            .filter_map(|r| {
                let report = r.report.as_ref()?;
                let channels = num(report, "/channels")?.max(1.0);
                Some(num(report, "/rate_target")? * num(report, "/subscribers")? / channels)
            })
            .collect()
    }

    fn ok(&self) -> usize {
        self.runs.iter().filter(|r| r.report.is_some()).count()
    }

    fn failure(&self) -> Option<String> {
        self.runs.iter().find_map(|r| r.error.clone())
    }

    /// `report` value by run number.
    fn by_run(&self, pointer: &str) -> BTreeMap<u64, f64> {
        self.runs
            .iter()
            .filter_map(|r| Some((r.run, num(r.report.as_ref()?, pointer)?)))
            .collect()
    }
}

/// The median over runs of `herald[run] ÷ ceiling[run]`, runs present on both sides.
fn paired_ratio(herald: &BTreeMap<u64, f64>, ceiling: &BTreeMap<u64, f64>) -> Option<f64> {
    let ratios: Vec<f64> = herald
        .iter()
        .filter_map(|(run, h)| {
            let c = ceiling.get(run)?;
            (*c > 0.0).then(|| h / c)
        })
        .collect();
    median(&ratios)
}

/// The median of `path` over a cell's runs, or what to show instead: a dash when the target
/// was not measured, the failure when no run reported it.
fn headline(cell: &Cell<'_>, path: &str) -> Result<f64, String> {
    if cell.runs.is_empty() {
        return Err("–".to_owned());
    }
    median(&cell.values(path)).ok_or_else(|| {
        format!(
            "failed ({})",
            cell.failure().unwrap_or_else(|| "no report".to_owned())
        )
    })
}

fn fanout_cell(cell: &Cell<'_>, ceiling: Option<&Cell<'_>>) -> String {
    let deliveries = match headline(cell, "/deliveries_per_sec") {
        Ok(deliveries) => deliveries,
        Err(text) => return text,
    };
    // Offered: the target rate to every subscriber. A server that is slow to answer its
    // publish requests also gets fewer publications than the target (the publisher keeps a
    // few requests in flight), so what it was sent is not the measure.
    let offered = median(&cell.offered()).unwrap_or(0.0);
    let mut text = format!("**{}/s**", thousands(deliveries));
    if offered > 0.0 && deliveries < 0.99 * offered {
        text.push_str(&format!(
            " ({:.0}% of offered)",
            100.0 * deliveries / offered
        ));
    }
    if let Some(p99) = median(&cell.values_delivered("/latency/p99_us")) {
        text.push_str(&format!("<br>p99 {}", ms(p99)));
    } else {
        text.push_str("<br>nothing arrived within the drain");
    }
    if let Some(cpu) = median(&cell.values_delivered("/server_cpu_us_per_delivery")) {
        text.push_str(&format!("<br>{cpu:.2} µs CPU/delivery"));
    }
    if let Some(missed) = median(&cell.values("/missed"))
        && missed > 0.0
    {
        text.push_str(&format!("<br>never arrived: {}", thousands(missed)));
    }
    if let Some(ceiling) = ceiling
        && let Some(ratio) = paired_ratio(
            &cell.by_run("/deliveries_per_sec"),
            &ceiling.by_run("/deliveries_per_sec"),
        )
    {
        text.push_str(&format!("<br>**{:.0}%** of ceiling", ratio * 100.0));
        if let Some(cost) = paired_ratio(
            &cell.by_run("/server_cpu_us_per_delivery"),
            &ceiling.by_run("/server_cpu_us_per_delivery"),
        ) {
            text.push_str(&format!(", {cost:.1}× its CPU"));
        }
    }
    if cell.ok() < cell.runs.len() {
        text.push_str(&format!(
            "<br>({} of {} runs ok)",
            cell.ok(),
            cell.runs.len()
        ));
    }
    text
}

fn idle_cell(cell: &Cell<'_>, ceiling: Option<&Cell<'_>>) -> String {
    let bytes = match headline(cell, "/bytes_per_connection") {
        Ok(bytes) => bytes,
        Err(text) => return text,
    };
    let mut text = format!("**{}**", size(bytes));
    let closed: f64 = cell.values("/setup/failed").iter().sum();
    if closed > 0.0 {
        text.push_str(&format!(" ({} failed to connect)", thousands(closed)));
    }
    if let Some(ceiling) = ceiling
        && let Some(ratio) = paired_ratio(
            &cell.by_run("/bytes_per_connection"),
            &ceiling.by_run("/bytes_per_connection"),
        )
    {
        text.push_str(&format!("<br>{ratio:.1}× ceiling"));
    }
    text
}

/// The table, from the JSON lines in `text`.
pub fn table(text: &str, targets: &[String], ceiling: &str) -> anyhow::Result<String> {
    let runs: Vec<Run> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_line)
        .collect::<anyhow::Result<_>>()?;
    // Scenarios in the order they first appear.
    let mut scenarios: Vec<(String, String)> = Vec::new();
    for run in &runs {
        if !scenarios.iter().any(|(s, _)| *s == run.scenario) {
            scenarios.push((run.scenario.clone(), run.kind.clone()));
        }
    }
    let mut out = String::from("| scenario |");
    for target in targets {
        out.push_str(&format!(" {} |", column_name(target)));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(targets.len()));
    out.push('\n');
    for (scenario, kind) in &scenarios {
        let cell_of = |target: &str| Cell {
            runs: runs
                .iter()
                .filter(|r| r.scenario == *scenario && r.target == target)
                .collect(),
        };
        let ceiling_cell = cell_of(ceiling);
        out.push_str(&format!("| {scenario} |"));
        for target in targets {
            let cell = cell_of(target);
            // Only Herald is compared with the ceiling in its cell.
            let compare =
                (target == "herald" && !ceiling_cell.runs.is_empty()).then_some(&ceiling_cell);
            let text = if kind == "idle" {
                idle_cell(&cell, compare)
            } else {
                fanout_cell(&cell, compare)
            };
            out.push_str(&format!(" {text} |"));
        }
        out.push('\n');
    }
    Ok(out)
}

fn column_name(target: &str) -> String {
    match target {
        "herald" => "**Herald**".to_owned(),
        "nats" => "NATS".to_owned(),
        "ws-node" => "Node `ws`".to_owned(),
        "socketio" => "Socket.IO".to_owned(),
        "sockudo" => "Sockudo".to_owned(),
        "pushpin" => "Pushpin (SSE)".to_owned(),
        "pushpin-ws" => "Pushpin (WebSocket)".to_owned(),
        "ceiling" => "ceiling".to_owned(),
        other => other.to_owned(),
    }
}

pub fn run(args: &CompareArgs) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    table(&text, &args.targets, &args.ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(scenario: &str, target: &str, run: u64, dps: f64, p99: f64, cpu: f64) -> String {
        serde_json::json!({
            "scenario": scenario, "kind": "fanout", "target": target, "run": run,
            "report": {
                "deliveries_per_sec": dps, "expected_deliveries_per_sec": dps,
                "rate_target": 200.0, "subscribers": 1000, "channels": 1,
                "latency": {"p99_us": p99}, "server_cpu_us_per_delivery": cpu, "missed": 0
            }
        })
        .to_string()
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(thousands(1234567.8), "1,234,568");
        assert_eq!(thousands(999.0), "999");
    }

    #[test]
    fn pushpin_columns_name_their_transport() {
        assert_eq!(column_name("pushpin"), "Pushpin (SSE)");
        assert_eq!(column_name("pushpin-ws"), "Pushpin (WebSocket)");
    }

    #[test]
    fn one_row_per_scenario_one_column_per_target() {
        let mut lines = vec![
            line("b", "herald", 1, 200000.0, 5000.0, 2.0),
            line("b", "ceiling", 1, 200000.0, 2000.0, 1.0),
            line("b", "herald", 2, 100000.0, 9000.0, 4.0),
            line("b", "ceiling", 2, 200000.0, 3000.0, 1.0),
            line("b", "herald", 3, 200000.0, 6000.0, 2.0),
            line("b", "ceiling", 3, 200000.0, 2500.0, 1.0),
            line("b", "nats", 1, 80000.0, 900000.0, 3.0),
        ];
        lines.push(
            r#"{"scenario":"b","kind":"fanout","target":"sockudo","run":1,"error":"exit 1"}"#
                .to_owned(),
        );
        lines.push(
            r#"{"scenario":"idle","kind":"idle","target":"herald","run":1,"report":{"bytes_per_connection":6500.0,"setup":{"failed":0}}}"#.to_owned(),
        );
        lines.push(
            r#"{"scenario":"idle","kind":"idle","target":"ceiling","run":1,"report":{"bytes_per_connection":2500.0,"setup":{"failed":0}}}"#.to_owned(),
        );
        let targets: Vec<String> = ["herald", "nats", "sockudo", "ceiling"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let table = table(&lines.join("\n"), &targets, "ceiling").expect("table");
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(rows.len(), 4, "{table}");
        assert_eq!(
            rows[0],
            "| scenario | **Herald** | NATS | Sockudo | ceiling |"
        );
        let herald = rows[2].split(" | ").nth(1).expect("herald cell");
        assert!(
            herald.starts_with("**200,000/s**<br>p99 6.0 ms"),
            "{herald}"
        );
        assert!(
            herald.contains("**100%** of ceiling, 2.0× its CPU"),
            "{herald}"
        );
        assert!(rows[2].contains("**80,000/s** (40% of offered)<br>p99 0.90 s"));
        assert!(rows[2].contains("failed (exit 1)"));
        let nothing = super::table(
            &[
                line("b", "pushpin-ws", 1, 0.0, 0.0, 0.0),
                line("b", "pushpin-ws", 2, 4000.0, 9e6, 400.0),
            ]
            .join("\n"),
            &["pushpin-ws".to_owned()],
            "ceiling",
        )
        .expect("table");
        assert!(
            nothing.contains("**2,000/s** (1% of offered)<br>p99 9.00 s<br>400.00 µs CPU/delivery"),
            "a run without deliveries has no latency to count: {nothing}"
        );
        let none = super::table(
            &line("b", "pushpin-ws", 1, 0.0, 0.0, 0.0),
            &["pushpin-ws".to_owned()],
            "ceiling",
        )
        .expect("table");
        assert!(
            none.contains("**0/s** (0% of offered)<br>nothing arrived within the drain |"),
            "{none}"
        );
        assert!(
            rows[3].contains("**6.3 KiB**<br>2.6× ceiling"),
            "{}",
            rows[3]
        );
        assert!(rows[3].ends_with("| – | – | **2.4 KiB** |"), "{}", rows[3]);
    }
}
