//! Built-in client methods: RPC calls a connected client makes that Herald answers itself
//! (registering its own push device, acknowledging a delivery), before any backend RPC.
//!
//! Owns the [`ClientMethods`] port. Transports call it with the authenticated caller; the
//! server implements it. Method names start with `herald.` so they never shadow the
//! application's own RPC methods.
//!
//! May touch: nothing.

use async_trait::async_trait;

use crate::error::HeraldError;
use crate::publication::Payload;

/// Who is calling: the connection's authenticated user (empty: anonymous) and client id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub user: String,
    pub client: String,
}

/// The prefix of every built-in method.
pub const PREFIX: &str = "herald.";

#[async_trait]
pub trait ClientMethods: Send + Sync + 'static {
    /// Whether `method` is built in (and so answered by [`ClientMethods::call`]).
    fn handles(&self, method: &str) -> bool;

    /// Runs `method` for `caller` with its JSON `data`; the result is JSON.
    async fn call(
        &self,
        caller: &Caller,
        method: &str,
        data: Option<&Payload>,
    ) -> Result<Payload, HeraldError>;
}
