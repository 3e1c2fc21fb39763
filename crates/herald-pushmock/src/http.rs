//! The emulators' HTTP plumbing: an accept loop serving HTTP/1.1 and HTTP/2 prior knowledge
//! (h2c) on one port, whole-body reading with a cap, and small response builders.
//!
//! Owns: the listening sockets it is given and their connections. May touch: nothing else.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::http::{HeaderValue, Request, StatusCode, header, request::Parts};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What every emulator answers with: a whole body, no streaming.
pub type Response = hyper::Response<Full<Bytes>>;

/// Request bodies above this are refused before they are read to the end (the services'
/// own limits are a few KiB; this only keeps a misbehaving client from using memory).
pub const MAX_BODY: usize = 1 << 20;

/// An emulator: one call per request, with the head and the whole body.
pub trait Service: Send + Sync + 'static {
    fn call(self: Arc<Self>, head: Parts, body: Bytes) -> impl Future<Output = Response> + Send;

    /// A client connected (for connection-reuse assertions).
    fn connected(&self) {}

    /// The answer to a body above [`MAX_BODY`].
    fn too_large(&self) -> Response {
        json(
            StatusCode::PAYLOAD_TOO_LARGE,
            &serde_json::json!({"error": "body too large"}),
        )
    }
}

/// Serves `service` on `listener` until `shutdown` turns true; open connections then finish
/// their in-flight requests and close.
pub async fn serve<S: Service>(
    listener: TcpListener,
    service: Arc<S>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    // Apple advertises 1,000 concurrent streams per connection; senders multiplex on one.
    builder
        .http2()
        .max_concurrent_streams(1000)
        .initial_connection_window_size(4 << 20)
        .initial_stream_window_size(1 << 20);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let Ok((stream, _peer)) = accepted else {
            // Out of file descriptors and the like: keep serving the connections we have.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        service.connected();
        let builder = builder.clone();
        let service = service.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let handler = service_fn(move |req: Request<Incoming>| {
                let service = service.clone();
                async move { Ok::<_, Infallible>(dispatch(service, req).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), handler);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

async fn dispatch<S: Service>(service: Arc<S>, req: Request<Incoming>) -> Response {
    let (head, body) = req.into_parts();
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => service.call(head, collected.to_bytes()).await,
        Err(_) => service.too_large(),
    }
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut response = hyper::Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    response
}

/// An empty response.
pub fn empty(status: StatusCode) -> Response {
    let mut response = hyper::Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// Adds `Retry-After: <secs>` when given.
pub fn with_retry_after(mut response: Response, secs: Option<u64>) -> Response {
    if let Some(secs) = secs {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}
