//! A persistent session's progress on a connection: acknowledgements move the channel
//! positions, which are saved at most once a second while they move (see
//! [`super::super::persist`]), and an idle session is saved again every half expiry, so
//! its saved expiry never passes while it is connected.
//!
//! May touch: the session store, through the session's persistence.

use std::time::{Duration, Instant};

use super::super::persist::{self, SessionDocument};
use super::{Awaiting, Persistence, SAVE_INTERVAL, Session};

impl Session {
    /// The client acknowledged delivery `pkid` (PUBACK for QoS 1, PUBREC for QoS 2): it
    /// counts for the session's position. False if no delivery awaited that.
    pub(super) fn acknowledged(&mut self, pkid: u16, awaited: Awaiting) -> bool {
        let Some(flight) = self
            .acks
            .as_mut()
            .and_then(|acks| acks.inflight.get_mut(&pkid))
            .filter(|f| f.stage == awaited)
        else {
            return false;
        };
        if let Some(persistence) = &mut self.persistence {
            persistence
                .positions
                .acknowledged(&flight.channel, flight.offset);
        }
        if awaited == Awaiting::Rec {
            flight.stage = Awaiting::Comp;
        } else {
            self.acks_done(|acks| acks.inflight.remove(&pkid).is_some());
        }
        true
    }

    /// The session as saved now.
    pub(super) fn session_document(&self, persistence: &Persistence) -> SessionDocument {
        let table = self.table.read();
        let mut subscriptions: Vec<(String, u8)> = table
            .exact
            .iter()
            .filter_map(|(channel, qos)| Some((self.state.topics.topic(channel)?.to_owned(), *qos)))
            .collect();
        subscriptions.extend(
            table
                .wildcards
                .iter()
                .map(|(filter, qos)| (filter.as_str().to_owned(), *qos)),
        );
        subscriptions.extend(
            table
                .shared
                .iter()
                .map(|(shared, qos)| (shared.text(), *qos)),
        );
        let expiry_ms = u64::from(persistence.expiry_secs) * 1000;
        SessionDocument {
            expires_at_ms: herald_core::time::now_ms().saturating_add(expiry_ms),
            subscriptions,
            positions: persistence.positions.saved(),
            subscription_ids: table
                .subscription_ids()
                .iter()
                .map(|(filter, id)| (filter.as_str().to_owned(), *id))
                .collect(),
            no_local: table.no_local_filters().cloned().collect(),
        }
    }

    /// Saves a persistent session (its subscriptions and positions).
    pub(super) async fn save_session(&mut self) {
        let Some(mut persistence) = self.persistence.take() else {
            return;
        };
        let document = self.session_document(&persistence);
        persist::save(&*persistence.store, &persistence.key, &document).await;
        persistence.positions.dirty = false;
        persistence.last_save = Instant::now();
        self.persistence = Some(persistence);
    }

    /// When the session is saved next: a second after the last save when positions moved;
    /// otherwise half its expiry after it, so the saved expiry never passes while the
    /// connection is alive — on whichever node — and no node's purge sweep deletes it.
    pub(super) fn next_save(&self) -> Option<Instant> {
        let persistence = self.persistence.as_ref()?;
        if persistence.positions.dirty {
            return Some(persistence.last_save + SAVE_INTERVAL);
        }
        (persistence.expiry_secs > 0).then(|| {
            let half = Duration::from_millis(u64::from(persistence.expiry_secs) * 500);
            persistence.last_save + half.max(SAVE_INTERVAL)
        })
    }
}
