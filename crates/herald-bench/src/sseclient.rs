//! A minimal Server-Sent Events client for the fan-out bench: one `GET` over a TCP socket
//! bound to a chosen source address, the reply head parsed with `httparse`, a chunked body
//! decoded in place, and events handed to a callback straight from the read buffer.
//!
//! Owns one TCP connection and its buffers. It speaks just enough HTTP/1.1 and SSE for
//! Herald's `/connection/sse` (a `200` with a chunked or close-delimited body; `event:`,
//! `data:`, `id:` and comment lines, `\n` line ends); anything else is an error the caller
//! counts.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest reply head, and largest event, the client accepts.
const MAX_PENDING: usize = 1 << 20;

/// One open event stream.
pub struct SseClient {
    stream: TcpStream,
    /// Raw bytes read but not yet decoded.
    raw: Vec<u8>,
    /// Decoded body bytes not yet split into events.
    body: Vec<u8>,
    /// `None`: the body runs until the connection closes.
    chunks: Option<Dechunker>,
}

impl SseClient {
    /// Sends `GET path` (path and query) on `stream` and reads the reply head. A status
    /// other than 200 is an error with the start of the reply body.
    pub async fn open(
        mut stream: TcpStream,
        host: &str,
        path: &str,
        token: Option<&str>,
    ) -> Result<Self, String> {
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n{auth}\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::with_capacity(4096);
        let (status, head_len, chunked) = loop {
            if let Some(head) = parse_head(&raw)? {
                break head;
            }
            if raw.len() > MAX_PENDING {
                return Err("reply head is too large".to_owned());
            }
            if read_more(&mut stream, &mut raw).await? == 0 {
                return Err("the server closed the connection before replying".to_owned());
            }
        };
        raw.drain(..head_len);
        if status != 200 {
            // Give the body a moment to arrive, for the error message.
            let _ = tokio::time::timeout(
                std::time::Duration::from_millis(200),
                read_more(&mut stream, &mut raw),
            )
            .await;
            let excerpt = String::from_utf8_lossy(&raw[..raw.len().min(200)]).into_owned();
            return Err(format!("HTTP {status}: {excerpt}"));
        }
        Ok(Self {
            stream,
            raw,
            body: Vec::with_capacity(4096),
            chunks: chunked.then(Dechunker::default),
        })
    }

    /// Hands every complete event already buffered to `on_event`; when there was none,
    /// reads from the socket until at least one arrives. `Ok(false)`: the stream has ended.
    pub async fn read_events(
        &mut self,
        on_event: &mut impl FnMut(&str, &str),
    ) -> Result<bool, String> {
        loop {
            let (events, ended) = self.decode(on_event)?;
            if ended {
                return Ok(false);
            }
            if events > 0 {
                return Ok(true);
            }
            if read_more(&mut self.stream, &mut self.raw).await? == 0 {
                self.decode(on_event)?;
                return Ok(false);
            }
        }
    }

    /// Decodes what `raw` holds and splits complete events off the body: (events, ended).
    fn decode(&mut self, on_event: &mut impl FnMut(&str, &str)) -> Result<(usize, bool), String> {
        let ended = match &mut self.chunks {
            Some(chunks) => {
                let used = chunks.feed(&self.raw, &mut self.body)?;
                self.raw.drain(..used);
                chunks.done
            }
            None => {
                self.body.extend_from_slice(&self.raw);
                self.raw.clear();
                false
            }
        };
        let mut events = 0;
        let used = split_events(&self.body, &mut |kind, data| {
            events += 1;
            on_event(kind, data);
        });
        self.body.drain(..used);
        if self.body.len() > MAX_PENDING {
            return Err("an event larger than 1 MiB".to_owned());
        }
        Ok((events, ended))
    }
}

async fn read_more(stream: &mut TcpStream, raw: &mut Vec<u8>) -> Result<usize, String> {
    let len = raw.len();
    raw.resize(len + 8192, 0);
    let result = stream.read(&mut raw[len..]).await;
    let n = *result.as_ref().unwrap_or(&0);
    raw.truncate(len + n);
    result.map_err(|e| format!("read: {e}"))
}

/// `Some((status, head length, chunked))` once the head is complete.
fn parse_head(data: &[u8]) -> Result<Option<(u16, usize, bool)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(data) {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed reply head: {e}")),
    };
    let chunked = response.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .contains("chunked")
    });
    Ok(Some((response.code.unwrap_or(0), head, chunked)))
}

/// Decodes `Transfer-Encoding: chunked` incrementally.
#[derive(Debug, Default)]
struct Dechunker {
    /// Data bytes left in the current chunk.
    left: usize,
    /// Line-end bytes still to skip after a chunk's data.
    skip: usize,
    /// The last (empty) chunk has been read.
    done: bool,
}

impl Dechunker {
    /// Appends the data in `input` to `out`; returns how many bytes of `input` were used
    /// (the rest is an incomplete size line, kept for the next call).
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, String> {
        let mut pos = 0;
        while !self.done && pos < input.len() {
            let available = input.len() - pos;
            if self.left > 0 {
                let n = self.left.min(available);
                out.extend_from_slice(&input[pos..pos + n]);
                pos += n;
                self.left -= n;
                if self.left == 0 {
                    self.skip = 2;
                }
                continue;
            }
            if self.skip > 0 {
                let n = self.skip.min(available);
                pos += n;
                self.skip -= n;
                continue;
            }
            let Some(end) = input[pos..].iter().position(|&b| b == b'\n') else {
                if available > 1024 {
                    return Err("chunk size line too long".to_owned());
                }
                break;
            };
            let line = String::from_utf8_lossy(&input[pos..pos + end]);
            let size_text = line.trim().split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| format!("bad chunk size line {:?}", line.trim()))?;
            pos += end + 1;
            if size == 0 {
                self.done = true;
            }
            self.left = size;
        }
        Ok(pos)
    }
}

/// Calls `on_event(kind, data)` for every complete event (ended by a blank line) in `body`
/// and returns how many bytes they took. `kind` is the `event:` field (`message` when
/// absent), or `comment` for a block of comment lines only (Herald's `: ping`).
fn split_events(body: &[u8], on_event: &mut impl FnMut(&str, &str)) -> usize {
    let mut used = 0;
    while let Some(end) = find(&body[used..], b"\n\n") {
        let block = &body[used..used + end];
        used += end + 2;
        let Ok(block) = std::str::from_utf8(block) else {
            continue;
        };
        let mut kind = None;
        let mut data: Option<std::borrow::Cow<'_, str>> = None;
        let mut comment = false;
        for line in block.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.starts_with(':') {
                comment = true;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => kind = Some(value),
                "data" => {
                    data = Some(match data {
                        None => value.into(),
                        Some(before) => format!("{before}\n{value}").into(),
                    })
                }
                _ => {}
            }
        }
        match (kind, data) {
            (kind, Some(data)) => on_event(kind.unwrap_or("message"), &data),
            (Some(kind), None) => on_event(kind, ""),
            (None, None) if comment => on_event("comment", ""),
            (None, None) => {}
        }
    }
    used
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Connects a TCP socket from `source` (port chosen by the kernel) to `addr`.
pub async fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> Result<TcpStream, String> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(|e| format!("socket: {e}"))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let stream = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connect {addr} from {source}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("set TCP_NODELAY: {e}"))?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(body: &[u8]) -> (Vec<(String, String)>, usize) {
        let mut events = Vec::new();
        let used = split_events(body, &mut |kind, data| {
            events.push((kind.to_owned(), data.to_owned()))
        });
        (events, used)
    }

    #[test]
    fn splits_events() {
        let body = b"retry: 1000\nid: 1:e\nevent: connected\ndata: {\"a\":1}\n\n: ping\n\nid: 2:e\nevent: publication\ndata: {\"b\"\ndata: :2}\n\nevent: publ";
        let (events, used) = collect(body);
        assert_eq!(
            events,
            vec![
                ("connected".into(), "{\"a\":1}".into()),
                ("comment".into(), String::new()),
                ("publication".into(), "{\"b\"\n:2}".into()),
            ]
        );
        assert_eq!(&body[used..], b"event: publ");
    }

    #[test]
    fn decodes_chunks_split_anywhere() {
        let encoded = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        for split in 0..encoded.len() {
            let mut chunks = Dechunker::default();
            let mut out = Vec::new();
            let mut pending = encoded[..split].to_vec();
            let used = chunks.feed(&pending, &mut out).expect("first half");
            pending.drain(..used);
            pending.extend_from_slice(&encoded[split..]);
            let used = chunks.feed(&pending, &mut out).expect("second half");
            assert_eq!(out, b"hello, world", "split at {split}");
            assert!(chunks.done, "split at {split}");
            assert!(used <= pending.len());
        }
        let mut chunks = Dechunker::default();
        assert!(chunks.feed(b"zz\r\n", &mut Vec::new()).is_err());
    }

    #[tokio::test]
    async fn reads_a_chunked_event_stream() {
        let (addr, server) = crate::testserver::serve_one(|mut socket| async move {
            let mut buf = [0u8; 1024];
            let n = socket.read(&mut buf).await.expect("read");
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                .await
                .expect("write");
            for chunk in [
                "event: connected\ndata: {}\n\n",
                ": ping\n\nevent: publication\ndata: {\"x\":1}\n\n",
            ] {
                socket
                    .write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes())
                    .await
                    .expect("write");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            socket.write_all(b"0\r\n\r\n").await.expect("write");
            head
        })
        .await;
        let stream = connect_from("127.0.0.1".parse().expect("ip"), addr)
            .await
            .expect("connect");
        let mut client = SseClient::open(stream, "h", "/connection/sse?channel=a", Some("tok"))
            .await
            .expect("open");
        let mut events = Vec::new();
        while client
            .read_events(&mut |kind, data| events.push(format!("{kind}={data}")))
            .await
            .expect("read")
        {}
        assert_eq!(
            events,
            ["connected={}", "comment=", "publication={\"x\":1}"]
        );
        let head = server.await.expect("server");
        assert!(head.starts_with("GET /connection/sse?channel=a HTTP/1.1\r\nHost: h\r\n"));
        assert!(head.contains("Authorization: Bearer tok\r\n"));
    }
}
