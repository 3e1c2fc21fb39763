//! The shared history conformance suite against the SQLite store, once per sync policy.
//! Every factory call gets a fresh temporary data directory, so every store is a new
//! database with a new epoch.

use std::sync::Arc;

use herald_core::conformance::run_history_suite;
use herald_core::store::HistoryStore;
use herald_store::sqlite::SyncPolicy;

use crate::common::TempStore;

async fn suite(sync: SyncPolicy) {
    run_history_suite(|listener| async move {
        Ok(Arc::new(TempStore::open(sync, listener)?) as Arc<dyn HistoryStore>)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_full_sync_passes_conformance() {
    suite(SyncPolicy::Full).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_normal_sync_passes_conformance() {
    suite(SyncPolicy::Normal).await;
}

#[tokio::test(flavor = "current_thread")]
async fn sqlite_passes_conformance_on_a_single_threaded_runtime() {
    suite(SyncPolicy::Normal).await;
}
