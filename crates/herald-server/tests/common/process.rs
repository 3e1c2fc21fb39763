//! Runs the real `herald` binary for end-to-end tests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn herald_bin() -> &'static str {
    env!("CARGO_BIN_EXE_herald")
}

/// A running `herald serve`; killed on drop if still running.
pub struct ServerProcess {
    pub child: Child,
    pub url: String,
    /// Every stdout line printed up to and including the "listening" line.
    pub banner: Vec<String>,
}

impl ServerProcess {
    /// Starts `herald serve ARGS` and waits for its "listening on" line.
    pub fn start(args: &[&str], cwd: &Path) -> Self {
        Self::start_via(&[], args, cwd)
    }

    /// Starts `PREFIX... herald serve ARGS` (e.g. `ip netns exec NS herald serve ...`: a
    /// prefix that ends by exec'ing herald, so the child is herald itself) and waits for its
    /// "listening on" line.
    pub fn start_via(prefix: &[String], args: &[&str], cwd: &Path) -> Self {
        let mut command = match prefix.split_first() {
            None => Command::new(herald_bin()),
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(herald_bin());
                command
            }
        };
        let mut child = command
            .arg("serve")
            .args(args)
            .current_dir(cwd)
            .env("HERALD_LOG__LEVEL", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn herald");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut banner = Vec::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(remaining) {
                Ok(line) => line,
                Err(_) => {
                    let status = child.try_wait().ok().flatten();
                    panic!(
                        "herald did not print its listening line (exit status {status:?}); got {banner:?}"
                    );
                }
            };
            banner.push(line.clone());
            if let Some(pos) = line.find("listening on ") {
                let url = line[pos + "listening on ".len()..].trim().to_owned();
                // The indented banner lines (storage, API key, curl line) follow at once.
                while let Ok(more) = rx.recv_timeout(Duration::from_millis(500)) {
                    let indented = more.starts_with("  ");
                    banner.push(more);
                    if banner.last().is_some_and(|l| {
                        l.trim_start().starts_with("try:") || l.contains("from configuration")
                    }) || !indented
                    {
                        break;
                    }
                }
                // Keep draining stdout so the server never blocks on a full pipe.
                std::thread::spawn(move || while rx.recv().is_ok() {});
                return Self { child, url, banner };
            }
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits i32")
    }

    /// Sends `signal` with the system `kill` command (the crate forbids `unsafe`).
    pub fn signal(&self, signal: i32) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Waits for exit up to `timeout`; returns the exit code (None if killed by a signal).
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "herald did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `herald ARGS` to completion in `cwd`; returns (exit code, stdout, stderr).
pub fn run(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let output = Command::new(herald_bin())
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run herald");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
