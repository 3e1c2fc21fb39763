//! The server's life: build it from config ([`Server::build`]), serve on a listener until a
//! shutdown future resolves, then shut down in order ([`Server::run`]). [`run`] is both in one
//! call. The `herald serve` command and the tests start servers through this module only, so
//! the tests exercise what users run.
//!
//! Shutdown order: `/ready` answers 503 at once; the listener keeps accepting for
//! `server.shutdown_delay` (load balancers notice and stop sending clients); then it stops
//! accepting, real-time connections are told to go (3001), in-flight requests get
//! `server.shutdown_timeout` to finish, push workers and `[[sources]]` finish what they hold,
//! and the history store is flushed.
//!
//! May touch: the listener it is given; everything else through [`crate::build`] and
//! [`crate::app`].

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::app::AppState;
use crate::build::{BuildError, Reloader};
use crate::config::Config;

/// Why a server stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("flushing history failed: {0}")]
    Flush(String),
    #[error("flushing history did not finish within {0:?}")]
    FlushTimeout(Duration),
}

/// A server built from config, not yet serving.
#[derive(Debug)]
pub struct Server {
    state: Arc<AppState>,
    reloader: Reloader,
}

impl Server {
    /// Builds every object from `config` (see [`crate::build`]); fails on anything that does
    /// not build. Needs a Tokio runtime.
    pub async fn build(config: Config) -> Result<Self, BuildError> {
        let built = crate::build::server(config).await?;
        Ok(Self {
            state: built.state,
            reloader: built.reloader,
        })
    }

    /// What request handlers share (for the banner, metrics and tests).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Applies a re-read config to the running server (SIGHUP).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Serves on `listener` until `shutdown` resolves, then shuts down in order (see the
    /// module header). Returns once the history is flushed.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RunError> {
        let state = self.state;
        let server = &state.config.server;
        let delay = server.shutdown_delay.as_duration();
        let drain_timeout = server.shutdown_timeout.as_duration();
        let (begun_tx, begun_rx) = tokio::sync::oneshot::channel::<()>();
        let stop = {
            let state = state.clone();
            async move {
                shutdown.await;
                state.ready.store(false, Ordering::SeqCst);
                tracing::info!(
                    ?delay,
                    "shutting down: /ready answers 503; accepting until the shutdown delay ends"
                );
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                tracing::info!("no new connections; finishing in-flight requests");
                // Upgraded and streaming connections outlive the HTTP server's graceful
                // shutdown: tell them to close (3001) so clients reconnect elsewhere and
                // resume.
                state.realtime.shut_down();
                let _ = begun_tx.send(());
            }
        };
        state.ready.store(true, Ordering::SeqCst);
        let mut push_tasks = state.push.as_ref().map(|push| push.start());
        state.sources.start(&state.node);
        let mut webhook_tasks = match state.webhooks.as_ref().map(|w| w.start()).transpose() {
            Ok(tasks) => tasks,
            Err(error) => return Err(RunError::Build(BuildError::Webhooks(error))),
        };
        let (purge_stop, purge_stopped) = tokio::sync::oneshot::channel::<()>();
        let purge = state
            .outbound
            .clone()
            .zip(crate::build::outbound_retention(&state.config))
            .map(|(stores, retention)| {
                tokio::spawn(crate::outbound::purge_finished(stores, retention, async {
                    let _ = purge_stopped.await;
                }))
            });
        let mut sink_tasks = state.sinks.as_ref().map(|sinks| sinks.start());
        #[cfg(feature = "redis")]
        let heartbeat = tokio::spawn(crate::cluster::Cluster::run(state.clone()));
        let mut mqtt_tasks = state.mqtt.as_ref().map(|mqtt| mqtt.start());
        let mut serving = tokio::spawn(crate::app::serve(listener, state.clone(), stop));
        // Drain time counts from the end of the shutdown delay.
        let finished = tokio::select! {
            _ = &mut serving => true,
            _ = begun_rx => false,
        };
        if !finished
            && tokio::time::timeout(drain_timeout, &mut serving)
                .await
                .is_err()
        {
            tracing::warn!(
                ?drain_timeout,
                "in-flight requests did not finish in time; closing them"
            );
            serving.abort();
        }
        if let Some(tasks) = &mut mqtt_tasks {
            // They stop accepting at the shutdown signal; their connections close with it.
            while tasks.join_next().await.is_some() {}
        }
        #[cfg(feature = "redis")]
        {
            heartbeat.abort();
            if let Some(cluster) = &state.cluster
                && let Err(error) = cluster.registry.leave(state.node.uid()).await
            {
                tracing::warn!(%error, "could not leave the node registry");
            }
        }
        // Every outbound worker stops claiming first, then its sends in flight finish and are
        // recorded; what is still queued stays queued.
        if let Some(push) = &state.push {
            push.stop();
        }
        if let Some(webhooks) = &state.webhooks {
            webhooks.stop();
        }
        if let Some(sinks) = &state.sinks {
            sinks.stop();
        }
        let outbound_drain = drain_timeout.max(Duration::from_secs(1));
        for (tasks, what) in [
            (push_tasks.as_mut(), "push sends"),
            (webhook_tasks.as_mut(), "webhook deliveries"),
            (sink_tasks.as_mut(), "sink deliveries"),
        ] {
            if let Some(tasks) = tasks {
                drain_outbound(what, tasks, outbound_drain).await;
            }
        }
        let _ = purge_stop.send(());
        if let Some(purge) = purge {
            let _ = purge.await;
        }
        // Sources finish publishing and acknowledging their batch in flight; the rest stays
        // with the broker.
        state
            .sources
            .stop(drain_timeout.max(Duration::from_secs(5)))
            .await;
        let flush_timeout = Duration::from_secs(5).max(drain_timeout);
        match tokio::time::timeout(flush_timeout, state.node.shutdown()).await {
            Ok(Ok(())) => {
                tracing::info!("history flushed; bye");
                Ok(())
            }
            Ok(Err(error)) => Err(RunError::Flush(error.to_string())),
            Err(_) => Err(RunError::FlushTimeout(flush_timeout)),
        }
    }
}

/// Waits up to `timeout` for stopped outbound workers to finish what they are sending; past
/// it they are cut (their jobs' leases run out and another claim sends them).
async fn drain_outbound(what: &str, tasks: &mut tokio::task::JoinSet<()>, timeout: Duration) {
    let drained = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(timeout, drained).await.is_err() {
        tracing::warn!("{what} did not finish in time; their leases will expire");
        tasks.abort_all();
    }
}

/// Builds a server from `config` and runs it on `listener` until `shutdown` resolves: the
/// one-call form of [`Server::build`] and [`Server::run`].
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    Server::build(config).await?.run(listener, shutdown).await
}
