//! A connection's outbound queue: encoded frames waiting for the socket, bounded in bytes.
//!
//! Owns the per-connection delivery state: the byte budget (guarantee 5: a subscriber that
//! falls behind is cut off with the "slow" reason instead of growing memory, or, for channels
//! of namespaces with `conflate`, keeps only the newest queued publication per channel), per-channel
//! de-duplication by offset, and the recovery gate that holds live publications back while a
//! subscription's missed publications are being read, so a resumed stream has no gap and no
//! repeat. Transports write what [`Outbound::drain`] hands them, several frames per write.
//!
//! May touch: nothing but its own state; it is fed by the hub through [`ChannelSink`].

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::task::AtomicWaker;
use herald_core::hub::{BroadcastOutcome, Delivery, Subscriber};
use herald_core::publication::ChannelEvent;
use parking_lot::Mutex;

use crate::budget::{GRANULE, QueueBudget};
use crate::chanmap::ChannelMap;

/// Why the server closes a connection: a protocol disconnect code and its reason text.
/// Codes 3000–3499 tell clients to reconnect, 3500–3999 not to (the Centrifugo table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
}

impl CloseReason {
    /// The client closed the connection (or it dropped): nothing more is written.
    pub const CONNECTION_CLOSED: Self = Self {
        code: 3000,
        reason: "connection closed",
    };
    pub const SHUTDOWN: Self = Self {
        code: 3001,
        reason: "shutdown",
    };
    /// Something failed on the server's side (a backend that could not be asked): reconnect.
    pub const INTERNAL: Self = Self {
        code: 3004,
        reason: "internal server error",
    };
    pub const EXPIRED: Self = Self {
        code: 3005,
        reason: "connection expired",
    };
    /// The client fell behind: its queue went over the byte budget. It recovers on reconnect.
    pub const SLOW: Self = Self {
        code: 3008,
        reason: "slow",
    };
    pub const WRITE_ERROR: Self = Self {
        code: 3009,
        reason: "write error",
    };
    /// Too many live publications arrived while a subscription was recovering.
    pub const INSUFFICIENT_STATE: Self = Self {
        code: 3010,
        reason: "insufficient state",
    };
    pub const NO_PONG: Self = Self {
        code: 3012,
        reason: "no pong",
    };
    pub const INVALID_TOKEN: Self = Self {
        code: 3500,
        reason: "invalid token",
    };
    pub const BAD_REQUEST: Self = Self {
        code: 3501,
        reason: "bad request",
    };
    pub const FORCE_DISCONNECT: Self = Self {
        code: 3503,
        reason: "force disconnect",
    };
    pub const CHANNEL_LIMIT: Self = Self {
        code: 3505,
        reason: "channel limit",
    };
    pub const PERMISSION_DENIED: Self = Self {
        code: 3507,
        reason: "permission denied",
    };
    pub const MESSAGE_SIZE_LIMIT: Self = Self {
        code: 3511,
        reason: "message size limit exceeded",
    };

    /// Whether the client should reconnect.
    pub fn reconnect(self) -> bool {
        self.code < 3500
    }

    /// A backend's disconnect code as a close frame: 3000–3499 ask the client to reconnect,
    /// 3500–4999 not to; anything else becomes 3503.
    pub fn from_backend(code: u16) -> Self {
        match code {
            3000..=3499 => Self {
                code,
                reason: "backend reconnect",
            },
            3500..=4999 => Self {
                code,
                reason: "backend disconnect",
            },
            _ => Self::FORCE_DISCONNECT,
        }
    }
}

/// A stream position a frame moves its channel to (one-way transports put it in their
/// resume cursor when the frame is written).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FramePosition {
    pub channel: Arc<str>,
    pub offset: u64,
    pub epoch: Arc<str>,
}

/// Encoded bytes waiting for the socket, and the position they advance to, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub bytes: Bytes,
    pub position: Option<FramePosition>,
    /// Set on publications of conflating channels: when the queue is over budget, an older
    /// queued frame with the same key is superseded by a newer one.
    pub conflate_key: Option<Arc<str>>,
    /// When the frame stops being worth writing (ms since the Unix epoch; 0: never): an
    /// MQTT publication's message expiry, checked again when the frame is finally written.
    pub expires_at_ms: u64,
}

impl From<Bytes> for Frame {
    fn from(bytes: Bytes) -> Self {
        Self {
            bytes,
            position: None,
            conflate_key: None,
            expires_at_ms: 0,
        }
    }
}

/// Encodes channel events into this connection's wire format.
pub trait EventEncoder: Send + Sync + 'static {
    /// The frame for `event`, or `None` to skip it (e.g. join/leave when not wanted).
    fn encode(&self, event: &ChannelEvent) -> Option<Frame>;
}

#[derive(Default)]
struct ChannelState {
    /// Live events held back while the subscription recovers.
    held: Option<Vec<ChannelEvent>>,
    /// Highest publication offset queued; later duplicates are dropped.
    last_offset: u64,
}

struct State {
    frames: VecDeque<Frame>,
    bytes: usize,
    /// Taken by the writer and handed to the socket, not yet flushed.
    in_flight: usize,
    /// What the process budget was last told this queue holds.
    reported: usize,
    closed: Option<CloseReason>,
    channels: ChannelMap<ChannelState>,
}

/// Most bytes a WebSocket writer takes from its queue for one message.
pub const MAX_TAKE_BYTES: usize = 256 * 1024;

/// Most live events held per channel while it recovers.
pub const MAX_HELD_EVENTS: usize = 10_000;

/// The queue; shared by the hub-facing sinks and the connection's writer.
pub struct Outbound {
    state: Mutex<State>,
    /// The connection's writer, waiting for frames.
    ready: AtomicWaker,
    max_bytes: usize,
    /// The process-wide budget. The queue is listed in it only while it holds something
    /// worth reporting, so idle connections cost the budget nothing.
    budget: Option<Arc<QueueBudget>>,
    /// This queue, for the budget's list.
    this: Weak<Outbound>,
}

impl Drop for Outbound {
    fn drop(&mut self) {
        let reported = self.state.get_mut().reported;
        if let Some(budget) = &self.budget
            && reported > 0
        {
            budget.report(reported, 0);
            budget.deregister(self.budget_key());
        }
    }
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.lock();
        f.debug_struct("Outbound")
            .field("frames", &state.frames.len())
            .field("bytes", &state.bytes)
            .finish()
    }
}

fn new_state() -> Mutex<State> {
    Mutex::new(State {
        frames: VecDeque::new(),
        bytes: 0,
        in_flight: 0,
        reported: 0,
        closed: None,
        channels: ChannelMap::new(),
    })
}

impl Outbound {
    /// A queue bounded by `max_bytes` alone (tests, tools).
    pub fn new(max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            state: new_state(),
            ready: AtomicWaker::new(),
            max_bytes,
            budget: None,
            this: Weak::new(),
        })
    }

    /// A queue bounded by `max_bytes` that also counts against the process-wide `budget`.
    pub fn with_budget(max_bytes: usize, budget: &Arc<QueueBudget>) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            state: new_state(),
            ready: AtomicWaker::new(),
            max_bytes,
            budget: Some(budget.clone()),
            this: this.clone(),
        })
    }

    /// Tells the budget what the queue holds now, when it moved enough to matter.
    fn account_locked(&self, state: &mut State) {
        let Some(budget) = &self.budget else {
            return;
        };
        let held = state.bytes + state.in_flight;
        if held.abs_diff(state.reported) >= GRANULE || (held == 0 && state.reported != 0) {
            if state.reported == 0 {
                budget.register(self.budget_key(), self.this.clone());
            } else if held == 0 {
                budget.deregister(self.budget_key());
            }
            budget.report(state.reported, held);
            state.reported = held;
        }
    }

    /// The queue's key in the budget's list (its address, unique while it lives).
    fn budget_key(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// After the queue's lock is released: if the process is over its budget, close the
    /// connections holding the most.
    fn enforce_budget(&self) {
        if let Some(budget) = &self.budget
            && budget.over()
        {
            budget.enforce();
        }
    }

    /// Bytes queued plus bytes handed to the socket and not yet flushed.
    pub fn held_bytes(&self) -> usize {
        let state = self.state.lock();
        state.bytes + state.in_flight
    }

    /// Closes with `reason` unless already closed; true if this call closed it.
    pub fn close_if_open(&self, reason: CloseReason) -> bool {
        let mut state = self.state.lock();
        if state.closed.is_some() {
            return false;
        }
        self.close_locked(&mut state, reason);
        true
    }

    fn close_locked(&self, state: &mut State, reason: CloseReason) {
        if state.closed.is_none() {
            state.closed = Some(reason);
            // A slow client's backlog is what we must free (and a gone client's is useless);
            // otherwise queued replies (an error explaining the disconnect, say) are still
            // written before closing.
            if reason == CloseReason::SLOW || reason == CloseReason::CONNECTION_CLOSED {
                state.frames.clear();
                state.bytes = 0;
                self.account_locked(state);
            }
            state.channels.clear();
        }
        self.ready.wake();
    }

    fn push_locked(&self, state: &mut State, frame: Frame) -> bool {
        if state.closed.is_some() {
            return false;
        }
        if state.bytes + frame.bytes.len() > self.max_bytes
            && !Self::conflate_locked(state, &frame, self.max_bytes)
        {
            self.close_locked(state, CloseReason::SLOW);
            return false;
        }
        // Only a push onto an empty queue needs to wake the writer: `poll_take` registers the
        // waker and then empties the queue, so while frames are queued, the push that queued
        // the first of them has already woken (and used up) the registration. Skipping the
        // wake saves an atomic read-modify-write per delivery when the writer is behind.
        let wake = state.frames.is_empty();
        state.bytes += frame.bytes.len();
        state.frames.push_back(frame);
        self.account_locked(state);
        if wake {
            self.ready.wake();
        }
        true
    }

    /// Makes room for `incoming` by dropping superseded publications of conflating channels:
    /// first the queued ones `incoming` replaces, then every one but the newest per channel.
    /// True if `incoming` now fits. Only runs when the queue is over budget.
    fn conflate_locked(state: &mut State, incoming: &Frame, max_bytes: usize) -> bool {
        let fits = |state: &State| state.bytes + incoming.bytes.len() <= max_bytes;
        if let Some(key) = &incoming.conflate_key {
            state
                .frames
                .retain(|frame| frame.conflate_key.as_ref() != Some(key));
            state.bytes = state.frames.iter().map(|f| f.bytes.len()).sum();
            if fits(state) {
                return true;
            }
        }
        // Keep the newest frame of each key: walk from the back, drop keys already seen.
        let mut seen = std::collections::HashSet::new();
        let mut kept = VecDeque::with_capacity(state.frames.len());
        while let Some(frame) = state.frames.pop_back() {
            let superseded = frame
                .conflate_key
                .as_ref()
                .is_some_and(|key| !seen.insert(key.clone()));
            if !superseded {
                kept.push_front(frame);
            }
        }
        state.frames = kept;
        state.bytes = state.frames.iter().map(|f| f.bytes.len()).sum();
        fits(state)
    }

    /// Queues a frame that is not a channel event (a reply, a ping). False if closed.
    pub fn push(&self, frame: impl Into<Frame>) -> bool {
        let pushed = {
            let mut state = self.state.lock();
            self.push_locked(&mut state, frame.into())
        };
        self.enforce_budget();
        pushed
    }

    /// Closes the queue; the writer sees `reason` once it has drained nothing more.
    pub fn close(&self, reason: CloseReason) {
        let mut state = self.state.lock();
        self.close_locked(&mut state, reason);
    }

    pub fn closed(&self) -> Option<CloseReason> {
        self.state.lock().closed
    }

    /// [`Self::closed`], and wakes the calling task when the queue is closed later (or
    /// anything is queued): for a writer waiting on a stalled socket, which must still hear
    /// that its queue was closed.
    pub fn poll_closed(&self, cx: &mut Context<'_>) -> Option<CloseReason> {
        self.ready.register(cx.waker());
        self.closed()
    }

    /// Starts holding back live events of `channel` (call before subscribing in the hub).
    pub fn begin_recovery(&self, channel: &Arc<str>) {
        let mut state = self.state.lock();
        state
            .channels
            .get_or_insert_with(channel, ChannelState::default)
            .held = Some(Vec::new());
    }

    /// Queues `reply` (which carries the recovered publications up to `last_offset`), then
    /// every held live event after `last_offset`, and lets live events flow again.
    pub fn finish_recovery(
        &self,
        channel: &Arc<str>,
        replies: Vec<Frame>,
        last_offset: u64,
        encoder: &dyn EventEncoder,
    ) {
        self.queue_recovery(channel, replies, last_offset, encoder);
        self.enforce_budget();
    }

    fn queue_recovery(
        &self,
        channel: &Arc<str>,
        replies: Vec<Frame>,
        last_offset: u64,
        encoder: &dyn EventEncoder,
    ) {
        let mut state = self.state.lock();
        let held = match state.channels.get_mut(channel) {
            Some(entry) => {
                entry.last_offset = entry.last_offset.max(last_offset);
                entry.held.take().unwrap_or_default()
            }
            None => Vec::new(),
        };
        for reply in replies {
            if !self.push_locked(&mut state, reply) {
                return;
            }
        }
        for event in held {
            if !self.accept_locked(&mut state, channel, &event) {
                continue;
            }
            if let Some(frame) = encoder.encode(&event)
                && !self.push_locked(&mut state, frame)
            {
                return;
            }
        }
    }

    /// Forgets a channel (after unsubscribe) so a later subscription starts clean.
    pub fn forget(&self, channel: &str) {
        self.state.lock().channels.remove(channel);
    }

    /// Applies de-duplication by offset; true if the event should be queued.
    fn accept_locked(&self, state: &mut State, channel: &Arc<str>, event: &ChannelEvent) -> bool {
        let ChannelEvent::Publication(publication) = event else {
            return true;
        };
        let offset = publication.publication.offset;
        if offset == 0 {
            return true;
        }
        let entry = state
            .channels
            .get_or_insert_with(channel, ChannelState::default);
        if offset <= entry.last_offset {
            return false;
        }
        entry.last_offset = offset;
        true
    }

    /// Queues a live event for `channel`, or holds it while the channel recovers. With
    /// `conflate`, a publication may later be superseded by a newer one of the same channel
    /// if the queue goes over budget.
    pub fn deliver(
        &self,
        channel: &Arc<str>,
        event: &ChannelEvent,
        encoder: &dyn EventEncoder,
        conflate: bool,
    ) -> Delivery {
        let delivery = self.deliver_within_budget(channel, event, encoder, conflate);
        self.enforce_budget();
        delivery
    }

    fn deliver_within_budget(
        &self,
        channel: &Arc<str>,
        event: &ChannelEvent,
        encoder: &dyn EventEncoder,
        conflate: bool,
    ) -> Delivery {
        // Encode outside the lock: the first subscriber pays, the rest share the cached bytes.
        let frame = encode_live(channel, event, encoder, conflate);
        let mut state = self.state.lock();
        self.deliver_locked(&mut state, channel, event, frame)
    }

    /// Queues a run of live events of `channel`, in order, under one lock (and so with at
    /// most one wake-up of the writer), adding what happened to each to `outcome`. False once
    /// the queue is closed.
    pub fn deliver_many(
        &self,
        channel: &Arc<str>,
        events: &[ChannelEvent],
        encoder: &dyn EventEncoder,
        conflate: bool,
        outcome: &mut BroadcastOutcome,
    ) -> bool {
        let open = {
            let mut state = self.state.lock();
            let mut open = true;
            for event in events {
                // Encoded under the lock: after the first subscriber this is a cached copy.
                let frame = encode_live(channel, event, encoder, conflate);
                match self.deliver_locked(&mut state, channel, event, frame) {
                    Delivery::Queued => outcome.queued += 1,
                    Delivery::Dropped => outcome.dropped += 1,
                    Delivery::Closed => {
                        open = false;
                        break;
                    }
                }
            }
            open
        };
        self.enforce_budget();
        open
    }

    /// One live event, already encoded (`frame`), with the queue locked: held back while its
    /// channel recovers, dropped if a duplicate, queued otherwise.
    fn deliver_locked(
        &self,
        state: &mut State,
        channel: &Arc<str>,
        event: &ChannelEvent,
        frame: Option<Frame>,
    ) -> Delivery {
        if state.closed.is_some() {
            return Delivery::Closed;
        }
        if let ChannelEvent::Unrecoverable { .. } = event {
            // The node lost publications of this channel that history no longer holds: the
            // client reconnects and recovers from its own position, learning exactly what it
            // missed or that it cannot be told. Never a silent gap.
            self.close_locked(state, CloseReason::INSUFFICIENT_STATE);
            return Delivery::Dropped;
        }
        if let Some(entry) = state.channels.get_mut(channel)
            && let Some(held) = entry.held.as_mut()
        {
            if held.len() >= MAX_HELD_EVENTS {
                self.close_locked(state, CloseReason::INSUFFICIENT_STATE);
                return Delivery::Dropped;
            }
            held.push(event.clone());
            return Delivery::Queued;
        }
        if !self.accept_locked(state, channel, event) {
            return Delivery::Queued;
        }
        match frame {
            None => Delivery::Queued,
            Some(frame) => {
                if self.push_locked(state, frame) {
                    Delivery::Queued
                } else {
                    Delivery::Dropped
                }
            }
        }
    }

    /// Hands over every queued frame (the queue keeps no capacity while it waits), or, once
    /// the queue is closed and empty, the close reason. Only one task may take frames.
    /// At most `max_bytes` are taken (always at least one frame): a writer that turns what it
    /// takes into one message holds it twice while writing, so a backlog is better written
    /// in slices than whole.
    pub fn poll_take(
        &self,
        cx: &mut Context<'_>,
        max_bytes: usize,
    ) -> Poll<Result<VecDeque<Frame>, CloseReason>> {
        // Register before looking, so a frame pushed in between wakes this task.
        self.ready.register(cx.waker());
        let mut state = self.state.lock();
        if state.bytes <= max_bytes {
            // The writer takes again only once it has written what it took before: what it
            // takes now is what it holds (the process budget counts it until the next take).
            state.in_flight = std::mem::take(&mut state.bytes);
            self.account_locked(&mut state);
            if !state.frames.is_empty() {
                return Poll::Ready(Ok(std::mem::take(&mut state.frames)));
            }
        } else {
            let mut taken_bytes = 0;
            let count = state
                .frames
                .iter()
                .take_while(|frame| {
                    let first = taken_bytes == 0;
                    taken_bytes += frame.bytes.len();
                    first || taken_bytes <= max_bytes
                })
                .count();
            let rest = state.frames.split_off(count);
            let taken = std::mem::replace(&mut state.frames, rest);
            let taken_bytes: usize = taken.iter().map(|f| f.bytes.len()).sum();
            state.bytes -= taken_bytes;
            state.in_flight = taken_bytes;
            self.account_locked(&mut state);
            return Poll::Ready(Ok(taken));
        }
        match state.closed {
            Some(reason) => Poll::Ready(Err(reason)),
            None => Poll::Pending,
        }
    }

    /// Waits for frames and moves all queued ones into `out`. Once the queue is closed and
    /// empty, returns the close reason.
    pub async fn drain(&self, out: &mut Vec<Frame>) -> Result<(), CloseReason> {
        let frames = std::future::poll_fn(|cx| self.poll_take(cx, usize::MAX)).await?;
        out.extend(frames);
        Ok(())
    }

    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.state.lock().bytes
    }
}

/// The frame of a live event (with its conflation key when the channel conflates).
fn encode_live(
    channel: &Arc<str>,
    event: &ChannelEvent,
    encoder: &dyn EventEncoder,
    conflate: bool,
) -> Option<Frame> {
    let mut frame = encoder.encode(event);
    if conflate
        && matches!(event, ChannelEvent::Publication(_))
        && let Some(frame) = frame.as_mut()
    {
        frame.conflate_key = Some(channel.clone());
    }
    frame
}

/// The hub-facing subscriber of one connection on one channel.
pub struct ChannelSink {
    pub channel: Arc<str>,
    pub outbound: Arc<Outbound>,
    pub encoder: Arc<dyn EventEncoder>,
    /// The channel's namespace conflates publications for subscribers that fall behind.
    pub conflate: bool,
}

impl Subscriber for ChannelSink {
    fn deliver(&self, event: &ChannelEvent) -> Delivery {
        self.outbound
            .deliver(&self.channel, event, &*self.encoder, self.conflate)
    }

    fn deliver_many(&self, events: &[ChannelEvent], outcome: &mut BroadcastOutcome) -> bool {
        self.outbound.deliver_many(
            &self.channel,
            events,
            &*self.encoder,
            self.conflate,
            outcome,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::publication::{Payload, Publication, PublicationEvent};

    #[test]
    fn backend_disconnect_codes_keep_their_meaning() {
        assert_eq!(CloseReason::from_backend(3000).code, 3000);
        assert!(CloseReason::from_backend(3000).reconnect());
        assert_eq!(CloseReason::from_backend(4500).reason, "backend disconnect");
        assert!(!CloseReason::from_backend(4500).reconnect());
        assert_eq!(
            CloseReason::from_backend(1000),
            CloseReason::FORCE_DISCONNECT
        );
        assert_eq!(
            CloseReason::from_backend(5000),
            CloseReason::FORCE_DISCONNECT
        );
    }

    struct Offsets;
    impl EventEncoder for Offsets {
        fn encode(&self, event: &ChannelEvent) -> Option<Frame> {
            match event {
                ChannelEvent::Publication(p) => {
                    Some(Bytes::from(p.publication.offset.to_string()).into())
                }
                _ => None,
            }
        }
    }

    fn publication(channel: &Arc<str>, offset: u64) -> ChannelEvent {
        ChannelEvent::Publication(Arc::new(PublicationEvent::new(
            channel.clone(),
            Arc::from("e"),
            Publication {
                offset,
                time_ms: 0,
                data: Payload::Json(Bytes::from_static(b"{}")),
                tags: Default::default(),
                info: None,
            },
        )))
    }

    async fn drained(outbound: &Outbound) -> Vec<String> {
        let mut out = Vec::new();
        outbound.drain(&mut out).await.expect("open");
        out.iter()
            .map(|f| String::from_utf8_lossy(&f.bytes).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn recovery_gate_has_no_gap_and_no_repeat() {
        let outbound = Outbound::new(1 << 20);
        let channel: Arc<str> = Arc::from("c");
        outbound.begin_recovery(&channel);
        // Live publications 4..=6 arrive while history (up to 5) is being read.
        for offset in 4..=6 {
            assert_eq!(
                outbound.deliver(&channel, &publication(&channel, offset), &Offsets, false),
                Delivery::Queued
            );
        }
        assert_eq!(outbound.queued_bytes(), 0, "held back during recovery");
        outbound.finish_recovery(
            &channel,
            vec![Bytes::from_static(b"reply:3,4,5").into()],
            5,
            &Offsets,
        );
        outbound.deliver(&channel, &publication(&channel, 7), &Offsets, false);
        outbound.deliver(&channel, &publication(&channel, 7), &Offsets, false);
        assert_eq!(drained(&outbound).await, vec!["reply:3,4,5", "6", "7"]);
    }

    #[tokio::test]
    async fn a_run_of_events_keeps_the_gate_and_dedup_and_wakes_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::task::Wake;
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let outbound = Outbound::new(1 << 20);
        let channel: Arc<str> = Arc::from("c");
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(outbound.poll_take(&mut cx, usize::MAX).is_pending());
        outbound.begin_recovery(&channel);
        let mut outcome = BroadcastOutcome::default();
        let held: Vec<_> = (4..=6).map(|o| publication(&channel, o)).collect();
        assert!(outbound.deliver_many(&channel, &held, &Offsets, false, &mut outcome));
        assert_eq!(outcome.queued, 3);
        assert_eq!(outbound.queued_bytes(), 0, "held back during recovery");
        outbound.finish_recovery(&channel, vec![Bytes::from_static(b"r").into()], 5, &Offsets);
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            1,
            "one wake-up for the queue"
        );
        // A run with a repeat and a later offset: the repeat is dropped, one wake-up at most.
        let run: Vec<_> = [6, 7, 7, 8]
            .into_iter()
            .map(|o| publication(&channel, o))
            .collect();
        assert!(outbound.deliver_many(&channel, &run, &Offsets, false, &mut outcome));
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            1,
            "already woken, not again"
        );
        assert_eq!(drained(&outbound).await, vec!["r", "6", "7", "8"]);
        // Emptied by the writer: the next run wakes it once more.
        assert!(outbound.poll_take(&mut cx, usize::MAX).is_pending());
        let run: Vec<_> = (9..=11).map(|o| publication(&channel, o)).collect();
        assert!(outbound.deliver_many(&channel, &run, &Offsets, false, &mut outcome));
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
        outbound.close(CloseReason::SHUTDOWN);
        assert!(!outbound.deliver_many(&channel, &run, &Offsets, false, &mut outcome));
    }

    #[tokio::test]
    async fn over_budget_closes_as_slow() {
        let outbound = Outbound::new(10);
        let channel: Arc<str> = Arc::from("c");
        for offset in 1..=9 {
            outbound.deliver(&channel, &publication(&channel, offset), &Offsets, false);
        }
        assert_eq!(
            outbound.deliver(&channel, &publication(&channel, 10), &Offsets, false),
            Delivery::Dropped
        );
        assert_eq!(
            outbound.deliver(&channel, &publication(&channel, 11), &Offsets, false),
            Delivery::Closed
        );
        let mut out = Vec::new();
        assert_eq!(outbound.drain(&mut out).await, Err(CloseReason::SLOW));
        assert_eq!(outbound.queued_bytes(), 0, "memory released on close");
    }

    #[tokio::test]
    async fn conflation_keeps_the_newest_publication_per_channel_and_other_frames() {
        // Room for four one-byte frames.
        let outbound = Outbound::new(4);
        let a: Arc<str> = Arc::from("a");
        let b: Arc<str> = Arc::from("b");
        outbound.deliver(&a, &publication(&a, 1), &Offsets, true);
        outbound.deliver(&b, &publication(&b, 2), &Offsets, true);
        assert!(outbound.push(Bytes::from_static(b"r")), "a reply");
        outbound.deliver(&a, &publication(&a, 3), &Offsets, true);
        // Over budget: a's offset 1 is superseded by 5; b's 2 and the reply stay.
        assert_eq!(
            outbound.deliver(&a, &publication(&a, 5), &Offsets, true),
            Delivery::Queued
        );
        assert_eq!(outbound.closed(), None, "conflated, not disconnected");
        assert_eq!(drained(&outbound).await, vec!["2", "r", "5"]);
        // Frames that cannot be conflated still close the connection as slow.
        for reply in [b"1", b"2", b"3", b"4"] {
            outbound.push(Bytes::from_static(reply));
        }
        assert!(!outbound.push(Bytes::from_static(b"5")));
        assert_eq!(outbound.closed(), Some(CloseReason::SLOW));
    }
}
