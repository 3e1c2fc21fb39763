//! What a fan-out subscriber does with what it receives: recognising server pings and
//! publications in WebSocket frames and SSE events, the timestamped payload the publisher
//! sends, and per-subscriber delivery accounting by offset (missed, duplicate, gap).
//!
//! Owns no I/O and no shared state: the worker calls these for every line it reads, so they
//! are written to be cheap. Publications are found by scanning for the few fields the bench
//! needs (`channel`, the payload's `t`, `offset`) instead of decoding the JSON; that is only
//! sound because the bench publishes the payload itself (`{"t":<ns>,"p":"xxx…"}`, see
//! [`payload`]) and Herald writes `offset` after `data`.
//!
//! Peers have no stream offsets: their payload also carries a per-channel sequence number
//! (`{"t":<ns>,"s":<seq>,"p":"xxx…"}`, see [`seq_payload`]), read back by [`peer_fields`]
//! (which also reads it escaped inside a JSON string, as Pusher and Socket.IO deliver it) and
//! counted by [`SeqTracker`], which tolerates reordering: a peer's publications may go out on
//! several publisher connections at once, so they can arrive in another order.

use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use memchr::memmem::{Finder, FinderRev};

/// Nanoseconds since the Unix epoch (CLOCK_REALTIME): the clock every process of the bench
/// shares, so a timestamp written by the publisher can be read by any subscriber process.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The JSON `data` of one benchmark publication: its send time and padding so the whole
/// object is about `size` bytes (never less than the timestamp itself).
pub fn payload(sent_ns: u64, size: usize) -> String {
    // `{"t":` + 19 digits + `,"p":"` + `"}` = 32 bytes around the padding.
    let pad = size.saturating_sub(32);
    let mut out = String::with_capacity(size.max(40));
    out.push_str("{\"t\":");
    out.push_str(&sent_ns.to_string());
    out.push_str(",\"p\":\"");
    out.extend(std::iter::repeat_n('x', pad));
    out.push_str("\"}");
    out
}

/// The data of one publication to a peer: [`payload`] plus the channel's sequence number
/// (1, 2, 3, … per channel), about `size` bytes in all.
pub fn seq_payload(sent_ns: u64, seq: u64, size: usize) -> String {
    let seq_field = format!(",\"s\":{seq}");
    let mut out = payload(sent_ns, size.saturating_sub(seq_field.len()));
    let at = out.find(",\"p\":").unwrap_or(out.len());
    out.insert_str(at, &seq_field);
    out
}

/// The send time and sequence number from a peer's message: the [`seq_payload`] as it was
/// published, or escaped inside a JSON string (`{\"t\":…,\"s\":…}`).
pub fn peer_fields(text: &str) -> Option<(u64, u64)> {
    const KEYS: [(&str, &str); 2] = [("\"t\":", "\"s\":"), ("\\\"t\\\":", "\\\"s\\\":")];
    let (at, (t_key, s_key)) = KEYS
        .iter()
        .find_map(|keys| find(text, keys.0).map(|at| (at, keys)))?;
    let rest = &text[at..];
    Some((number_after(rest, t_key)?, number_after(rest, s_key)?))
}

/// One publication as a subscriber saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received<'a> {
    pub channel: &'a str,
    /// 0 when the channel keeps no history (no offsets).
    pub offset: u64,
    /// The publisher's timestamp, when the payload carries one.
    pub sent_ns: Option<u64>,
}

/// What one line of a WebSocket text frame is.
#[derive(Debug, PartialEq, Eq)]
pub enum WsLine<'a> {
    /// `{}`: the server's ping, to be answered with `{}`.
    Ping,
    /// A `pub` push.
    Publication(Received<'a>),
    /// A reply, a join/leave push, or anything else.
    Other,
}

/// Classifies one line of a WebSocket frame (frames hold one JSON message per line).
pub fn ws_line(line: &str) -> WsLine<'_> {
    let line = line.trim();
    if line == "{}" {
        return WsLine::Ping;
    }
    // A push: {"push":{"channel":"c","pub":{"data":…,"offset":N}}}.
    let Some(rest) = line.strip_prefix("{\"push\":") else {
        return WsLine::Other;
    };
    let Some(at) = find(rest, "\"pub\":") else {
        return WsLine::Other;
    };
    match publication_fields(rest, &rest[at..]) {
        Some(received) => WsLine::Publication(received),
        None => WsLine::Other,
    }
}

/// Reads the `data:` of an SSE `publication` event: `{"channel":"c","data":…,"offset":N}`.
pub fn sse_publication(data: &str) -> Option<Received<'_>> {
    publication_fields(data, data)
}

/// `channel` from `head`, `t` and `offset` from `body` (the part holding `data`).
fn publication_fields<'a>(head: &'a str, body: &'a str) -> Option<Received<'a>> {
    let channel = string_after(head, "\"channel\":\"")?;
    let sent_ns = find(body, "\"data\":").and_then(|at| number_after(&body[at..], "\"t\":"));
    // The last `"offset":` is the publication's: it follows `data`, which the bench wrote.
    let offset = OFFSET_REV
        .rfind(body.as_bytes())
        .and_then(|at| number_after(&body[at..], "\"offset\":"))
        .unwrap_or(0);
    Some(Received {
        channel,
        offset,
        sent_ns,
    })
}

/// The keys the scanner looks for, each with its searcher built once.
static FINDERS: LazyLock<Vec<(&'static str, Finder<'static>)>> = LazyLock::new(|| {
    [
        "\"pub\":",
        "\"data\":",
        "\"t\":",
        "\"s\":",
        "\"offset\":",
        "\"channel\":\"",
        "\\\"t\\\":",
        "\\\"s\\\":",
    ]
    .into_iter()
    .map(|key| (key, Finder::new(key.as_bytes())))
    .collect()
});

/// The last `"offset":` (a publication's own follows its data).
static OFFSET_REV: LazyLock<FinderRev<'static>> = LazyLock::new(|| FinderRev::new(b"\"offset\":"));

/// Where `key` first occurs in `text`. `str::find` with a string pattern sets up a two-way
/// searcher on every call, which was about a third of a subscriber process's CPU at a million
/// deliveries per second (several searches per line); the keys' searchers are built once.
/// Keys are ASCII, so the index is a character boundary.
fn find(text: &str, key: &str) -> Option<usize> {
    match FINDERS.iter().find(|(k, _)| *k == key) {
        Some((_, finder)) => finder.find(text.as_bytes()),
        None => memchr::memmem::find(text.as_bytes(), key.as_bytes()),
    }
}

/// The string value right after `key` (which ends with the opening quote). Channel names
/// cannot hold quotes or backslashes, so the next quote ends it.
fn string_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let start = find(text, key)? + key.len();
    let len = memchr::memchr(b'"', &text.as_bytes()[start..])?;
    Some(&text[start..start + len])
}

/// The unsigned integer right after the first `key` in `text`.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = find(text, key)? + key.len();
    let mut value: Option<u64> = None;
    for digit in text[start..].bytes().take_while(u8::is_ascii_digit) {
        value = Some(
            value
                .unwrap_or(0)
                .checked_mul(10)?
                .checked_add(u64::from(digit - b'0'))?,
        );
    }
    value
}

/// Microseconds from `sent_ns` to `received_ns`, at least 1 (the histogram's floor). A
/// receive time before the send time (clock stepped) counts as 1 µs.
pub fn latency_us(sent_ns: u64, received_ns: u64) -> u64 {
    (received_ns.saturating_sub(sent_ns) / 1000).max(1)
}

/// Delivery accounting for one subscription, by offset. Live delivery must be in order with
/// no duplicates (docs/guarantees.md): every offset above the subscription's start position
/// must arrive exactly once.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tracker {
    /// The stream top when the subscription started (from the subscribe reply).
    pub start: u64,
    /// The highest offset seen so far.
    pub last: u64,
    /// Distinct publications received (offset above `last` when they came).
    pub received: u64,
    /// Publications whose offset was not above the last one seen (repeats or reordering).
    pub duplicates: u64,
    /// Offsets skipped over while receiving (holes that a later publication revealed).
    pub gaps: u64,
}

impl Tracker {
    pub fn new(start: u64) -> Self {
        Self {
            start,
            last: start,
            ..Self::default()
        }
    }

    /// Counts a publication; `true` when it is new. Offset 0 (a channel without history)
    /// cannot be checked and always counts as new.
    pub fn record(&mut self, offset: u64) -> bool {
        if offset == 0 {
            self.received += 1;
            return true;
        }
        if offset <= self.last {
            self.duplicates += 1;
            return false;
        }
        self.gaps += offset - self.last - 1;
        self.last = offset;
        self.received += 1;
        true
    }

    /// Publications between the start and `final_offset` (the channel's last offset, as the
    /// publisher's replies reported it) that never arrived, holes and tail included.
    pub fn missed(&self, final_offset: u64) -> u64 {
        final_offset
            .saturating_sub(self.start)
            .saturating_sub(self.received)
    }
}

/// Largest sequence number a [`SeqTracker`] keeps a bit for (a higher one is garbage).
const MAX_SEQ: u64 = 1 << 24;

/// Delivery accounting for one subscription to a peer, by the publisher's per-channel
/// sequence number (1, 2, …): which numbers arrived (a bit each), repeats, and arrivals
/// below the highest number seen so far (reordering, which peers do not promise to avoid
/// across publisher connections).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SeqTracker {
    seen: Vec<u64>,
    /// The highest sequence number seen.
    pub last: u64,
    /// Distinct sequence numbers received.
    pub received: u64,
    pub duplicates: u64,
    /// Arrived after a higher number did.
    pub reordered: u64,
}

impl SeqTracker {
    /// Counts sequence number `seq`; `true` when it is new (0 or one above [`MAX_SEQ`] is
    /// never new).
    pub fn record(&mut self, seq: u64) -> bool {
        if seq == 0 || seq > MAX_SEQ {
            return false;
        }
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if self.seen.len() <= word {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return false;
        }
        self.seen[word] |= 1 << bit;
        self.received += 1;
        if seq < self.last {
            self.reordered += 1;
        }
        self.last = self.last.max(seq);
        true
    }

    /// Of `published` publications to the channel (numbered 1 ..= published), the ones
    /// that never arrived.
    pub fn missed(&self, published: u64) -> u64 {
        published.saturating_sub(self.received)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_json_of_the_requested_size() {
        let data = payload(1_700_000_000_123_456_789, 100);
        assert_eq!(data.len(), 100);
        let value: serde_json::Value = serde_json::from_str(&data).expect("JSON");
        assert_eq!(value["t"], 1_700_000_000_123_456_789u64);
        // Too small a size still carries the timestamp.
        let small: serde_json::Value = serde_json::from_str(&payload(5, 1)).expect("JSON");
        assert_eq!(small["t"], 5);
    }

    #[test]
    fn reads_ws_frames() {
        let frame = format!(
            "{{\"push\":{{\"channel\":\"fan-3\",\"pub\":{{\"data\":{},\"offset\":42}}}}}}\n{{}}\n{{\"id\":2,\"subscribe\":{{\"offset\":41}}}}",
            payload(123_000, 60)
        );
        let lines: Vec<WsLine<'_>> = frame.split('\n').map(ws_line).collect();
        assert_eq!(
            lines,
            vec![
                WsLine::Publication(Received {
                    channel: "fan-3",
                    offset: 42,
                    sent_ns: Some(123_000)
                }),
                WsLine::Ping,
                WsLine::Other,
            ]
        );
        // A join push is not a publication; a publication without history has offset 0 and
        // a payload without `t` no timestamp.
        assert_eq!(
            ws_line(r#"{"push":{"channel":"c","join":{"info":{"client":"x"}}}}"#),
            WsLine::Other
        );
        assert_eq!(
            ws_line(r#"{"push":{"channel":"c","pub":{"data":{"text":"hi"}}}}"#),
            WsLine::Publication(Received {
                channel: "c",
                offset: 0,
                sent_ns: None
            })
        );
    }

    #[test]
    fn reads_sse_publications() {
        let data = format!(
            "{{\"channel\":\"fan-0\",\"data\":{},\"offset\":7}}",
            payload(99, 50)
        );
        assert_eq!(
            sse_publication(&data),
            Some(Received {
                channel: "fan-0",
                offset: 7,
                sent_ns: Some(99)
            })
        );
        assert_eq!(sse_publication("{\"client\":\"x\"}"), None);
    }

    #[test]
    fn counts_missed_duplicate_and_gaps() {
        let mut t = Tracker::new(10);
        assert!(t.record(11));
        assert!(t.record(12));
        assert!(!t.record(12), "a repeat is a duplicate");
        assert!(t.record(15), "13 and 14 skipped");
        assert!(!t.record(14), "late and out of order");
        assert_eq!((t.received, t.duplicates, t.gaps, t.last), (3, 2, 2, 15));
        // Published up to 17: 13, 14 (holes) and 16, 17 (tail) never came.
        assert_eq!(t.missed(17), 4);
        // Nothing published since the start: nothing missed.
        assert_eq!(Tracker::new(5).missed(5), 0);
        // Offsets unknown (no history): everything counts, nothing can be checked.
        let mut no_history = Tracker::new(0);
        assert!(no_history.record(0) && no_history.record(0));
        assert_eq!(no_history.received, 2);
    }

    #[test]
    fn peer_payloads_carry_time_and_sequence() {
        let data = seq_payload(1_700_000_000_123_456_789, 42, 100);
        assert_eq!(data.len(), 100);
        let value: serde_json::Value = serde_json::from_str(&data).expect("JSON");
        assert_eq!(value["t"], 1_700_000_000_123_456_789u64);
        assert_eq!(value["s"], 42);
        assert_eq!(peer_fields(&data), Some((1_700_000_000_123_456_789, 42)));
        // Inside a JSON string (Pusher's `data`, a Socket.IO event argument).
        let wrapped = format!(
            "{{\"event\":\"m\",\"channel\":\"c\",\"data\":{}}}",
            serde_json::Value::from(data.as_str())
        );
        assert_eq!(peer_fields(&wrapped), Some((1_700_000_000_123_456_789, 42)));
        assert_eq!(peer_fields("{\"event\":\"pusher:ping\"}"), None);
    }

    #[test]
    fn sequences_tolerate_reordering() {
        let mut t = SeqTracker::default();
        assert!(t.record(1));
        assert!(t.record(3));
        assert!(t.record(2), "late, but new");
        assert!(!t.record(3), "a repeat");
        assert!(!t.record(0) && !t.record(MAX_SEQ + 1));
        assert!(t.record(200));
        assert_eq!(
            (t.received, t.duplicates, t.reordered, t.last),
            (4, 1, 1, 200)
        );
        assert_eq!(t.missed(200), 196);
    }

    #[test]
    fn latency_is_in_microseconds_and_never_zero() {
        assert_eq!(latency_us(1_000_000, 3_500_000), 2500);
        assert_eq!(latency_us(5_000, 5_000), 1);
        assert_eq!(latency_us(9_000, 1_000), 1);
    }
}
