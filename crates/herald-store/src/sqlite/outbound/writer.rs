//! The outbound database's writer thread: group commit of the calls of both stores.
//!
//! Owns: the write connection, the command channel from async callers, and the rule that a
//! caller hears back only after the transaction holding its work committed.
//!
//! May touch: the database through its one connection, and the reply channels of the calls
//! it runs.
//!
//! Every call is a closure run inside one shared transaction, each within its own savepoint:
//! a call that fails is rolled back alone and the others still commit. Calls that queue up
//! while a batch commits go into the next batch, so concurrent `finish`, `claim` and
//! `take_rate` calls from many workers share a commit (one WAL append, one fsync under
//! `full`) instead of one each.
//!
//! Why `std::sync::mpsc` here and not the history store's inbox: push calls carry batches
//! (hundreds of jobs each), so the context switch per lone command that the inbox saves is
//! noise next to the work of one call.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::DbError;

/// Work for the writer thread.
pub enum Command {
    Run(Box<dyn Work>),
    /// Commit what is queued before it, then stop.
    Shutdown,
}

/// One caller's work and its reply.
pub trait Work: Send {
    /// Runs inside the open transaction; true when it succeeded (its changes are kept).
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller: its own result, or `failure` when its batch did not commit.
    fn reply(self: Box<Self>, failure: Option<DbError>);
}

/// A closure and the channel its result goes back on.
pub struct Call<T, F> {
    work: Option<F>,
    result: Option<Result<T, DbError>>,
    reply: oneshot::Sender<Result<T, DbError>>,
}

impl<T, F> Call<T, F> {
    pub fn new(work: F, reply: oneshot::Sender<Result<T, DbError>>) -> Self {
        Self {
            work: Some(work),
            result: None,
            reply,
        }
    }
}

impl<T, F> Work for Call<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T, DbError> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        let result = work(conn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn reply(self: Box<Self>, failure: Option<DbError>) {
        let outcome = match (failure, self.result) {
            (Some(failure), _) => Err(failure),
            (None, Some(result)) => result,
            (None, None) => Err(DbError::Backend(
                "the outbound writer failed while running the call".to_owned(),
            )),
        };
        // A send fails only when the caller stopped waiting; the work took effect anyway.
        let _ = self.reply.send(outcome);
    }
}

/// The async side of the channel.
pub struct CommandSender(mpsc::Sender<Command>);

impl CommandSender {
    pub fn send(&self, command: Command) -> Result<(), ()> {
        self.0.send(command).map_err(|_| ())
    }

    /// Asks the writer to stop after what is queued; fine if it already stopped.
    pub fn shutdown(&self) {
        let _ = self.0.send(Command::Shutdown);
    }
}

pub fn channel() -> (CommandSender, mpsc::Receiver<Command>) {
    let (sender, receiver) = mpsc::channel();
    (CommandSender(sender), receiver)
}

/// The thread's body: takes everything queued (up to `max_batch` calls), runs it in one
/// transaction, commits, answers. Returns on [`Command::Shutdown`] (after the calls before
/// it) or when every sender is gone.
pub fn run(conn: Connection, inbox: mpsc::Receiver<Command>, max_batch: usize) {
    let mut batch: Vec<Box<dyn Work>> = Vec::with_capacity(max_batch);
    let mut stop = false;
    while !stop {
        match inbox.recv() {
            Ok(Command::Run(work)) => batch.push(work),
            Ok(Command::Shutdown) | Err(_) => break,
        }
        while batch.len() < max_batch {
            match inbox.try_recv() {
                Ok(Command::Run(work)) => batch.push(work),
                Ok(Command::Shutdown) => {
                    stop = true;
                    break;
                }
                Err(_) => break,
            }
        }
        run_batch(&conn, &mut batch);
    }
    // Calls queued after the Shutdown are dropped with the receiver: their callers see the
    // database as closed.
    tracing::debug!("sqlite outbound writer stopped");
}

fn run_batch(conn: &Connection, batch: &mut Vec<Box<dyn Work>>) {
    let outcome = apply(conn, batch);
    if outcome.is_err() && !conn.is_autocommit() {
        // If even the rollback fails, the next BEGIN reports the problem.
        let _ = conn.execute_batch("ROLLBACK");
    }
    let failure = match outcome {
        Ok(()) => None,
        Err(error) => {
            tracing::error!(error = %error, calls = batch.len(), "sqlite outbound batch failed");
            Some(error.to_string())
        }
    };
    for work in batch.drain(..) {
        work.reply(
            failure
                .as_ref()
                .map(|message| DbError::Backend(format!("sqlite write failed: {message}"))),
        );
    }
}

/// Runs every call of `batch` in one transaction and commits. On error the transaction may
/// be left open for the caller to roll back.
fn apply(conn: &Connection, batch: &mut [Box<dyn Work>]) -> rusqlite::Result<()> {
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    for work in batch.iter_mut() {
        conn.prepare_cached("SAVEPOINT call")?.execute([])?;
        // A panicking call counts as failed; its reply says so, and the others go on.
        let ok = catch_unwind(AssertUnwindSafe(|| work.run(conn))).unwrap_or(false);
        if conn.is_autocommit() {
            // Some errors (a full disk, I/O) make SQLite roll back the whole transaction:
            // the calls before this one are gone too, so the batch fails as a whole.
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                Some("the transaction was rolled back".to_owned()),
            ));
        }
        if !ok {
            conn.prepare_cached("ROLLBACK TO call")?.execute([])?;
        }
        conn.prepare_cached("RELEASE call")?.execute([])?;
    }
    conn.prepare_cached("COMMIT")?.execute([])?;
    Ok(())
}
