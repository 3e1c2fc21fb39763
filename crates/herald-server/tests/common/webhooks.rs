//! A webhook receiver for the tests: axum on 127.0.0.1:0, answering a status the test can
//! change, recording each request's `webhook-id` and JSON body.

use std::sync::Arc;

use axum::http::HeaderMap;
use parking_lot::Mutex;
use serde_json::Value;

/// (webhook-id, body) of each request received.
pub type Seen = Arc<Mutex<Vec<(String, Value)>>>;

/// Starts a receiver at `<url>` (path `/hook`) answering `*status`.
pub async fn receiver(status: Arc<Mutex<u16>>) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let record = record.clone();
            let status = status.clone();
            async move {
                let id = headers
                    .get("webhook-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                record.lock().push((id, body));
                axum::http::StatusCode::from_u16(*status.lock())
                    .unwrap_or(axum::http::StatusCode::OK)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, seen)
}

/// The bodies of type `kind` received so far.
pub fn of_type(seen: &Seen, kind: &str) -> Vec<Value> {
    seen.lock()
        .iter()
        .filter(|(_, body)| body["type"] == kind)
        .map(|(_, body)| body.clone())
        .collect()
}
