//! What the operating system says about a process: CPU time and resident memory from
//! `/proc`, and pinning the current thread to one core.
//!
//! Owns nothing but these reads; it never signals or otherwise touches the processes it
//! looks at. Linux only.

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
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
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
    }
}
