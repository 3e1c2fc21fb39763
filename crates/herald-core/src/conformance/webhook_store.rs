//! The rules every [`WebhookStore`] keeps: documents per collection (put replaces, delete
//! says whether it removed), attempt logs per message in order, capped, purged by age.

use std::sync::Arc;

use bytes::Bytes;

use crate::webhook_store::{
    AttemptRecord, ENDPOINT_STATES, ENDPOINTS, MAX_ATTEMPTS_PER_MESSAGE, WebhookStore,
};

fn attempt(message: &str, number: u32, at: u64) -> AttemptRecord {
    AttemptRecord {
        message: message.to_owned(),
        endpoint: "ep".to_owned(),
        attempt: number,
        at,
        status: 500,
        duration_ms: 3,
        error: format!("HTTP 500 on attempt {number}"),
    }
}

/// Runs every rule against a fresh store from `make`.
pub async fn run_webhook_store_suite<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn WebhookStore>>,
{
    let store = make().await;
    assert!(
        store.documents(ENDPOINTS).await.expect("list").is_empty(),
        "documents: a fresh store has none"
    );
    store
        .put_document(ENDPOINTS, "a", Bytes::from_static(b"{\"v\":1}"))
        .await
        .expect("put");
    store
        .put_document(ENDPOINTS, "a", Bytes::from_static(b"{\"v\":2}"))
        .await
        .expect("replace");
    store
        .put_document(ENDPOINT_STATES, "a", Bytes::from_static(b"{\"s\":1}"))
        .await
        .expect("put state");
    let endpoints = store.documents(ENDPOINTS).await.expect("list");
    assert_eq!(
        endpoints.get("a").map(|b| b.as_ref()),
        Some(&b"{\"v\":2}"[..]),
        "documents: put replaces, collections are apart"
    );
    assert_eq!(endpoints.len(), 1, "documents: collections are apart");
    assert_eq!(
        store
            .document(ENDPOINTS, "a")
            .await
            .expect("get")
            .as_deref(),
        Some(&b"{\"v\":2}"[..]),
        "documents: one is read by id"
    );
    assert_eq!(
        store.document(ENDPOINTS, "b").await.expect("get"),
        None,
        "documents: a missing one is None"
    );
    assert!(
        store.delete_document(ENDPOINTS, "a").await.expect("delete"),
        "documents: delete reports a removed document"
    );
    assert!(
        !store.delete_document(ENDPOINTS, "a").await.expect("delete"),
        "documents: delete of a missing document reports false"
    );
    assert_eq!(
        store.documents(ENDPOINT_STATES).await.expect("list").len(),
        1,
        "documents: deleting in one collection leaves the other"
    );

    let message = "msg_conformance";
    store
        .record_attempts(vec![attempt(message, 1, 1_000), attempt("other", 1, 1_000)])
        .await
        .expect("record");
    store
        .record_attempts(vec![attempt(message, 2, 2_000)])
        .await
        .expect("record");
    let log = store.attempts(message).await.expect("attempts");
    assert_eq!(
        log,
        vec![attempt(message, 1, 1_000), attempt(message, 2, 2_000)],
        "attempts: kept per message, in order, every field"
    );
    let many: Vec<_> = (3..(MAX_ATTEMPTS_PER_MESSAGE as u32 + 10))
        .map(|n| attempt(message, n, 3_000 + u64::from(n)))
        .collect();
    store.record_attempts(many).await.expect("record many");
    let log = store.attempts(message).await.expect("attempts");
    assert_eq!(
        log.len(),
        MAX_ATTEMPTS_PER_MESSAGE,
        "attempts: at most MAX_ATTEMPTS_PER_MESSAGE kept"
    );
    assert_eq!(
        log.last().map(|a| a.attempt),
        Some(MAX_ATTEMPTS_PER_MESSAGE as u32 + 9),
        "attempts: the newest are kept"
    );
    store.purge_attempts(1_500).await.expect("purge");
    assert!(
        store.attempts("other").await.expect("attempts").is_empty(),
        "attempts: purge forgets attempts made before the cut"
    );
    assert!(
        store
            .attempts("unknown")
            .await
            .expect("attempts")
            .is_empty(),
        "attempts: an unknown message has none"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook_store::MemoryWebhookStore;

    #[tokio::test]
    async fn the_memory_store_conforms() {
        run_webhook_store_suite(|| async {
            Arc::new(MemoryWebhookStore::new()) as Arc<dyn WebhookStore>
        })
        .await;
    }
}
