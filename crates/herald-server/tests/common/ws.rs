//! A WebSocket client speaking the Centrifugo JSON protocol, one command at a time.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// Sends `body` as command `id` and returns its reply, skipping pushes and other replies.
pub async fn command<S>(socket: &mut WebSocketStream<S>, id: u32, body: Value) -> Value
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut command = body;
    command["id"] = json!(id);
    socket
        .send(Message::text(command.to_string()))
        .await
        .expect("send");
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a reply within 10s")
            .expect("open")
            .expect("ok");
        let Message::Text(text) = message else {
            continue;
        };
        for line in text.as_str().lines() {
            let reply: Value = serde_json::from_str(line).expect("json");
            if reply["id"] == id {
                return reply;
            }
        }
    }
}
