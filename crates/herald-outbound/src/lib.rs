//! Everything Herald sends out and must retry.
//!
//! Owns: the push senders (one module per provider, each a [`sender::Sender`]), the push
//! pipeline that turns a `send_push_notification` into per-device jobs on the durable
//! [`herald_core::outbound::OutboundQueue`], and the workers that claim jobs, send them and
//! record the outcome (retrying with backoff, removing dead tokens).
//!
//! May touch: the network (providers' HTTP APIs, SMTP) and the ports it is given (the queue,
//! the device registry). Never the node's stores directly.

pub mod apns;
pub mod batch;
pub mod clock;
pub mod egress;
pub mod email;
pub mod fcm;
pub mod push;
mod push_http;
pub mod sender;
pub mod sink;
pub mod webhook;
pub mod webpush;
pub mod worker;
