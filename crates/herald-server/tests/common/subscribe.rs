//! One subscription attempt on any real-time transport, with its outcome: allowed, or refused
//! with the code (and, before streaming starts, the HTTP status) the client sees. The
//! permission and admission matrices run every case through every transport with this.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message};

use super::TestServer;

/// Every real-time transport a client can subscribe on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Sse,
    Stream,
    Poll,
    UniWebSocket,
}

impl Transport {
    pub const ALL: [Transport; 5] = [
        Transport::WebSocket,
        Transport::Sse,
        Transport::Stream,
        Transport::Poll,
        Transport::UniWebSocket,
    ];

    /// The name the backend proxy is told.
    pub fn proxy_name(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Sse => "sse",
            Transport::Stream => "http_stream",
            Transport::Poll => "long_poll",
            Transport::UniWebSocket => "uni_websocket",
        }
    }
}

/// What a subscription attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    /// `status`: the HTTP status of a one-way refusal (None on the WebSocket, where the
    /// refusal is an error reply).
    Refused {
        status: Option<u16>,
        code: u64,
    },
}

impl Outcome {
    pub fn allowed(&self) -> bool {
        *self == Outcome::Allowed
    }

    pub fn code(&self) -> Option<u64> {
        match self {
            Outcome::Allowed => None,
            Outcome::Refused { code, .. } => Some(*code),
        }
    }
}

/// Subscribes to `channel` over `transport` with a connection `token` (None: anonymous).
pub async fn subscribe(
    server: &TestServer,
    transport: Transport,
    token: Option<String>,
    channel: &str,
) -> Outcome {
    match transport {
        Transport::WebSocket => websocket(server, token, channel).await,
        Transport::Sse => one_way(server, "/connection/sse", token, channel).await,
        Transport::Stream => one_way(server, "/connection/stream", token, channel).await,
        Transport::Poll => one_way(server, "/connection/poll", token, channel).await,
        Transport::UniWebSocket => uni_websocket(server, token, channel).await,
    }
}

async fn websocket(server: &TestServer, token: Option<String>, channel: &str) -> Outcome {
    let url = format!(
        "{}/connection/websocket",
        server.url.replace("http://", "ws://")
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
    let connect = json!({"id": 1, "connect": {"token": token.unwrap_or_default()}});
    let subscribe = json!({"id": 2, "subscribe": {"channel": channel}});
    socket
        .send(Message::text(format!("{connect}\n{subscribe}")))
        .await
        .expect("send");
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("a reply within 5s")
            .expect("open")
            .expect("ok");
        let text = match message {
            Message::Text(text) => text,
            // The backend asked for a disconnect.
            Message::Close(Some(frame)) => {
                return Outcome::Refused {
                    status: None,
                    code: u64::from(u16::from(frame.code)),
                };
            }
            _ => continue,
        };
        for line in text.as_str().lines() {
            let reply: Value = serde_json::from_str(line).expect("json");
            if reply["id"] != 2 {
                continue;
            }
            // 105: the token's `channels` already subscribed it at connect (server-side).
            if reply["subscribe"].is_object() || reply["error"]["code"] == 105 {
                return Outcome::Allowed;
            }
            return Outcome::Refused {
                status: None,
                code: reply["error"]["code"].as_u64().expect("an error code"),
            };
        }
    }
}

/// A one-way refusal: the HTTP status and the `error.code` of its JSON body.
async fn refused(status: u16, body: &[u8]) -> Outcome {
    let body: Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("HTTP {status} with a non-JSON body"));
    Outcome::Refused {
        status: Some(status),
        code: body["error"]["code"].as_u64().expect("error.code"),
    }
}

async fn one_way(server: &TestServer, path: &str, token: Option<String>, channel: &str) -> Outcome {
    let mut request = reqwest::Client::new()
        .get(format!("{}{path}", server.url))
        .query(&[("channel", channel)]);
    if path.contains("poll") {
        request = request.query(&[("timeout", "0")]);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    if status == 200 {
        return Outcome::Allowed;
    }
    let body = response.bytes().await.expect("body");
    refused(status, &body).await
}

async fn uni_websocket(server: &TestServer, token: Option<String>, channel: &str) -> Outcome {
    let mut url = format!(
        "{}/connection/uni_websocket?channel={}",
        server.url.replace("http://", "ws://"),
        form_encode(channel)
    );
    if let Some(token) = token {
        url.push_str(&format!("&token={token}"));
    }
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => Outcome::Allowed,
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            refused(status, response.body().as_deref().unwrap_or_default()).await
        }
        Err(other) => panic!("uni_websocket: {other}"),
    }
}

pub fn form_encode(text: &str) -> String {
    text.replace('#', "%23").replace(',', "%2C")
}
