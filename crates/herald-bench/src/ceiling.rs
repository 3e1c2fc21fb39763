//! `herald-bench ceiling-server`: the bare fan-out WebSocket server the benchmark compares
//! Herald with — the most this machine allows, not a product.
//!
//! Owns one listening socket and everything behind it, on one thread: `GET /sub/<channel>`
//! with a WebSocket upgrade subscribes the connection to `<channel>` (tungstenite's accept
//! key, no extensions, no protocol); `POST /pub/<channel>` with the payload as the body
//! publishes it (reply `200 {"delivered":N}`; keep-alive and pipelined requests work). A
//! publication is encoded into one WebSocket text frame once and shared by every subscriber;
//! each subscriber has a queue of such frames, and its task writes everything queued in one
//! `write` per wake-up. Nothing else: no pings, no history, no auth, no per-message
//! allocation beyond the one frame. A subscriber whose queue passes `--max-queue-bytes` is
//! disconnected. What clients send after the upgrade is read and ignored.
//!
//! Prints `listening on http://ADDR` on standard output once it accepts connections, like
//! `herald serve`, and runs until it is killed.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Largest request head plus body the server reads.
const MAX_REQUEST: usize = 1 << 20;

/// Flags of `herald-bench ceiling-server`.
#[derive(Debug, Clone, clap::Args)]
pub struct CeilingArgs {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// A subscriber with more than this many bytes queued is disconnected.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_queue_bytes: usize,
}

/// One subscribed connection, as the publishing side sees it.
struct Subscriber {
    id: u64,
    /// Frames not yet written.
    queue: RefCell<Vec<Bytes>>,
    queued_bytes: Cell<usize>,
    /// Over the queue bound: the writer closes the connection.
    dead: Cell<bool>,
    wake: Notify,
}

struct Hub {
    channels: RefCell<HashMap<Box<str>, Vec<Rc<Subscriber>>>>,
    next_id: Cell<u64>,
    max_queue_bytes: usize,
}

impl Hub {
    fn subscribe(&self, channel: &str) -> Rc<Subscriber> {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let subscriber = Rc::new(Subscriber {
            id,
            queue: RefCell::new(Vec::new()),
            queued_bytes: Cell::new(0),
            dead: Cell::new(false),
            wake: Notify::new(),
        });
        self.channels
            .borrow_mut()
            .entry(channel.into())
            .or_default()
            .push(subscriber.clone());
        subscriber
    }

    fn unsubscribe(&self, channel: &str, id: u64) {
        let mut channels = self.channels.borrow_mut();
        if let Some(list) = channels.get_mut(channel) {
            if let Some(at) = list.iter().position(|s| s.id == id) {
                list.swap_remove(at);
            }
            if list.is_empty() {
                channels.remove(channel);
            }
        }
    }

    /// Queues one frame holding `payload` for every subscriber of `channel`; returns how
    /// many got it.
    fn publish(&self, channel: &str, payload: &[u8]) -> usize {
        let channels = self.channels.borrow();
        let Some(list) = channels.get(channel) else {
            return 0;
        };
        let frame = text_frame(payload);
        let mut delivered = 0;
        for subscriber in list {
            if subscriber.dead.get() {
                continue;
            }
            let queued = subscriber.queued_bytes.get() + frame.len();
            if queued > self.max_queue_bytes {
                subscriber.dead.set(true);
                subscriber.wake.notify_one();
                continue;
            }
            subscriber.queued_bytes.set(queued);
            let mut queue = subscriber.queue.borrow_mut();
            queue.push(frame.clone());
            if queue.len() == 1 {
                subscriber.wake.notify_one();
            }
            delivered += 1;
        }
        delivered
    }
}

/// An unmasked, final WebSocket text frame (server to client).
pub fn text_frame(payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut frame = Vec::with_capacity(len + 10);
    frame.push(0x81);
    if len < 126 {
        frame.push(len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        frame.push(126);
        frame.extend_from_slice(&short.to_be_bytes());
    } else {
        frame.push(127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    frame.extend_from_slice(payload);
    Bytes::from(frame)
}

/// Runs the server until the process is killed.
pub fn run(args: &CeilingArgs) -> anyhow::Result<()> {
    let runtime = crate::runtime(1)?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(args))
}

async fn serve(args: &CeilingArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "herald-bench ceiling-server listening on http://{addr}"
        )?;
        out.flush()?;
    }
    let hub = Rc::new(Hub {
        channels: RefCell::new(HashMap::new()),
        next_id: Cell::new(0),
        max_queue_bytes: args.max_queue_bytes,
    });
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::task::spawn_local(connection(hub.clone(), stream));
            }
            // Out of files, or a connection reset before it was accepted: go on.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// What a request asked for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Subscribe { channel: String, key: String },
    Publish { channel: String, body: Vec<u8> },
    Other { status: u16 },
}

/// Parses one request from the front of `buf`: `Ok(None)` when more bytes are needed,
/// otherwise the request and how many bytes it took.
fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let head = match request.parse(buf) {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("bad request: {e}")),
    };
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let length: usize = match header("content-length") {
        Some(value) => value
            .trim()
            .parse()
            .map_err(|_| "bad Content-Length".to_owned())?,
        None => 0,
    };
    if head + length > MAX_REQUEST {
        return Err("request too large".to_owned());
    }
    if buf.len() < head + length {
        return Ok(None);
    }
    let path = request.path.unwrap_or("/");
    let method = request.method.unwrap_or("");
    let parsed = if let Some(channel) = path.strip_prefix("/sub/") {
        match (method, header("sec-websocket-key")) {
            ("GET", Some(key)) if !channel.is_empty() => Request::Subscribe {
                channel: channel.to_owned(),
                key: key.trim().to_owned(),
            },
            _ => Request::Other { status: 400 },
        }
    } else if let Some(channel) = path.strip_prefix("/pub/") {
        if method == "POST" && !channel.is_empty() {
            Request::Publish {
                channel: channel.to_owned(),
                body: buf[head..head + length].to_vec(),
            }
        } else {
            Request::Other { status: 400 }
        }
    } else {
        Request::Other { status: 404 }
    };
    Ok(Some((parsed, head + length)))
}

/// Reads requests until one upgrades the connection (then it becomes a subscriber) or the
/// client goes away.
async fn connection(hub: Rc<Hub>, mut stream: TcpStream) {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut replies: Vec<u8> = Vec::new();
    loop {
        // Every complete request in the buffer (pipelined ones too), then one write.
        loop {
            match parse_request(&buf) {
                Ok(None) => break,
                Ok(Some((request, used))) => {
                    buf.drain(..used);
                    match request {
                        Request::Subscribe { channel, key } => {
                            if !replies.is_empty() && stream.write_all(&replies).await.is_err() {
                                return;
                            }
                            drop((buf, replies));
                            subscriber(&hub, stream, &channel, &key).await;
                            return;
                        }
                        Request::Publish { channel, body } => {
                            let delivered = hub.publish(&channel, &body);
                            let body = format!("{{\"delivered\":{delivered}}}");
                            replies.extend_from_slice(
                                format!(
                                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                                    body.len()
                                )
                                .as_bytes(),
                            );
                        }
                        Request::Other { status } => {
                            replies.extend_from_slice(
                                format!("HTTP/1.1 {status} No\r\nContent-Length: 0\r\n\r\n")
                                    .as_bytes(),
                            );
                        }
                    }
                }
                Err(error) => {
                    let body = format!("{error}\n");
                    let reply = format!(
                        "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(reply.as_bytes()).await;
                    return;
                }
            }
        }
        if !replies.is_empty() {
            if stream.write_all(&replies).await.is_err() {
                return;
            }
            replies.clear();
        }
        let start = buf.len();
        buf.resize(start + 4096, 0);
        match stream.read(&mut buf[start..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.truncate(start + n),
        }
    }
}

/// A subscribed connection: the 101 reply, then queued frames until either side ends it.
async fn subscriber(hub: &Hub, mut stream: TcpStream, channel: &str, key: &str) {
    // Subscribed before the reply goes out: a client that has read the 101 gets everything
    // published after.
    let me = hub.subscribe(channel);
    let reply = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    if stream.write_all(reply.as_bytes()).await.is_ok() {
        write_loop(&me, &mut stream).await;
    }
    hub.unsubscribe(channel, me.id);
}

async fn write_loop(me: &Subscriber, stream: &mut TcpStream) {
    let (mut reader, mut writer) = stream.split();
    let mut scratch = [0u8; 128];
    let mut out: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            biased;
            () = me.wake.notified() => {
                if me.dead.get() {
                    return;
                }
                let frames = std::mem::take(&mut *me.queue.borrow_mut());
                me.queued_bytes.set(0);
                if frames.len() == 1 {
                    if writer.write_all(&frames[0]).await.is_err() {
                        return;
                    }
                } else {
                    out.clear();
                    for frame in &frames {
                        out.extend_from_slice(frame);
                    }
                    if writer.write_all(&out).await.is_err() {
                        return;
                    }
                    // Keep a modest buffer between bursts, not the largest one ever seen.
                    if out.capacity() > 64 * 1024 {
                        out = Vec::new();
                    }
                }
            }
            read = reader.read(&mut scratch) => match read {
                Ok(0) | Err(_) => return,
                // Pongs, pings, a close: the ceiling answers none of them.
                Ok(_) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_the_right_length_encoding() {
        assert_eq!(&text_frame(b"hi")[..], b"\x81\x02hi");
        let medium = text_frame(&[b'x'; 300]);
        assert_eq!(&medium[..4], &[0x81, 126, 1, 44]);
        assert_eq!(medium.len(), 304);
        let large = text_frame(&vec![b'x'; 70_000]);
        assert_eq!(large[1], 127);
        assert_eq!(large.len(), 70_010);
    }

    #[test]
    fn requests_parse_and_pipeline() {
        let two = b"POST /pub/a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcPOST /pub/b HTTP/1.1\r\nContent-Length: 1\r\n\r\nz";
        let (first, used) = parse_request(two).expect("ok").expect("complete");
        assert_eq!(
            first,
            Request::Publish {
                channel: "a".into(),
                body: b"abc".to_vec()
            }
        );
        let (second, rest) = parse_request(&two[used..]).expect("ok").expect("complete");
        assert_eq!(used + rest, two.len());
        assert!(matches!(second, Request::Publish { channel, .. } if channel == "b"));
        assert_eq!(parse_request(&two[..30]).expect("ok"), None);
        let upgrade = b"GET /sub/c-1 HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let (sub, _) = parse_request(upgrade).expect("ok").expect("complete");
        assert_eq!(
            sub,
            Request::Subscribe {
                channel: "c-1".into(),
                key: "dGhlIHNhbXBsZSBub25jZQ==".into()
            }
        );
        let (other, _) = parse_request(b"GET /x HTTP/1.1\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert_eq!(other, Request::Other { status: 404 });
        assert!(parse_request(b"\x00\x01 nonsense\r\n\r\n").is_err());
    }

    #[test]
    fn a_slow_subscriber_is_cut_at_the_queue_bound() {
        let hub = Hub {
            channels: RefCell::new(HashMap::new()),
            next_id: Cell::new(0),
            max_queue_bytes: 250,
        };
        let a = hub.subscribe("c");
        let b = hub.subscribe("c");
        assert_eq!(hub.publish("c", &[b'x'; 100]), 2);
        assert_eq!(hub.publish("c", &[b'x'; 100]), 2);
        assert_eq!(hub.publish("c", &[b'x'; 100]), 0, "over 250 queued bytes");
        assert!(a.dead.get() && b.dead.get());
        assert_eq!(hub.publish("nobody", b"x"), 0);
        hub.unsubscribe("c", a.id);
        hub.unsubscribe("c", b.id);
        assert!(hub.channels.borrow().is_empty());
    }
}
