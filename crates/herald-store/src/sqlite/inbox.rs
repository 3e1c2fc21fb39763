//! The writer thread's inbox: the queue from async callers to the one writer thread.
//!
//! Owns: the queued [`Command`]s and whether each side is still there.
//!
//! May touch: nothing else. Callers push from tokio workers; only the writer thread takes.
//!
//! Why not `std::sync::mpsc`: its sender wakes a waiting receiver while holding the
//! channel's waker lock. On a busy core the woken writer thread runs at once, finds the lock
//! still held by the preempted sender when it comes back for the next command, and sleeps on
//! it: two extra context switches per lone publication (measured with `perf sched`: 40% of
//! the writer's switches were in `SyncWaker::register`). Here the sender releases the lock
//! before it wakes the writer, and the writer takes everything queued under one lock.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use super::writer::Command;

struct State {
    queued: VecDeque<Command>,
    /// The [`CommandSender`] is gone: the writer stops once the queue is empty.
    sender_gone: bool,
    /// The [`CommandInbox`] is gone (the writer stopped): sends fail.
    inbox_gone: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled, outside the lock, when a command arrives or the sender goes.
    arrived: Condvar,
}

/// The writer thread has stopped; nothing will take the command.
#[derive(Debug)]
pub struct WriterGone;

/// The callers' side (the store holds the one sender).
pub struct CommandSender {
    shared: Arc<Shared>,
}

/// The writer thread's side.
pub struct CommandInbox {
    shared: Arc<Shared>,
}

/// A connected sender and inbox.
pub fn channel() -> (CommandSender, CommandInbox) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queued: VecDeque::new(),
            sender_gone: false,
            inbox_gone: false,
        }),
        arrived: Condvar::new(),
    });
    (
        CommandSender {
            shared: shared.clone(),
        },
        CommandInbox { shared },
    )
}

impl CommandSender {
    /// Queues a command; fails (dropping it) if the writer has stopped.
    pub fn send(&self, command: Command) -> Result<(), WriterGone> {
        {
            let mut state = self.shared.state.lock();
            if state.inbox_gone {
                return Err(WriterGone);
            }
            state.queued.push_back(command);
        }
        // Cheap when the writer is not waiting (one atomic load).
        self.shared.arrived.notify_one();
        Ok(())
    }
}

impl Drop for CommandSender {
    fn drop(&mut self) {
        self.shared.state.lock().sender_gone = true;
        self.shared.arrived.notify_one();
    }
}

impl CommandInbox {
    /// The next command, waiting for one until `deadline`. `Disconnected` once the sender is
    /// gone and everything it sent was taken.
    pub fn recv_until(&self, deadline: Instant) -> Result<Command, RecvTimeoutError> {
        let mut state = self.shared.state.lock();
        loop {
            if let Some(command) = state.queued.pop_front() {
                return Ok(command);
            }
            if state.sender_gone {
                return Err(RecvTimeoutError::Disconnected);
            }
            if self
                .shared
                .arrived
                .wait_until(&mut state, deadline)
                .timed_out()
            {
                return state.queued.pop_front().ok_or(RecvTimeoutError::Timeout);
            }
        }
    }

    /// Moves up to `max` queued commands into `batch` without waiting.
    pub fn take_queued(&self, batch: &mut Vec<Command>, max: usize) {
        let mut state = self.shared.state.lock();
        let count = state.queued.len().min(max);
        batch.extend(state.queued.drain(..count));
    }
}

impl Drop for CommandInbox {
    fn drop(&mut self) {
        // Commands still queued are dropped outside the lock: their callers' reply channels
        // close, and they see the store as stopped.
        let left = {
            let mut state = self.shared.state.lock();
            state.inbox_gone = true;
            std::mem::take(&mut state.queued)
        };
        drop(left);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn flush() -> (
        Command,
        tokio::sync::oneshot::Receiver<Result<(), herald_core::store::StoreError>>,
    ) {
        let (reply, result) = tokio::sync::oneshot::channel();
        (Command::Flush { reply }, result)
    }

    #[test]
    fn commands_arrive_in_order_and_a_wait_times_out() {
        let (sender, inbox) = channel();
        for _ in 0..3 {
            assert!(sender.send(flush().0).is_ok());
        }
        let mut batch = Vec::new();
        assert!(matches!(
            inbox.recv_until(Instant::now()),
            Ok(Command::Flush { .. })
        ));
        inbox.take_queued(&mut batch, 1);
        assert_eq!(batch.len(), 1, "no more than asked for");
        inbox.take_queued(&mut batch, 10);
        assert_eq!(batch.len(), 2, "no more than was queued");
        let started = Instant::now();
        assert!(matches!(
            inbox.recv_until(started + Duration::from_millis(20)),
            Err(RecvTimeoutError::Timeout)
        ));
        assert!(started.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn a_waiting_writer_wakes_for_a_command_and_sees_the_sender_go() {
        let (sender, inbox) = channel();
        let writer = std::thread::spawn(move || {
            let far = Instant::now() + Duration::from_secs(30);
            let first = inbox.recv_until(far);
            let second = inbox.recv_until(far);
            (first.is_ok(), second)
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(sender.send(Command::Shutdown).is_ok());
        std::thread::sleep(Duration::from_millis(20));
        drop(sender);
        let (first, second) = writer.join().expect("writer thread");
        assert!(first);
        assert!(matches!(second, Err(RecvTimeoutError::Disconnected)));
    }

    #[test]
    fn sends_fail_once_the_writer_is_gone_and_queued_callers_are_told() {
        let (sender, inbox) = channel();
        let (command, result) = flush();
        assert!(sender.send(command).is_ok());
        drop(inbox);
        assert!(
            result.blocking_recv().is_err(),
            "the queued caller's reply closes"
        );
        assert!(sender.send(Command::Shutdown).is_err());
    }
}
