//! Deliveries towards the client: frames taken from the connection's queue become PUBLISH
//! packets in the write buffer, with their QoS, packet id, topic alias and retain flag, as
//! the inflight window and the buffer allow; and the packet ids in use.
//!
//! May touch: the session's buffers and its persistent progress.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::BytesMut;

use super::super::codec::{self, Level};
use super::{Acks, Awaiting, InFlight, MAX_WRITE_BUFFER, Session};

impl Session {
    /// A persistent session's position moves past a delivery that was written (`done`: at
    /// QoS 0, or not written because it expired). Positions are kept for exact topics only:
    /// they are what a session recovers, and a `#` subscriber would otherwise save a
    /// position for every channel.
    pub(super) fn note_sent(&mut self, position: &crate::outbound::FramePosition, done: bool) {
        if let Some(persistence) = &mut self.persistence
            && self.exact.contains_key(&position.channel)
        {
            persistence
                .positions
                .sent(&position.channel, &position.epoch, position.offset, done);
        }
    }

    /// Moves taken frames into the write buffer as PUBLISH packets, while the inflight
    /// window and the buffer have room.
    pub(super) fn fill_writes(&mut self) {
        while self.out_buf.len() < MAX_WRITE_BUFFER {
            let Some(frame) = self.pending.pop_front() else {
                // The queue handed its frames over whole; nothing is kept while idle.
                self.pending = VecDeque::new();
                return;
            };
            let Some(position) = &frame.position else {
                continue;
            };
            let Some(topic) = self.state.topics.topic(&position.channel) else {
                continue;
            };
            let granted = self.table.read().granted(&position.channel, topic);
            let Some(granted) = granted else {
                // Unsubscribed since it was queued.
                continue;
            };
            let now_ms = herald_core::time::now_ms();
            if frame.expires_at_ms != 0 && frame.expires_at_ms <= now_ms {
                // Expired while it waited in the queue (MQTT-3.3.2-5): not written, and
                // nothing to redeliver.
                self.note_sent(position, true);
                continue;
            }
            let qos = granted.min(codec::template_qos(&frame.bytes));
            let retained_reply = self.is_retained_reply(position);
            let (mut extra, keep_retain) = match self.level {
                Level::V5 => {
                    let table = self.table.read();
                    let keep_retain = retained_reply || table.retains_as_published(topic);
                    (table.subscription_id_properties(topic), keep_retain)
                }
                Level::V311 => (BytesMut::new(), retained_reply),
            };
            // + a topic alias (3 bytes) and a longer property length (1).
            let client_max = usize::try_from(self.client_max_packet).unwrap_or(usize::MAX);
            if codec::finished_size(&frame.bytes, qos) + extra.len() + 4 > client_max {
                // MQTT 5: a packet larger than the client accepts is not sent (MQTT-3.1.2-25).
                tracing::debug!(channel = %position.channel, "mqtt: publication larger than the client's maximum packet size; skipped");
                continue;
            }
            let pkid = if qos == 0 {
                0
            } else {
                if self.acks.as_ref().map_or(0, |acks| acks.inflight.len())
                    >= usize::from(self.receive_maximum)
                {
                    // Waits for an acknowledgement; nothing more is taken from the queue.
                    self.pending.push_front(frame);
                    return;
                }
                let pkid = self.next_free_pkid();
                let stage = if qos == 1 {
                    Awaiting::Ack
                } else {
                    Awaiting::Rec
                };
                self.acks.get_or_insert_with(Box::default).inflight.insert(
                    pkid,
                    InFlight {
                        stage,
                        channel: position.channel.clone(),
                        offset: position.offset,
                    },
                );
                pkid
            };
            self.note_sent(position, qos == 0);
            let omit_topic = self.topic_alias_for(&position.channel, &mut extra);
            let finish = codec::Finish {
                qos,
                pkid,
                dup: false,
                keep_retain,
                omit_topic,
            };
            let start = self.out_buf.len();
            codec::finish_publish(&mut self.out_buf, &frame.bytes, &finish, &extra);
            if self.level == Level::V5 && frame.expires_at_ms != 0 {
                // What is left of the interval now, not when the template was made.
                let left = super::super::delivery::seconds_left(frame.expires_at_ms, now_ms);
                codec::set_message_expiry(&mut self.out_buf[start..], left);
            }
            if retained_reply {
                self.forget_retained_reply(position);
            }
        }
    }

    /// MQTT 5 topic aliases towards the client (as many as its Topic Alias Maximum, given to
    /// the first topics delivered): adds the alias of `channel` to `extra`; true when the
    /// client already knows it, so the topic is left out.
    pub(super) fn topic_alias_for(&mut self, channel: &Arc<str>, extra: &mut BytesMut) -> bool {
        let Some(aliases) = &mut self.out_aliases else {
            return false;
        };
        if let Some(alias) = aliases.by_channel.get(channel) {
            codec::topic_alias(extra, *alias);
            return true;
        }
        let next = aliases.by_channel.len() + 1;
        if let Ok(alias) = u16::try_from(next)
            && alias <= aliases.maximum
        {
            aliases.by_channel.insert(channel.clone(), alias);
            codec::topic_alias(extra, alias);
        }
        false
    }

    /// Whether the frame at `position` is a retained publication sent for a SUBSCRIBE
    /// (written with RETAIN), rather than a live one.
    pub(super) fn is_retained_reply(&self, position: &crate::outbound::FramePosition) -> bool {
        self.retained_replies
            .as_ref()
            .is_some_and(|replies| replies.contains(&(position.channel.clone(), position.offset)))
    }

    pub(super) fn forget_retained_reply(&mut self, position: &crate::outbound::FramePosition) {
        if let Some(replies) = &mut self.retained_replies {
            replies.remove(&(position.channel.clone(), position.offset));
            if replies.is_empty() {
                self.retained_replies = None;
            }
        }
    }

    /// Runs `change` on the packet ids in use (none: false) and drops them once none is
    /// left; returns what `change` did.
    pub(super) fn acks_done(&mut self, change: impl FnOnce(&mut Acks) -> bool) -> bool {
        let Some(acks) = &mut self.acks else {
            return false;
        };
        let changed = change(acks);
        if acks.inflight.is_empty() && acks.awaiting_rel.is_empty() {
            self.acks = None;
        }
        changed
    }

    pub(super) fn next_free_pkid(&mut self) -> u16 {
        // The window is at most 65,535 wide (a u16 receive maximum): a free id exists.
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            let in_use = self
                .acks
                .as_ref()
                .is_some_and(|acks| acks.inflight.contains_key(&self.next_pkid));
            if self.next_pkid != 0 && !in_use {
                return self.next_pkid;
            }
        }
    }
}
