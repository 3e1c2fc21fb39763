//! Real servers for the integration tests, started per test on free loopback ports and killed
//! when dropped: `web-push-testing` (npm) as a Web Push service, `aiosmtpd` (PyPI) as an SMTP
//! server, and a tiny scripted HTTP endpoint that records requests (for what
//! web-push-testing does not look at: `Urgency`, `Topic`, and statuses it never sends).
//!
//! The tools live in `tests/tools/` and are installed by `scripts/install-test-tools`. A
//! missing tool fails the test with the command that installs it; nothing is skipped.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

pub const INSTALL: &str = "scripts/install-test-tools";

pub fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools")
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

// ---------------------------------------------------------------------------------------------
// web-push-testing

pub struct WebPushTesting {
    child: Child,
    pub port: u16,
    http: reqwest::Client,
}

#[derive(Clone, Debug)]
pub struct Subscription {
    /// The device token: `{"endpoint": …, "keys": {"p256dh": …, "auth": …}}`.
    pub token: String,
    pub endpoint: String,
    pub client_hash: String,
}

impl WebPushTesting {
    pub async fn start() -> Self {
        let script = tools_dir().join("node_modules/web-push-testing/src/bin/server.js");
        assert!(
            script.exists(),
            "web-push-testing is not installed ({} missing). Install it with: {INSTALL} \
             (or: cd crates/herald-outbound/tests/tools && npm ci)",
            script.display()
        );
        let node = std::env::var("HERALD_TEST_NODE").unwrap_or_else(|_| "node".into());
        // The port is picked before the server binds it, so another process may take it in
        // between; the server then exits and we try another.
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&node)
                .arg(&script)
                .arg(port.to_string())
                .current_dir(tools_dir())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {node} (Node.js >= 20 is needed): {e}"));
            let stdout = child.stdout.take().expect("piped stdout");
            let mut lines = BufReader::new(stdout).lines();
            let ready = tokio::time::timeout(Duration::from_secs(20), async {
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains("Server running on port") {
                        return true;
                    }
                }
                false
            })
            .await
            .unwrap_or(false);
            if ready {
                // Keep draining stdout so the server never blocks on a full pipe.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                return Self {
                    child,
                    port,
                    http: reqwest::Client::new(),
                };
            }
            let _ = child.kill().await;
        }
        panic!("web-push-testing did not start (5 tries)");
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("web-push-testing request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// A new subscription bound to `application_server_key` (base64url public VAPID key).
    pub async fn subscribe(&self, application_server_key: &str) -> Subscription {
        let (status, body) = self
            .post(
                "/subscribe",
                serde_json::json!({
                    "applicationServerKey": application_server_key,
                    "userVisibleOnly": "true",
                }),
            )
            .await;
        assert_eq!(status, 200, "subscribe: {body}");
        let data = &body["data"];
        let token = serde_json::json!({
            "endpoint": data["endpoint"],
            "expirationTime": null,
            "keys": data["keys"],
        });
        Subscription {
            token: token.to_string(),
            endpoint: data["endpoint"].as_str().expect("endpoint").to_owned(),
            client_hash: data["clientHash"].as_str().expect("clientHash").to_owned(),
        }
    }

    /// The decrypted messages the service received for a subscription, in order.
    pub async fn messages(&self, sub: &Subscription) -> Vec<String> {
        let (status, body) = self
            .post(
                "/get-notifications",
                serde_json::json!({"clientHash": sub.client_hash}),
            )
            .await;
        assert_eq!(status, 200, "get-notifications: {body}");
        body["data"]["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m.as_str().expect("text message").to_owned())
            .collect()
    }

    pub async fn expire(&self, sub: &Subscription) {
        let (status, body) = self
            .post(
                &format!("/expire-subscription/{}", sub.client_hash),
                serde_json::json!({}),
            )
            .await;
        assert_eq!(status, 200, "expire-subscription: {body}");
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

// ---------------------------------------------------------------------------------------------
// A scripted HTTP/1.1 endpoint

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Answers every request with the same scripted response (status line, extra headers, body)
/// and records what it got. One request per connection (`Connection: close`).
pub struct ScriptedEndpoint {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedEndpoint {
    pub async fn start(status: u16, headers: &[(&str, &str)], body: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let mut head = format!("HTTP/1.1 {status} Scripted\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ));
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let recorded = recorded.clone();
                let response = head.clone();
                tokio::spawn(async move {
                    if let Some(request) = read_request(stream, response.as_bytes()).await {
                        recorded.lock().push(request);
                    }
                });
            }
        });
        Self {
            addr,
            requests,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().clone()
    }
}

impl Drop for ScriptedEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_request(stream: TcpStream, response: &[u8]) -> Option<Recorded> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await.ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await.ok()?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        let (name, value) = trimmed.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).await.ok()?;
    let mut stream = reader.into_inner();
    stream.write_all(response).await.ok()?;
    let _ = stream.shutdown().await;
    Some(Recorded {
        method,
        path,
        headers,
        body,
    })
}

/// A listener that only counts connections: proof that nothing was sent to it.
pub struct Tripwire {
    pub port: u16,
    listeners: Vec<TcpListener>,
}

impl Tripwire {
    /// Listens on 127.0.0.1 and, where the machine has IPv6 loopback, on [::1] with the same
    /// port, so `localhost` reaches it whichever address it resolves to first.
    pub async fn start() -> Self {
        for _ in 0..20 {
            let v4 = TcpListener::bind("127.0.0.1:0").await.expect("bind v4");
            let port = v4.local_addr().expect("addr").port();
            match TcpListener::bind(("::1", port)).await {
                Ok(v6) => {
                    return Self {
                        port,
                        listeners: vec![v4, v6],
                    };
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                // No IPv6 loopback here: v4 alone.
                Err(_) => {
                    return Self {
                        port,
                        listeners: vec![v4],
                    };
                }
            }
        }
        panic!("no port free on both 127.0.0.1 and ::1");
    }

    /// True if any connection arrived.
    pub async fn tripped(&self) -> bool {
        for listener in &self.listeners {
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(200), listener.accept()).await
            {
                return true;
            }
        }
        false
    }
}

// ---------------------------------------------------------------------------------------------
// aiosmtpd

/// The Python that has aiosmtpd: `HERALD_TEST_PYTHON`, else the tools venv, else `python3`.
pub fn python_with_aiosmtpd() -> PathBuf {
    let candidates: Vec<PathBuf> = match std::env::var_os("HERALD_TEST_PYTHON") {
        Some(p) => vec![PathBuf::from(p)],
        None => vec![
            tools_dir().join(".venv/bin/python"),
            PathBuf::from("python3"),
        ],
    };
    for python in &candidates {
        let ok = std::process::Command::new(python)
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return python.clone();
        }
    }
    panic!(
        "no Python with aiosmtpd found (tried {candidates:?}). Install it with: {INSTALL} \
         (or: python3 -m venv crates/herald-outbound/tests/tools/.venv && \
         crates/herald-outbound/tests/tools/.venv/bin/pip install -r \
         crates/herald-outbound/tests/tools/requirements.txt)"
    );
}

pub enum SmtpTls<'a> {
    None,
    /// STARTTLS offered and required, with this cert and key (PEM files).
    Starttls {
        cert: &'a Path,
        key: &'a Path,
    },
    /// Implicit TLS from the first byte.
    Implicit {
        cert: &'a Path,
        key: &'a Path,
    },
}

/// `python3 -m aiosmtpd` with the `smtp_sink.Sink` handler writing to a temporary folder.
pub struct SmtpSink {
    child: Child,
    pub port: u16,
    pub folder: tempfile::TempDir,
}

impl SmtpSink {
    pub async fn start(tls: SmtpTls<'_>) -> Self {
        for _ in 0..5 {
            if let Some(sink) = Self::try_start(free_port(), &tls).await {
                return sink;
            }
        }
        panic!("aiosmtpd did not start (5 tries)");
    }

    /// A new server on a given port (e.g. the port of one that was stopped), if it starts.
    pub async fn try_start(port: u16, tls: &SmtpTls<'_>) -> Option<Self> {
        let python = python_with_aiosmtpd();
        let folder = tempfile::tempdir().expect("tempdir");
        {
            let mut command = Command::new(&python);
            command
                .args(["-m", "aiosmtpd", "-n", "-l"])
                .arg(format!("127.0.0.1:{port}"))
                .args(["-c", "smtp_sink.Sink"]);
            match &tls {
                SmtpTls::None => {}
                SmtpTls::Starttls { cert, key } => {
                    command.arg("--tlscert").arg(cert).arg("--tlskey").arg(key);
                }
                SmtpTls::Implicit { cert, key } => {
                    command
                        .arg("--smtpscert")
                        .arg(cert)
                        .arg("--smtpskey")
                        .arg(key);
                }
            }
            // The handler's own argument (CLASSARGS) comes last.
            command.arg(folder.path());
            let mut child = command
                .env("PYTHONPATH", tools_dir())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn aiosmtpd");
            // Ready when it accepts a connection (and it is still ours: not exited).
            for _ in 0..100 {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    return Some(Self {
                        child,
                        port,
                        folder,
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = child.kill().await;
        }
        None
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
    }

    /// The messages received so far (the handler's JSON records), oldest first.
    pub fn received(&self) -> Vec<Value> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.folder.path())
            .expect("read sink folder")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| {
                serde_json::from_slice(&std::fs::read(p).expect("read message")).expect("json")
            })
            .collect()
    }
}
