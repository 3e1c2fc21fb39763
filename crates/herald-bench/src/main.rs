//! `herald-bench`: load generators for Herald, one subcommand per scenario.
//!
//! Owns the command line, CPU pinning and the runtime the scenario runs on. Scenarios live in
//! their own modules and only talk to a server over the network.

mod bridgebench;
mod bridgesrc;
mod ceiling;
mod compare;
mod fanout;
mod grpcbench;
mod grpcwire;
mod hookrecv;
mod idle;
mod mqtt;
mod peerpub;
mod peersub;
mod publish;
mod publisher;
mod push;
mod pushapi;
mod pushbare;
mod pushbench;
mod pusher;
mod pushmeasure;
mod pushprocs;
mod pushtable;
mod pushwire;
mod rawhttp;
mod redisstat;
mod spawn;
mod sseclient;
mod storm;
mod summary;
mod sysstat;
mod table;
mod target;
#[cfg(test)]
mod testserver;
mod worker;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "herald-bench", version, about = "Load generator for Herald")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sustained publishes over the HTTP server API (`POST /api/publish`).
    Publish(publish::PublishArgs),
    /// Publishes/s over gRPC (unary and batch) beside the HTTP API, and fan-out latency to
    /// uni gRPC stream subscribers beside WebSocket subscribers, in one run.
    Grpc(Box<grpcbench::GrpcArgs>),
    /// Print the Markdown table header used by `summarize`.
    SummaryHeader,
    /// Turn JSON lines from several `publish --json` runs into one Markdown table row.
    Summarize(summary::SummarizeArgs),
    /// Subscribers over WebSocket or SSE (in worker processes), a publisher at a fixed rate:
    /// deliveries/s, publish-to-receive latency, missed/duplicate publications.
    Fanout(Box<fanout::FanoutArgs>),
    /// Server memory per idle subscribed connection (RSS growth ÷ connections).
    Idle(idle::IdleArgs),
    /// Markdown table rows (or the header) from `fanout --json` / `idle --json` reports.
    FanoutTable(table::TableArgs),
    /// The bare fan-out WebSocket server Herald is compared with (the machine's ceiling):
    /// `GET /sub/<channel>` (WebSocket) subscribes, `POST /pub/<channel>` publishes the body.
    CeilingServer(ceiling::CeilingArgs),
    /// The Markdown table comparing Herald, its peers and the ceiling (`bench/run`), from
    /// JSON lines of `fanout --json` / `idle --json` reports.
    CompareTable(compare::CompareArgs),
    /// A reconnect storm: every client drops at once, misses publications, reconnects at
    /// once and resumes; time until every client has everything.
    Storm(storm::StormArgs),
    /// Push notifications through the durable queue to the APNs/FCM emulators (fan-out and
    /// request path), beside a bare HTTP/2 sender to the same emulator (the ceiling).
    Push(Box<pushbench::PushArgs>),
    /// The Markdown table of the push section from `push --json` lines (several runs).
    PushTable(pushtable::PushTableArgs),
    /// Webhook deliveries/s to a local receiver and messages/s from Kafka and JetStream into
    /// durable channels, each beside the bare receiver's / broker consumer's rate.
    Bridge(Box<bridgebench::BridgeArgs>),
    /// One process of `fanout`/`idle` subscribers (started by them, not by hand).
    #[command(hide = true)]
    FanoutWorker(worker::WorkerArgs),
    /// One process of `storm` clients (started by it, not by hand).
    #[command(hide = true)]
    StormWorker(storm::StormWorkerArgs),
}

/// Parses `15s`, `500ms`, `2m`, `1.5s` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?} (try 15s, 500ms, 1m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {text:?} (ms, s, m)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the Tokio runtime")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Publish(args) => {
            if let Some(cpu) = args.cpu {
                // Before the runtime exists, so every thread it starts inherits the mask.
                sysstat::pin_current_thread(cpu)?;
            }
            let report = runtime(args.threads)?.block_on(publish::run(&args))?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                report.print_text();
            }
            Ok(())
        }
        Command::Grpc(args) => {
            let report = runtime(args.threads)?.block_on(grpcbench::run(&args))?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                report.print_text();
            }
            Ok(())
        }
        Command::Fanout(args) => {
            if let Some(cpu) = args.cpu {
                // Worker processes inherit the mask too.
                sysstat::pin_current_thread(cpu)?;
            }
            let report = runtime(1)?.block_on(fanout::run(&args))?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                report.print_text();
            }
            Ok(())
        }
        Command::Idle(args) => {
            if let Some(cpu) = args.cpu {
                sysstat::pin_current_thread(cpu)?;
            }
            let report = runtime(1)?.block_on(idle::run(&args))?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                report.print_text();
            }
            Ok(())
        }
        Command::FanoutTable(args) => {
            println!("{}", table::run(&args)?);
            Ok(())
        }
        Command::Storm(args) => {
            if let Some(cpu) = args.cpu {
                // Worker processes inherit the mask too.
                sysstat::pin_current_thread(cpu)?;
            }
            let report = runtime(1)?.block_on(storm::run(&args))?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                storm::print(&report);
            }
            Ok(())
        }
        Command::Push(args) => {
            if let Some(cpu) = args.cpu.0 {
                // Before the runtime exists, so every thread it starts inherits the mask.
                sysstat::pin_current_thread(cpu)?;
            }
            let report = runtime(1)?.block_on(pushbench::run(&args))?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                pushtable::print(&report);
            }
            Ok(())
        }
        Command::Bridge(args) => {
            let report = runtime(2)?.block_on(bridgebench::run(&args))?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                report.print_text();
            }
            Ok(())
        }
        Command::PushTable(args) => {
            println!("{}", pushtable::run(&args)?);
            Ok(())
        }
        Command::FanoutWorker(args) => worker::run(&args),
        Command::StormWorker(args) => storm::run_worker(&args),
        Command::CeilingServer(args) => ceiling::run(&args),
        Command::CompareTable(args) => {
            print!("{}", compare::run(&args)?);
            Ok(())
        }
        Command::SummaryHeader => {
            println!("{}", summary::HEADER);
            Ok(())
        }
        Command::Summarize(args) => {
            println!("{}", summary::run(&args)?);
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("herald-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("5h").is_err());
    }
}
