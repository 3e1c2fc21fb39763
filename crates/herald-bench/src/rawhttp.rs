//! A bare HTTP/1.1 keep-alive client for load generation: it writes a request that was
//! encoded once up front, in one `write`, and reads the reply into a reused buffer, parsing
//! only the status line and headers (with `httparse`) and taking the body by
//! `Content-Length`.
//!
//! Owns one TCP connection and its read buffer. It speaks just enough HTTP/1.1 for replies
//! with a `Content-Length` (what the server API sends); anything else — chunked bodies,
//! `Connection: close` (unless [`RawConnection::accept_close`] was asked, for servers that
//! close after every reply, like Pushpin's publish endpoint), a malformed head — is reported
//! so the caller replaces the connection.
//! Compared with a hyper client connection it skips the header map, the dispatch channel
//! between the request future and the connection task, and `writev`.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest reply head + body this client accepts.
const MAX_REPLY: usize = 1 << 20;

/// How a reply looked, for the caller to judge.
#[derive(Debug)]
pub struct Reply<'a> {
    pub status: u16,
    pub body: &'a [u8],
    /// The server said `Connection: close` (only with [`RawConnection::accept_close`]): the
    /// connection takes no more requests.
    pub close: bool,
}

/// One keep-alive connection.
pub struct RawConnection {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` holding data not yet consumed.
    filled: usize,
    /// Length of the last reply, consumed at the start of the next request.
    consumed: usize,
    /// A `Connection: close` reply is a reply, not an error.
    accept_close: bool,
}

impl RawConnection {
    pub async fn connect(addr: SocketAddr) -> Result<Self, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("set TCP_NODELAY: {e}"))?;
        Ok(Self {
            stream,
            buf: vec![0; 16 * 1024],
            filled: 0,
            consumed: 0,
            accept_close: false,
        })
    }

    /// Takes `Connection: close` replies as replies ([`Reply::close`]) instead of errors.
    pub fn accept_close(mut self) -> Self {
        self.accept_close = true;
        self
    }

    /// Sends `request` (a complete HTTP/1.1 request) and reads the reply. An `Err` means
    /// the connection is no longer usable.
    pub async fn round_trip(&mut self, request: &[u8]) -> Result<Reply<'_>, String> {
        // Drop the previous reply; keep anything the server sent after it (nothing, with
        // one request in flight, but it costs one branch to be right).
        if self.consumed > 0 {
            self.buf.copy_within(self.consumed..self.filled, 0);
            self.filled -= self.consumed;
            self.consumed = 0;
        }
        if self.filled > 0 {
            return Err("the server sent bytes nobody asked for".to_owned());
        }
        self.stream
            .write_all(request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        loop {
            if let Some((status, head, body_len, close)) =
                parse_head(&self.buf[..self.filled], self.accept_close)?
            {
                let total = head + body_len;
                if total > MAX_REPLY {
                    return Err(format!("reply of {total} bytes is larger than {MAX_REPLY}"));
                }
                if self.buf.len() < total {
                    self.buf.resize(total, 0);
                }
                while self.filled < total {
                    self.fill().await?;
                }
                self.consumed = total;
                return Ok(Reply {
                    status,
                    body: &self.buf[head..total],
                    close,
                });
            }
            if self.filled == self.buf.len() {
                if self.buf.len() >= MAX_REPLY {
                    return Err("reply head is too large".to_owned());
                }
                self.buf.resize(self.buf.len() * 2, 0);
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<(), String> {
        let n = self
            .stream
            .read(&mut self.buf[self.filled..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection".to_owned());
        }
        self.filled += n;
        Ok(())
    }
}

/// `Some((status, head length, body length, Connection: close))` once the head is complete.
fn parse_head(
    data: &[u8],
    accept_close: bool,
) -> Result<Option<(u16, usize, usize, bool)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(data) {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed reply head: {e}")),
    };
    let status = response.code.unwrap_or(0);
    let mut body_len = None;
    let mut close = false;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(header.value)
                .map_err(|_| "non-ASCII Content-Length".to_owned())?;
            body_len = Some(
                text.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {text:?}"))?,
            );
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(
                "chunked replies are not supported by the raw client (try --client hyper)"
                    .to_owned(),
            );
        } else if header.name.eq_ignore_ascii_case("connection")
            && header.value.eq_ignore_ascii_case(b"close")
        {
            if !accept_close {
                return Err(format!("HTTP {status} with Connection: close"));
            }
            close = true;
        }
    }
    // Replies without a body (204, 304, 1xx) carry no Content-Length.
    let body_len = match body_len {
        Some(n) => n,
        None if status == 204 || status == 304 || (100..200).contains(&status) => 0,
        None => return Err(format!("HTTP {status} reply without Content-Length")),
    };
    Ok(Some((status, head, body_len, close)))
}

/// A complete `POST` request to `path` with `headers` (each ending in CRLF) and `body`.
pub fn encode_request(path: &str, host: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    );
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    out
}

/// A complete `POST` request with a JSON body, ready to be written as is.
pub fn encode_post(path: &str, host: &str, api_key: &str, body: &[u8]) -> Vec<u8> {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {api_key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_heads() {
        let reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\n{\"a\"}";
        let (status, head, body, close) =
            parse_head(reply, false).expect("valid").expect("complete");
        assert!(!close);
        assert_eq!((status, body), (200, 5));
        assert_eq!(&reply[head..head + body], b"{\"a\"}");
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-len", false)
                .expect("valid")
                .is_none()
        );
        assert!(
            parse_head(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                false
            )
            .is_err()
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n", false).is_err());
        assert!(parse_head(b"garbage\r\n\r\n", false).is_err());
        let closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert!(parse_head(closing, false).is_err());
        assert_eq!(
            parse_head(closing, true).expect("valid"),
            Some((200, closing.len(), 0, true))
        );
    }

    #[tokio::test]
    async fn round_trips_over_keep_alive() {
        let (addr, server) = crate::testserver::serve_one(|mut socket| async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            // Two requests on one connection, the second reply split in two writes.
            for reply in [
                &b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"result\":1"[..],
                &b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\n{}"[..],
            ] {
                let n = socket.read(&mut buf).await.expect("read");
                seen.extend_from_slice(&buf[..n]);
                let (first, second) = reply.split_at(20);
                socket.write_all(first).await.expect("write");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                socket.write_all(second).await.expect("write");
            }
            seen
        })
        .await;
        let mut conn = RawConnection::connect(addr).await.expect("connect");
        let request = encode_post("/api/publish", "x", "key", b"{}");
        let reply = conn.round_trip(&request).await.expect("first");
        assert_eq!((reply.status, reply.body), (200, &b"{\"result\":1"[..]));
        let reply = conn.round_trip(&request).await.expect("second");
        assert_eq!((reply.status, reply.body), (401, &b"{}"[..]));
        let seen = server.await.expect("server");
        assert!(seen.starts_with(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: key\r\n"));
    }
}
