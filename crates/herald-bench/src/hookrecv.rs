//! The webhook side of the `bridge` scenario: a local receiver that answers every `POST`
//! with 204 and counts it (first and last arrival times), and the bare sender that posts to
//! the same receiver as fast as its connections go (the ceiling Herald's deliveries are
//! compared with).
//!
//! Owns: the receiver's listening socket and its connections. May touch: loopback only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::net::TcpListener;

use crate::pushapi::now_us;
use crate::rawhttp::{RawConnection, encode_request};

/// What the receiver saw.
#[derive(Debug, Default)]
pub struct Received {
    pub count: AtomicU64,
    /// Unix µs of the first and the last request (0: none yet).
    pub first_us: AtomicU64,
    pub last_us: AtomicU64,
}

impl Received {
    fn note(&self) {
        let now = now_us();
        let _ = self
            .first_us
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        self.last_us.fetch_max(now, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reset(&self) {
        self.count.store(0, Ordering::Relaxed);
        self.first_us.store(0, Ordering::Relaxed);
        self.last_us.store(0, Ordering::Relaxed);
    }

    /// Requests per second between the first and the last.
    pub fn rate(&self) -> f64 {
        let span = self
            .last_us
            .load(Ordering::Relaxed)
            .saturating_sub(self.first_us.load(Ordering::Relaxed));
        let count = self.count.load(Ordering::Relaxed);
        if span == 0 || count < 2 {
            return 0.0;
        }
        (count - 1) as f64 / (span as f64 / 1e6)
    }
}

/// A running receiver.
pub struct Receiver {
    pub addr: SocketAddr,
    pub received: Arc<Received>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind the webhook receiver")?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Received::default());
        let counts = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let counts = counts.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let counts = counts.clone();
                        async move {
                            // The body is read, as a real receiver would.
                            let _ = request.into_body().collect().await;
                            counts.note();
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .status(204)
                                    .body(Empty::<Bytes>::new())
                                    .unwrap_or_default(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            received,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }
}

/// `requests` POSTs of `body` (with Standard Webhooks-sized headers) over `connections`
/// keep-alive connections; returns the receiver's rate.
pub async fn bare_send(
    receiver: &Receiver,
    requests: u64,
    connections: usize,
    body: &[u8],
) -> anyhow::Result<f64> {
    receiver.received.reset();
    let headers = "Content-Type: application/json\r\nwebhook-id: msg_2KWPBgLlAfxdpx2AI54pPJ85f4W\r\nwebhook-timestamp: 1733565000\r\nwebhook-signature: v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=\r\n";
    let request = Arc::new(encode_request(
        "/hook",
        &receiver.addr.to_string(),
        headers,
        body,
    ));
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..connections.max(1) {
        let (request, next, addr) = (request.clone(), next.clone(), receiver.addr);
        tasks.push(tokio::spawn(async move {
            let mut conn = RawConnection::connect(addr).await?;
            while next.fetch_add(1, Ordering::Relaxed) < requests {
                let reply = conn.round_trip(&request).await?;
                if reply.status != 204 {
                    return Err(format!("receiver answered {}", reply.status));
                }
            }
            Ok::<_, String>(())
        }));
    }
    for task in tasks {
        task.await
            .context("a bare sender task failed")?
            .map_err(anyhow::Error::msg)?;
    }
    wait_for(&receiver.received, requests, Duration::from_secs(10)).await?;
    Ok(receiver.received.rate())
}

/// Waits until the receiver has counted `want` requests.
pub async fn wait_for(received: &Received, want: u64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while received.count.load(Ordering::Relaxed) < want {
        if Instant::now() > deadline {
            anyhow::bail!(
                "the receiver got {} of {want} requests in {timeout:?}",
                received.count.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
