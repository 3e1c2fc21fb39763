//! What a Redis says it ran: `INFO commandstats` (calls per command since start or the last
//! `CONFIG RESETSTAT`), read by `fanout --redis` at both edges of the measured window, so the
//! commands a cluster of Herald nodes sends per publication can be counted.
//!
//! Owns a tiny RESP exchange: one `INFO commandstats` per connection, the bulk reply parsed
//! into (command, calls). Commands a Lua script runs (`redis.call`) are counted by Redis too,
//! under their own names, next to the `EVALSHA` that ran the script. May touch: the network
//! (only the Redis it is given).

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `host:port` from `redis://[user:password@]host:port[/db]` or a bare `host:port`.
pub fn address_of(url: &str) -> anyhow::Result<String> {
    let rest = url.strip_prefix("redis://").unwrap_or(url);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let host_port = rest.split('/').next().unwrap_or(rest);
    if host_port.is_empty() {
        bail!("no host in Redis address {url:?}");
    }
    Ok(if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:6379")
    })
}

/// One command's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stat {
    pub calls: u64,
    /// Time Redis spent running it, µs (a script's includes the commands it ran).
    pub usec: u64,
}

/// Counters per command (`cmdstat_<name>:calls=N,usec=M,…` lines).
pub fn parse_commandstats(info: &str) -> BTreeMap<String, Stat> {
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| -> Option<u64> {
                fields
                    .split(',')
                    .find_map(|field| field.strip_prefix(key)?.strip_prefix('='))?
                    .parse()
                    .ok()
            };
            Some((
                name.to_owned(),
                Stat {
                    calls: field("calls")?,
                    usec: field("usec").unwrap_or(0),
                },
            ))
        })
        .collect()
}

/// `INFO commandstats` of the Redis at `url`.
pub async fn commandstats(url: &str) -> anyhow::Result<BTreeMap<String, Stat>> {
    let address = address_of(url)?;
    let mut stream = TcpStream::connect(&address)
        .await
        .with_context(|| format!("cannot connect to Redis at {address}"))?;
    stream
        .write_all(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        .await?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            bail!("Redis at {address} closed the connection before answering INFO");
        }
        reply.extend_from_slice(&chunk[..read]);
        if let Some(text) = complete_bulk(&reply)? {
            return Ok(parse_commandstats(text));
        }
    }
}

/// The text of a complete RESP bulk string reply, `None` while more is to come.
fn complete_bulk(reply: &[u8]) -> anyhow::Result<Option<&str>> {
    let Some(header_end) = reply.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let header = std::str::from_utf8(&reply[..header_end]).context("bad RESP header")?;
    let length: usize = match header.strip_prefix('$') {
        Some(length) => length.parse().context("bad RESP bulk length")?,
        None => bail!("Redis answered INFO with {header:.200}"),
    };
    let body = header_end + 2;
    if reply.len() < body + length {
        return Ok(None);
    }
    Ok(Some(
        std::str::from_utf8(&reply[body..body + length]).context("INFO reply is not UTF-8")?,
    ))
}

/// Every shard's commands added up.
pub async fn commandstats_all(urls: &[String]) -> anyhow::Result<BTreeMap<String, Stat>> {
    let mut total: BTreeMap<String, Stat> = BTreeMap::new();
    for url in urls {
        for (name, stat) in commandstats(url).await? {
            let sum = total.entry(name).or_default();
            sum.calls += stat.calls;
            sum.usec += stat.usec;
        }
    }
    Ok(total)
}

/// The commands Redis ran over the measured window, all shards added up (the `INFO` calls
/// that read them left out).
#[derive(Debug, Serialize)]
pub struct RedisCommands {
    pub shards: usize,
    /// Calls and time per command in the window.
    pub calls: BTreeMap<String, Stat>,
    /// Calls per command ÷ publications in the window.
    pub per_publication: BTreeMap<String, f64>,
    /// `evalsha` + `eval` + `fcall` calls ÷ publications: scripts sent by the nodes.
    pub scripts_per_publication: f64,
    /// Every call ÷ publications (commands run inside scripts included).
    pub all_per_publication: f64,
    /// Time Redis spent running scripts (the commands in them included) ÷ publications, µs:
    /// without reading requests and writing replies and pub/sub messages, which the Redis
    /// process's CPU (`--aux-pid`) includes.
    pub scripts_usec_per_publication: f64,
}

impl RedisCommands {
    pub fn between(
        shards: usize,
        before: &BTreeMap<String, Stat>,
        after: &BTreeMap<String, Stat>,
        publications: u64,
    ) -> Self {
        let calls: BTreeMap<String, Stat> = after
            .iter()
            .filter(|(name, _)| name.as_str() != "info")
            .map(|(name, stat)| {
                let earlier = before.get(name).copied().unwrap_or_default();
                let window = Stat {
                    calls: stat.calls.saturating_sub(earlier.calls),
                    usec: stat.usec.saturating_sub(earlier.usec),
                };
                (name.clone(), window)
            })
            .filter(|(_, stat)| stat.calls > 0)
            .collect();
        let per = |n: u64| n as f64 / publications.max(1) as f64;
        const SCRIPTS: [&str; 5] = ["evalsha", "eval", "fcall", "evalsha_ro", "eval_ro"];
        let scripts: u64 = SCRIPTS
            .iter()
            .filter_map(|name| calls.get(*name))
            .map(|stat| stat.calls)
            .sum();
        let scripts_usec: u64 = SCRIPTS
            .iter()
            .filter_map(|name| calls.get(*name))
            .map(|stat| stat.usec)
            .sum();
        Self {
            shards,
            per_publication: calls
                .iter()
                .map(|(k, s)| (k.clone(), per(s.calls)))
                .collect(),
            scripts_per_publication: per(scripts),
            all_per_publication: per(calls.values().map(|stat| stat.calls).sum()),
            scripts_usec_per_publication: scripts_usec as f64 / publications.max(1) as f64,
            calls,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            address_of("redis://127.0.0.1:7000").expect("address"),
            "127.0.0.1:7000"
        );
        assert_eq!(
            address_of("redis://u:p@127.0.0.1:7000/2").expect("address"),
            "127.0.0.1:7000"
        );
        assert_eq!(address_of("localhost").expect("address"), "localhost:6379");
    }

    #[test]
    fn commandstats_lines_and_differences() {
        let before = parse_commandstats(
            "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=5,usec_per_call=0.5,rejected_calls=0,failed_calls=0\r\ncmdstat_info:calls=1,usec=1\r\n",
        );
        let after = parse_commandstats(
            "# Commandstats\r\ncmdstat_evalsha:calls=110,usec=5\r\ncmdstat_xadd:calls=100,usec=5\r\ncmdstat_client|list:calls=2,usec=1\r\ncmdstat_info:calls=3,usec=1\r\n",
        );
        assert_eq!(after["client|list"].calls, 2);
        let window = RedisCommands::between(1, &before, &after, 100);
        assert_eq!(window.calls["evalsha"].calls, 100);
        assert!(!window.calls.contains_key("info"));
        assert_eq!(window.scripts_per_publication, 1.0);
        assert!((window.all_per_publication - 2.02).abs() < 1e-9);
    }

    #[test]
    fn bulk_replies_are_read_whole() {
        assert_eq!(complete_bulk(b"$5\r\nhel").expect("complete"), None);
        assert_eq!(
            complete_bulk(b"$5\r\nhello\r\n").expect("complete"),
            Some("hello")
        );
        assert!(complete_bulk(b"-ERR no\r\n").is_err());
    }
}
