//! A network namespace owned by one test, joined to the root namespace by a veth pair, in
//! which a node can run (`ip netns exec`) and whose traffic to one TCP port on the host side
//! (Redis) can be cut and restored, as a network partition between that node and Redis: the
//! node's own listener stays reachable from the host, so the test can still ask its `/ready`
//! and server API and keep its WebSocket clients connected.
//!
//! Layout: namespace `hrdt-PID-N`; host side `hPID-Na` with `10.A.B.C+1/30` in the root
//! namespace; namespace side `hPID-Nb` with `10.A.B.C+2/30`, loopback up. The /30 is picked
//! at random in 10.200.0.0–10.254.255.255 and checked against the addresses already in use,
//! so parallel tests (nextest runs each in its own process) do not collide.
//!
//! The cut needs no tc action module (the kernel here has none): the egress of each veth end
//! gets an `htb` root whose only class holds a `blackhole` qdisc, and a `u32` filter sends
//! into that class the TCP segments of the cut port — from the port on the host side, to it
//! on the namespace side. Everything else bypasses the class (htb's direct path, unshaped).
//! Both directions are dropped, silently (no RST, no ICMP): connections hang and new ones
//! time out, as in a real partition. Restoring deletes both qdiscs.
//!
//! Everything is deleted on drop, also when the test panics; namespaces left behind by a
//! test process that was killed are deleted by the next one. Needs root (CAP_NET_ADMIN,
//! CAP_SYS_ADMIN) and iproute2's `ip` and `tc`: without them it panics, naming what failed
//! (DESIGN.md, "Real components": never skip silently).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of the namespaces these tests create (`hrdt-PID-N`).
const PREFIX: &str = "hrdt-";

/// `name` from `PATH`, else from /usr/sbin or /sbin (where iproute2 lives; a test's `PATH`
/// may leave them out).
fn tool(name: &str) -> PathBuf {
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    from_path
        .or_else(|| {
            ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(|dir| Path::new(dir).join(name))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "`{name}` (iproute2) is not installed: the partition tests run a node in a \
                 network namespace (Debian: `apt-get install iproute2`)"
            )
        })
}

/// Runs `program args`; its stderr (or why it could not run) on failure.
fn run(program: &Path, args: &[&str]) -> Result<String, String> {
    let line = || format!("{} {}", program.display(), args.join(" "));
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("`{}` could not run: {e}", line()))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "`{}` failed ({}): {}",
            line(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Runs `program args`, panicking with `what` and the command's error on failure.
fn must(program: &Path, args: &[&str], what: &str) -> String {
    run(program, args).unwrap_or_else(|e| panic!("netns: {what}: {e}"))
}

/// A network namespace and its veth link to the root namespace; deleted on drop.
pub struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
    ip: PathBuf,
    tc: PathBuf,
    /// The port whose traffic is cut right now.
    cut: Mutex<Option<u16>>,
}

impl Netns {
    /// Creates the namespace, the veth pair and their addresses, and brings the links (and
    /// the namespace's loopback) up. Panics, saying why, if network namespaces are not
    /// available here.
    pub fn create() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let ip = tool("ip");
        let tc = tool("tc");
        remove_stale(&ip);
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{pid}-{n}");
        let (host_ip, ns_ip) = free_subnet(&ip, pid, n);
        if let Err(e) = run(&ip, &["netns", "add", &name]) {
            panic!(
                "network namespaces are not available here ({e}); the partition test runs a \
                 node in its own namespace and needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and \
                 a kernel with network namespaces"
            );
        }
        // From here on, drop deletes whatever was made.
        let netns = Self {
            host_if: format!("h{pid:x}-{n}a"),
            ns_if: format!("h{pid:x}-{n}b"),
            name,
            host_ip,
            ns_ip,
            ip,
            tc,
            cut: Mutex::new(None),
        };
        let (ip, ns) = (&netns.ip, netns.name.as_str());
        let (host_if, ns_if) = (netns.host_if.as_str(), netns.ns_if.as_str());
        must(
            ip,
            &[
                "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns,
            ],
            "create the veth pair",
        );
        let host_cidr = format!("{host_ip}/30");
        let ns_cidr = format!("{ns_ip}/30");
        must(
            ip,
            &["addr", "add", &host_cidr, "dev", host_if],
            "address the host side",
        );
        must(
            ip,
            &["link", "set", host_if, "up"],
            "bring the host side up",
        );
        must(
            ip,
            &["-n", ns, "addr", "add", &ns_cidr, "dev", ns_if],
            "address the namespace side",
        );
        must(
            ip,
            &["-n", ns, "link", "set", ns_if, "up"],
            "bring the namespace side up",
        );
        must(
            ip,
            &["-n", ns, "link", "set", "lo", "up"],
            "bring the namespace's loopback up",
        );
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The root namespace's end of the link (bind a server here for the namespace to reach).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// The namespace's address (what a server inside listens on, reachable from the host).
    pub fn ns_ip(&self) -> Ipv4Addr {
        self.ns_ip
    }

    /// The command prefix that runs a program inside the namespace (`ip netns exec NAME`).
    pub fn exec_prefix(&self) -> Vec<String> {
        vec![
            self.ip.display().to_string(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }

    /// Drops, in both directions, every TCP segment between the namespace and `port` on the
    /// host side; nothing else is touched. Panics if a cut is already in place.
    pub fn cut(&self, port: u16) {
        let mut cut = self.cut.lock().expect("cut lock");
        assert!(cut.is_none(), "netns {}: already cut ({cut:?})", self.name);
        let port_text = port.to_string();
        let host = format!("{}/32", self.host_ip);
        // Replies and pushes from the port, leaving the host.
        self.blackhole(
            &[],
            &self.host_if,
            &[
                "match", "ip", "src", &host, "match", "ip", "sport", &port_text, "0xffff",
            ],
        );
        // Requests to the port, leaving the namespace.
        self.blackhole(
            &["-n", &self.name],
            &self.ns_if,
            &[
                "match", "ip", "dst", &host, "match", "ip", "dport", &port_text, "0xffff",
            ],
        );
        *cut = Some(port);
    }

    /// Lets the cut port's traffic through again.
    pub fn restore(&self) {
        let mut cut = self.cut.lock().expect("cut lock");
        assert!(cut.is_some(), "netns {}: nothing to restore", self.name);
        must(
            &self.tc,
            &["qdisc", "del", "dev", &self.host_if, "root"],
            "remove the host side's cut",
        );
        must(
            &self.tc,
            &["-n", &self.name, "qdisc", "del", "dev", &self.ns_if, "root"],
            "remove the namespace side's cut",
        );
        *cut = None;
    }

    /// Packets the cut dropped so far (both directions), from the blackhole qdiscs'
    /// counters: evidence that the cut was hit, for assertions and failure messages.
    pub fn dropped(&self) -> u64 {
        let count = |netns: &[&str], dev: &str| {
            let mut args: Vec<&str> = netns.to_vec();
            args.extend(["-s", "qdisc", "show", "dev", dev]);
            let text = run(&self.tc, &args).unwrap_or_default();
            // "qdisc blackhole 10: parent 1:1\n Sent 0 bytes 0 pkt (dropped 7, ...".
            let mut lines = text.lines();
            let mut dropped = 0;
            while let Some(line) = lines.next() {
                if line.starts_with("qdisc blackhole")
                    && let Some(stats) = lines.next()
                    && let Some(rest) = stats.split("dropped ").nth(1)
                {
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    dropped += digits.parse::<u64>().unwrap_or(0);
                }
            }
            dropped
        };
        count(&[], &self.host_if) + count(&["-n", &self.name], &self.ns_if)
    }

    /// On `dev`'s egress: an htb root with one class holding a blackhole qdisc, and a u32
    /// filter sending TCP segments that match `matches` into it.
    fn blackhole(&self, netns: &[&str], dev: &str, matches: &[&str]) {
        let steps: [&[&str]; 4] = [
            &["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb"],
            &[
                "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate",
                "1mbit", "quantum", "1514",
            ],
            &[
                "qdisc",
                "add",
                "dev",
                dev,
                "parent",
                "1:1",
                "handle",
                "10:",
                "blackhole",
            ],
            &[
                "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                "match", "ip", "protocol", "6", "0xff",
            ],
        ];
        for (i, step) in steps.iter().enumerate() {
            let mut args: Vec<&str> = netns.to_vec();
            args.extend_from_slice(step);
            if i == 3 {
                args.extend_from_slice(matches);
                args.extend(["flowid", "1:1"]);
            }
            must(&self.tc, &args, &format!("cut traffic on {dev}"));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end deletes the pair (and the qdiscs on it); the namespace goes once
        // the last process in it has exited.
        let _ = run(&self.ip, &["link", "del", &self.host_if]);
        if let Err(e) = run(&self.ip, &["netns", "del", &self.name]) {
            eprintln!("netns: could not delete {}: {e}", self.name);
        }
    }
}

/// Deletes namespaces of this kind whose test process is gone (one killed by a timeout does
/// not run its drops). Their veth pairs go with them.
fn remove_stale(ip: &Path) {
    let Ok(list) = run(ip, &["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(ip, &["netns", "del", name]);
        }
    }
}

/// A /30 in 10.200.0.0–10.254.255.255 that no address on this host is in: (host side,
/// namespace side).
fn free_subnet(ip: &Path, pid: u32, n: u32) -> (Ipv4Addr, Ipv4Addr) {
    let in_use: Vec<Ipv4Addr> = run(ip, &["-4", "-o", "addr", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    // A small LCG over a seed of the process, the counter and the clock.
    let mut state = u64::from(pid) << 32 ^ u64::from(n) << 24 ^ u64::from(nanos);
    for _ in 0..64 {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let bits = (state >> 33) as u32;
        let second = 200 + (bits % 55) as u8;
        let third = ((bits / 55) % 256) as u8;
        let fourth = (((bits / 55 / 256) % 64) * 4) as u8;
        let base = Ipv4Addr::new(10, second, third, fourth);
        let taken = in_use
            .iter()
            .any(|addr| u32::from(*addr) & !3 == u32::from(base));
        if !taken {
            return (
                Ipv4Addr::new(10, second, third, fourth + 1),
                Ipv4Addr::new(10, second, third, fourth + 2),
            );
        }
    }
    panic!("netns: no free /30 in 10.200.0.0-10.254.255.255 after 64 tries: {in_use:?}");
}
