//! Real `redis-server` processes owned by one test: a primary on a free 127.0.0.1 port (and on
//! other addresses when asked: [`RedisOptions::extra_bind`]) with its own temp dir (persistence off, or AOF with `appendfsync always`), that can be SIGKILLed and
//! restarted on the same port and dir; replicas of it; and three Sentinels watching it (quorum
//! 2) for failover tests. Everything is killed on drop.
//!
//! Commands go through a tiny blocking RESP2 client ([`command`]), so no `redis-cli` process
//! is spawned per call. The binary is `$REDIS_SERVER_BIN`, else `redis-server` from `PATH`
//! (Debian's `redis-server` package, 7.x); a test fails at once, naming it, when it is
//! missing (DESIGN.md, "Real components": never skip silently).

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh (or restarted) redis-server may take to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The `redis-server` binary, or a panic that says how to get one.
pub fn redis_server_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("REDIS_SERVER_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "REDIS_SERVER_BIN={} is not a file",
            path.display()
        );
        return path;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("redis-server"))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "redis-server is not installed (not in PATH, REDIS_SERVER_BIN unset): the cluster \
             tests start their own Redis processes. Install it (Debian: `apt-get install \
             redis-server`, or `scripts/test nextest`, which does) or set REDIS_SERVER_BIN."
        )
    })
}

/// A port nothing listens on right now (the OS picks it).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

// ---------------------------------------------------------------------------------------------
// RESP

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    /// `None`: the nil bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None`: the nil array.
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The text of a simple or bulk string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Resp::Simple(text) => Some(text),
            Resp::Bulk(Some(bytes)) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Resp::Int(n) => Some(*n),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Resp]> {
        match self {
            Resp::Array(Some(items)) => Some(items),
            _ => None,
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Resp::Error(_))
    }

    /// A flat `[key, value, key, value, ...]` array (what SENTINEL REPLICAS returns per
    /// entry) as pairs.
    pub fn pairs(&self) -> Vec<(String, String)> {
        let items = self.as_array().unwrap_or_default();
        items
            .chunks(2)
            .filter_map(|pair| match pair {
                [k, v] => Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())),
                _ => None,
            })
            .collect()
    }
}

impl fmt::Display for Resp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resp::Simple(text) => write!(f, "{text}"),
            Resp::Error(text) => write!(f, "(error) {text}"),
            Resp::Int(n) => write!(f, "(integer) {n}"),
            Resp::Bulk(None) | Resp::Array(None) => write!(f, "(nil)"),
            Resp::Bulk(Some(bytes)) => write!(f, "{:?}", String::from_utf8_lossy(bytes)),
            Resp::Array(Some(items)) => {
                write!(f, "[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{item}")?;
                }
                write!(f, "]")
            }
        }
    }
}

fn read_reply(reader: &mut impl BufRead) -> std::io::Result<Resp> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "redis closed the connection",
        ));
    }
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(line.len().min(1));
    let number = || {
        rest.parse::<i64>()
            .map_err(|_| bad(format!("bad RESP line {line:?}")))
    };
    Ok(match kind {
        "+" => Resp::Simple(rest.to_owned()),
        "-" => Resp::Error(rest.to_owned()),
        ":" => Resp::Int(number()?),
        "$" => match usize::try_from(number()?) {
            Err(_) => Resp::Bulk(None),
            Ok(len) => {
                let mut bytes = vec![0; len + 2];
                reader.read_exact(&mut bytes)?;
                bytes.truncate(len);
                Resp::Bulk(Some(bytes))
            }
        },
        "*" => match usize::try_from(number()?) {
            Err(_) => Resp::Array(None),
            Ok(len) => Resp::Array(Some(
                (0..len)
                    .map(|_| read_reply(reader))
                    .collect::<Result<_, _>>()?,
            )),
        },
        _ => return Err(bad(format!("unexpected RESP line {line:?}"))),
    })
}

/// Runs one command on the Redis (or Sentinel) at 127.0.0.1:`port` on a fresh connection.
/// An `-ERR` reply is `Ok(Resp::Error)`; only I/O failures are `Err`.
pub fn command(port: u16, args: &[&str]) -> std::io::Result<Resp> {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    stream.write_all(&request)?;
    read_reply(&mut BufReader::new(stream))
}

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `max` bytes of a log file, for failure messages.
fn log_tail(path: &Path, max: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    format!("--- {} ---\n{}", path.display(), &text[start..])
}

// ---------------------------------------------------------------------------------------------
// One redis-server (or sentinel) process

/// How a [`RedisProcess`] persists, and where it listens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RedisOptions {
    /// `appendonly yes` + `appendfsync always`: every acknowledged write survives SIGKILL and
    /// is loaded back by [`RedisProcess::restart`]. Off: no persistence at all (no RDB either).
    pub aof: bool,
    /// Addresses to listen on besides 127.0.0.1 (same port), e.g. the host side of a
    /// [`Netns`](super::netns::Netns) link so a node in the namespace can reach it. Each must
    /// be assigned to an interface already.
    pub extra_bind: Vec<IpAddr>,
}

/// A `redis-server` this test owns, on 127.0.0.1:[`port`](Self::port), killed on drop.
pub struct RedisProcess {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    config: PathBuf,
    sentinel: bool,
}

impl RedisProcess {
    /// A primary without persistence.
    pub fn start() -> Self {
        Self::start_with(RedisOptions::default())
    }

    /// A primary with AOF and `appendfsync always`.
    pub fn start_aof() -> Self {
        Self::start_with(RedisOptions {
            aof: true,
            ..RedisOptions::default()
        })
    }

    pub fn start_with(options: RedisOptions) -> Self {
        let persistence = if options.aof {
            "appendonly yes\nappendfsync always\n"
        } else {
            "appendonly no\n"
        };
        Self::spawn_bound(persistence, false, &options.extra_bind)
    }

    /// A replica of `primary` (no persistence), returned once its link to the primary is up.
    pub fn start_replica_of(primary: &RedisProcess) -> Self {
        let replica = Self::spawn_with_config(
            &format!("appendonly no\nreplicaof 127.0.0.1 {}\n", primary.port),
            false,
        );
        wait_until(
            &format!("replica {} to sync with {}", replica.port, primary.port),
            Duration::from_secs(15),
            || {
                let info = replica.try_cli(&["INFO", "replication"]).ok()?;
                info.as_str()?
                    .contains("master_link_status:up")
                    .then_some(())
            },
        );
        replica
    }

    /// Writes `redis.conf` (port, dir, log, no RDB snapshots, plus `extra`) in a new temp dir
    /// and starts the server (a Sentinel with `sentinel`), retrying on another port if the
    /// chosen one was taken in between.
    fn spawn_with_config(extra: &str, sentinel: bool) -> Self {
        Self::spawn_bound(extra, sentinel, &[])
    }

    /// [`spawn_with_config`](Self::spawn_with_config), listening on `extra_bind` as well as
    /// 127.0.0.1.
    fn spawn_bound(extra: &str, sentinel: bool, extra_bind: &[IpAddr]) -> Self {
        let bind: String = std::iter::once("127.0.0.1".to_owned())
            .chain(extra_bind.iter().map(IpAddr::to_string))
            .collect::<Vec<_>>()
            .join(" ");
        let bin = redis_server_bin();
        let mut last_failure = String::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("herald-redis-")
                .tempdir()
                .expect("tempdir");
            let port = free_port();
            let config = dir.path().join(if sentinel {
                "sentinel.conf"
            } else {
                "redis.conf"
            });
            let text = format!(
                "port {port}\nbind {bind}\nprotected-mode no\ndaemonize no\ndir {dir}\nlogfile {log}\nsave \"\"\n{extra}",
                dir = dir.path().display(),
                log = dir.path().join("redis.log").display(),
            );
            std::fs::write(&config, text).expect("write redis.conf");
            let mut process = RedisProcess {
                child: None,
                port,
                dir,
                config,
                sentinel,
            };
            match process.launch(&bin) {
                Ok(()) => return process,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("redis-server did not start on any of 5 free ports; last failure:\n{last_failure}");
    }

    /// Spawns the process on this port and dir and waits until it answers (as itself).
    fn launch(&mut self, bin: &Path) -> Result<(), String> {
        let mut server = Command::new(bin);
        server.arg(&self.config);
        if self.sentinel {
            server.arg("--sentinel");
        }
        let child = server
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("child");
            // Ours, not another test's server that took the port first.
            // PONG (not -LOADING): an AOF is loaded back before it answers.
            if answers_as(self.port, child.id())
                && command(self.port, &["PING"]).ok() == Some(Resp::Simple("PONG".into()))
            {
                return Ok(());
            }
            if let Some(status) = child.try_wait().expect("try_wait") {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited with {status}: {stderr}\n{}",
                    self.port,
                    log_tail(&self.log_path(), 2000)
                ));
            }
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "redis-server on port {} did not answer PING within {START_TIMEOUT:?}\n{}",
                    self.port,
                    log_tail(&self.log_path(), 2000)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`, as `redis.addresses` takes it.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis://IP:PORT`: the same server on another of its addresses (see
    /// [`RedisOptions::extra_bind`]).
    pub fn url_on(&self, ip: IpAddr) -> String {
        format!("redis://{ip}:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The end of the server's log, for failure messages.
    pub fn log(&self) -> String {
        log_tail(&self.log_path(), 4000)
    }

    /// Runs `args` as one command; panics if Redis cannot be reached (an error reply is
    /// returned as [`Resp::Error`]).
    pub fn cli(&self, args: &[&str]) -> Resp {
        self.try_cli(args).unwrap_or_else(|e| {
            panic!(
                "redis on port {}: {args:?} failed: {e}\n{}",
                self.port,
                self.log()
            )
        })
    }

    pub fn try_cli(&self, args: &[&str]) -> std::io::Result<Resp> {
        command(self.port, args)
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| child.try_wait().ok().flatten().is_none())
    }

    /// SIGKILL (no shutdown, no final fsync), then waits for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and dir (so an AOF is loaded back). Kills it
    /// first if it is still running.
    pub fn restart(&mut self) {
        self.kill();
        let bin = redis_server_bin();
        let deadline = Instant::now() + START_TIMEOUT;
        // The port is ours, but a connection of the killed process may briefly hold it.
        loop {
            match self.launch(&bin) {
                Ok(()) => return,
                Err(failure) if Instant::now() > deadline => {
                    panic!(
                        "redis-server could not restart on port {}: {failure}",
                        self.port
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// `role` from `INFO replication` ("master" or "slave"), if it answers.
    pub fn role(&self) -> Option<String> {
        let info = self.try_cli(&["INFO", "replication"]).ok()?;
        info.as_str()?
            .lines()
            .find_map(|line| line.strip_prefix("role:"))
            .map(|role| role.trim().to_owned())
    }
}

/// Whether the server on `port` answers and is process `pid` (INFO's `process_id`).
fn answers_as(port: u16, pid: u32) -> bool {
    let Ok(info) = command(port, &["INFO", "server"]) else {
        return false;
    };
    info.as_str().is_some_and(|text| {
        text.lines()
            .any(|line| line.trim() == format!("process_id:{pid}"))
    })
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Sentinel

/// Three `redis-server --sentinel` processes monitoring one primary as `master_name`, quorum
/// 2, `down-after-milliseconds 1000`, `failover-timeout 3000`.
pub struct Sentinels {
    pub master_name: String,
    pub processes: Vec<RedisProcess>,
}

impl Sentinels {
    /// Starts the three and returns once every one of them sees the primary, its replicas
    /// (`replicas` of them) and the two other sentinels, and reports the quorum reachable.
    pub fn start(primary: &RedisProcess, master_name: &str, replicas: usize) -> Self {
        let config = format!(
            "sentinel monitor {master_name} 127.0.0.1 {port} 2\n\
             sentinel down-after-milliseconds {master_name} 1000\n\
             sentinel failover-timeout {master_name} 3000\n\
             sentinel parallel-syncs {master_name} 1\n",
            port = primary.port()
        );
        let processes: Vec<RedisProcess> = (0..3)
            .map(|_| RedisProcess::spawn_with_config(&config, true))
            .collect();
        let sentinels = Self {
            master_name: master_name.to_owned(),
            processes,
        };
        for sentinel in &sentinels.processes {
            wait_until(
                &format!(
                    "sentinel {} to discover {replicas} replica(s) and 2 other sentinels",
                    sentinel.port()
                ),
                Duration::from_secs(20),
                || {
                    let others = sentinel
                        .try_cli(&["SENTINEL", "SENTINELS", master_name])
                        .ok()?;
                    let known_replicas = sentinel
                        .try_cli(&["SENTINEL", "REPLICAS", master_name])
                        .ok()?;
                    let healthy = known_replicas
                        .as_array()?
                        .iter()
                        .filter(|entry| {
                            entry
                                .pairs()
                                .iter()
                                .any(|(k, v)| k == "flags" && v == "slave")
                        })
                        .count();
                    let quorum = sentinel
                        .try_cli(&["SENTINEL", "CKQUORUM", master_name])
                        .ok()?;
                    (others.as_array()?.len() == 2 && healthy >= replicas && !quorum.is_error())
                        .then_some(())
                },
            );
        }
        sentinels
    }

    /// `redis://127.0.0.1:PORT` of each sentinel, as `redis.sentinels[].addresses` takes them.
    pub fn addresses(&self) -> Vec<String> {
        self.processes.iter().map(RedisProcess::url).collect()
    }

    /// The primary's port as the first sentinel that answers reports it.
    pub fn master_port(&self) -> Option<u16> {
        self.processes.iter().find_map(|sentinel| {
            let reply = sentinel
                .try_cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.master_name])
                .ok()?;
            reply.as_array()?.get(1)?.as_str()?.parse().ok()
        })
    }

    /// `SENTINEL FAILOVER`: promote a replica now, without waiting for the primary to fail.
    pub fn failover(&self) {
        let reply = self.processes[0].cli(&["SENTINEL", "FAILOVER", &self.master_name]);
        assert_eq!(
            reply,
            Resp::Simple("OK".into()),
            "SENTINEL FAILOVER {}",
            self.master_name
        );
    }

    /// Waits until every sentinel names a primary other than `old_port` and that server says
    /// it is a primary; returns its port.
    pub fn wait_for_new_master(&self, old_port: u16, timeout: Duration) -> u16 {
        wait_until(
            &format!("the sentinels to promote a new primary instead of port {old_port}"),
            timeout,
            || {
                let mut ports = self.processes.iter().map(|sentinel| {
                    let reply = sentinel
                        .try_cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.master_name])
                        .ok()?;
                    reply.as_array()?.get(1)?.as_str()?.parse::<u16>().ok()
                });
                let first = ports.next()??;
                if first == old_port || !ports.all(|port| port == Some(first)) {
                    return None;
                }
                let role = command(first, &["ROLE"]).ok()?;
                (role.as_array()?.first()?.as_str()? == "master").then_some(first)
            },
        )
    }
}
