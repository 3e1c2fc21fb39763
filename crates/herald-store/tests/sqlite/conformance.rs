//! The shared conformance suites against the SQLite store, once per sync policy: the history
//! suite on the store itself, the engine suite on the single-node engine over it. Every
//! factory call gets a fresh temporary data directory, so every store is a new database with
//! a new epoch. (SQLite is single-node: it runs no cluster or presence suite.)

use std::sync::Arc;

use herald_core::conformance::{run_engine_suite, run_history_suite};
use herald_core::engine::{Engine, LocalEngine};
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

async fn engine_suite(sync: SyncPolicy) {
    run_engine_suite(|feed| async move {
        let history = Arc::new(TempStore::open(sync, Arc::new(feed.clone()))?);
        Ok(Arc::new(LocalEngine::new(history, feed)) as Arc<dyn Engine>)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_engine_over_sqlite_full_sync_passes_engine_conformance() {
    engine_suite(SyncPolicy::Full).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_engine_over_sqlite_normal_sync_passes_engine_conformance() {
    engine_suite(SyncPolicy::Normal).await;
}

#[tokio::test(flavor = "current_thread")]
async fn local_engine_over_sqlite_passes_engine_conformance_on_a_single_threaded_runtime() {
    engine_suite(SyncPolicy::Normal).await;
}
