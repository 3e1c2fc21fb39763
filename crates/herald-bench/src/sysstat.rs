//! What the operating system says about a process: CPU time and resident memory from
//! `/proc`, and pinning the current thread to one core.
//!
//! Owns nothing but these reads; it never signals or otherwise touches the processes it
//! looks at. Linux only.
//!
//! Also the memory breakdown the idle-connection scenario reports ([`memory_detail`]).
//!
//! A server may be several processes (Pushpin runs five; a wrapper may start the real
//! server): the `*_tree` readings add up a process and all its descendants.

use std::time::Instant;

use anyhow::Context;

/// CPU time a process has used so far (all its threads, user + system), and when it was read.
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    seconds: f64,
    at: Instant,
}

impl CpuSample {
    /// Reads `/proc/<pid>/stat` (`pid` `None`: this process).
    pub fn read(pid: Option<u32>) -> anyhow::Result<Self> {
        let path = match pid {
            Some(pid) => format!("/proc/{pid}/stat"),
            None => "/proc/self/stat".to_owned(),
        };
        Self::read_path(&path)
    }

    /// CPU time of the calling thread alone (`/proc/thread-self/stat`).
    pub fn read_thread() -> anyhow::Result<Self> {
        Self::read_path("/proc/thread-self/stat")
    }

    fn read_path(path: &str) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
        let at = Instant::now();
        // The command name (field 2) is in parentheses and may hold spaces: count fields
        // from the last ')'. utime and stime are fields 14 and 15 of the whole line.
        let rest = text
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .context("unexpected /proc/<pid>/stat format")?;
        let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
        let field = |n: usize| -> anyhow::Result<u64> {
            // `rest` starts at field 3 (state).
            let value = fields.get(n - 3).context("short /proc/<pid>/stat line")?;
            value
                .parse::<u64>()
                .with_context(|| format!("bad field {n} in {path}"))
        };
        let ticks = field(14)? + field(15)?;
        Ok(Self {
            seconds: ticks as f64 / rustix::param::clock_ticks_per_second() as f64,
            at,
        })
    }

    /// CPU time of `pid` and every process descended from it (those alive now).
    pub fn read_tree(pid: u32) -> anyhow::Result<Self> {
        let mut total = Self::read(Some(pid))?;
        for child in descendants(pid) {
            if let Ok(sample) = Self::read(Some(child)) {
                total.seconds += sample.seconds;
            }
        }
        Ok(total)
    }

    /// Two samples taken together (of different processes) as one: their CPU times added,
    /// the later reading time.
    pub fn plus(&self, other: &Self) -> Self {
        Self {
            seconds: self.seconds + other.seconds,
            at: self.at.max(other.at),
        }
    }

    /// CPU used between `earlier` and `self`, as a percentage of one core (above 100 when
    /// several threads ran at once).
    pub fn percent_since(&self, earlier: &Self) -> f64 {
        let wall = self.at.saturating_duration_since(earlier.at).as_secs_f64();
        if wall <= 0.0 {
            return 0.0;
        }
        (self.seconds - earlier.seconds).max(0.0) / wall * 100.0
    }
}

/// Per-CPU time counters from `/proc/stat` (in clock ticks), to see how busy each core was
/// in total, including processes other than the two under test, and hypervisor steal.
#[derive(Clone, Debug)]
pub struct SystemSample {
    /// `(cpu index, [user, nice, system, idle, iowait, irq, softirq, steal])`.
    cpus: Vec<(usize, [u64; 8])>,
}

/// How one core spent a window, in percent of that window.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CoreUsage {
    pub cpu: usize,
    /// user + nice + system + irq + softirq: everything that ran on it.
    pub busy_percent: f64,
    /// Time the hypervisor ran something else while this core wanted to run.
    pub steal_percent: f64,
    pub idle_percent: f64,
}

impl SystemSample {
    pub fn read() -> anyhow::Result<Self> {
        let text = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
        let mut cpus = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("cpu") else {
                continue;
            };
            let mut fields = rest.split_ascii_whitespace();
            // The aggregate line is "cpu  …"; per-core lines are "cpuN …".
            let Some(Ok(index)) = fields.next().map(str::parse::<usize>) else {
                continue;
            };
            let mut values = [0u64; 8];
            for value in &mut values {
                *value = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            }
            cpus.push((index, values));
        }
        Ok(Self { cpus })
    }

    /// Per-core usage between `earlier` and `self`.
    pub fn usage_since(&self, earlier: &Self) -> Vec<CoreUsage> {
        self.cpus
            .iter()
            .filter_map(|(cpu, now)| {
                let (_, then) = earlier.cpus.iter().find(|(c, _)| c == cpu)?;
                let delta: Vec<u64> = now
                    .iter()
                    .zip(then)
                    .map(|(a, b)| a.saturating_sub(*b))
                    .collect();
                let total: u64 = delta.iter().sum();
                if total == 0 {
                    return None;
                }
                let pct = |ticks: u64| ticks as f64 * 100.0 / total as f64;
                let busy = delta[0] + delta[1] + delta[2] + delta[5] + delta[6];
                Some(CoreUsage {
                    cpu: *cpu,
                    busy_percent: pct(busy),
                    steal_percent: pct(delta[7]),
                    idle_percent: pct(delta[3] + delta[4]),
                })
            })
            .collect()
    }
}

/// Resident set size of `pid` in bytes (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .with_context(|| format!("no VmRSS in {path}"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("bad VmRSS line {line:?}"))?;
    Ok(kib * 1024)
}

/// Every process descended from `pid` (children, their children, …), from the parent ids in
/// `/proc/<pid>/stat`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in entries.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Field 4 (ppid); `rest` starts at field 3 (state).
        if let Some(parent) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_ascii_whitespace().nth(1)?.parse().ok())
        {
            parents.push((child, parent));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(child, _) in parents.iter().filter(|(_, p)| *p == parent) {
            if !out.contains(&child) && child != pid {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// RSS of `pid` and every process descended from it.
pub fn tree_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let own = rss_bytes(pid)?;
    Ok(own
        + descendants(pid)
            .into_iter()
            .filter_map(|child| rss_bytes(child).ok())
            .sum::<u64>())
}

/// CPU seconds used so far by every user-space process on the machine (kernel threads left
/// out), children that have exited and been reaped included (`cutime`/`cstime`), so the
/// difference of two readings also counts processes that started or ended in between. Take
/// the processes under test away from it to see what else competed.
pub fn all_processes_cpu_seconds() -> f64 {
    let ticks_per_second = rustix::param::clock_ticks_per_second() as f64;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path();
        // Kernel threads have an empty command line.
        if std::fs::read(path.join("cmdline")).map_or(true, |c| c.is_empty()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        // Fields 14–17 (utime, stime, cutime, cstime); `rest` starts at field 3.
        ticks += rest
            .split_ascii_whitespace()
            .skip(11)
            .take(4)
            .filter_map(|v| v.parse::<u64>().ok())
            .sum::<u64>();
    }
    ticks as f64 / ticks_per_second
}

/// Where a process's memory is, for the idle-connection scenario: `/proc/<pid>/status`,
/// `/proc/<pid>/smaps_rollup` and its open files, plus the kernel's memory for all TCP
/// sockets on the machine (`/proc/net/sockstat`; not part of any process's RSS).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MemoryDetail {
    pub rss_bytes: u64,
    /// `RssAnon`: heap, stacks, and other private memory.
    pub rss_anon_bytes: u64,
    /// `RssFile`: mapped files (the executable, libraries).
    pub rss_file_bytes: u64,
    /// `Private_Dirty` from `smaps_rollup`.
    pub private_dirty_bytes: u64,
    pub threads: u64,
    pub open_files: u64,
    /// `TCP: inuse` in `/proc/net/sockstat` (machine-wide).
    pub tcp_sockets: u64,
    /// `TCP: mem` in `/proc/net/sockstat`, in bytes (machine-wide socket buffers).
    pub tcp_kernel_bytes: u64,
}

/// `key:  N kB` lines of a `/proc` file, as bytes.
fn kib_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_ascii_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Reads [`MemoryDetail`] of `pid`.
pub fn memory_detail(pid: u32) -> anyhow::Result<MemoryDetail> {
    let status_path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&status_path)
        .with_context(|| format!("cannot read {status_path}"))?;
    // smaps_rollup needs ptrace access (same user); leave it at 0 without.
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let open_files = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let tcp: Vec<&str> = sockstat
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .map(|l| l.split_ascii_whitespace().collect())
        .unwrap_or_default();
    let tcp_field = |name: &str| {
        tcp.iter()
            .position(|f| *f == name)
            .and_then(|i| tcp.get(i + 1)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(MemoryDetail {
        rss_bytes: kib_field(&status, "VmRSS"),
        rss_anon_bytes: kib_field(&status, "RssAnon"),
        rss_file_bytes: kib_field(&status, "RssFile"),
        private_dirty_bytes: kib_field(&rollup, "Private_Dirty"),
        threads: status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok())
            .unwrap_or(0),
        open_files,
        tcp_sockets: tcp_field("inuse"),
        tcp_kernel_bytes: tcp_field("mem") * rustix::param::page_size() as u64,
    })
}

/// [`memory_detail`] of `pid` with its descendants' memory, threads and files added (the
/// machine-wide TCP figures once).
pub fn tree_memory_detail(pid: u32) -> anyhow::Result<MemoryDetail> {
    let mut total = memory_detail(pid)?;
    for child in descendants(pid) {
        let Ok(detail) = memory_detail(child) else {
            continue;
        };
        total.rss_bytes += detail.rss_bytes;
        total.rss_anon_bytes += detail.rss_anon_bytes;
        total.rss_file_bytes += detail.rss_file_bytes;
        total.private_dirty_bytes += detail.private_dirty_bytes;
        total.threads += detail.threads;
        total.open_files += detail.open_files;
    }
    Ok(total)
}

/// Pins the calling thread to `cpu`. Threads it starts afterwards inherit the mask, so call
/// it before building the runtime.
pub fn pin_current_thread(cpu: usize) -> anyhow::Result<()> {
    if cpu >= rustix::thread::CpuSet::MAX_CPU {
        anyhow::bail!("--cpu {cpu} is out of range");
    }
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set)
        .with_context(|| format!("cannot pin to CPU {cpu}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cpu_and_rss() {
        let first = CpuSample::read(None).expect("own stat");
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let second = CpuSample::read(None).expect("own stat");
        let percent = second.percent_since(&first);
        assert!((0.0..=400.0).contains(&percent), "{percent}");
        let rss = rss_bytes(std::process::id()).expect("own rss");
        assert!(rss > 0);
        let before = SystemSample::read().expect("/proc/stat");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let usage = SystemSample::read()
            .expect("/proc/stat")
            .usage_since(&before);
        assert!(usage.iter().all(|u| u.busy_percent <= 100.0 + 1e-9));
        assert!(all_processes_cpu_seconds() >= second.seconds);
        let detail = memory_detail(std::process::id()).expect("own memory");
        let tree = tree_memory_detail(std::process::id()).expect("own memory");
        assert!(tree.rss_bytes >= detail.rss_bytes);
        assert!(tree_rss_bytes(std::process::id()).expect("rss") >= rss);
        assert!(CpuSample::read_tree(std::process::id()).is_ok());
        assert!(detail.rss_bytes > 0 && detail.threads >= 1 && detail.open_files >= 1);
        assert!(detail.rss_anon_bytes + detail.rss_file_bytes <= detail.rss_bytes + 1024 * 1024);
    }

    #[test]
    fn reads_kib_fields() {
        let text = "VmRSS:\t   2048 kB\nRssAnon:\t  1024 kB\nPrivate_Dirty:  8 kB\n";
        assert_eq!(kib_field(text, "VmRSS"), 2048 * 1024);
        assert_eq!(kib_field(text, "RssAnon"), 1024 * 1024);
        assert_eq!(kib_field(text, "Private_Dirty"), 8 * 1024);
        assert_eq!(kib_field(text, "Missing"), 0);
    }
}
