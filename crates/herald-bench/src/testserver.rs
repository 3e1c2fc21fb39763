//! Tests only: a TCP server on `127.0.0.1:0` that accepts one connection and runs the test's
//! script on it, for the load generator's hand-written HTTP and SSE clients.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Listens, then hands the first connection to `script`; returns the address to connect to
/// and the script's task (its result is what the server saw).
pub async fn serve_one<T, F, Fut>(script: F) -> (SocketAddr, JoinHandle<T>)
where
    T: Send + 'static,
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = T> + Send,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.expect("accept");
        script(socket).await
    });
    (addr, task)
}
