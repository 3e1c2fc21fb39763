//! Token revocation: single tokens by their `jti`, and every token of a user issued before a
//! time (`iat`), each remembered until a given expiry (normally the revoked tokens' own `exp`,
//! after which they are refused anyway). Kept in memory and bounded; a restart forgets it.
//!
//! May touch: nothing but its own maps.

use std::collections::HashMap;

use herald_core::{ErrorCode, HeraldError};
use parking_lot::Mutex;

/// Most revocations of each kind held at once.
pub const MAX_REVOCATIONS: usize = 100_000;

#[derive(Debug, Default)]
pub struct Revocations {
    /// `jti` → remember until (Unix seconds).
    tokens: Mutex<HashMap<String, u64>>,
    /// user → (tokens issued before this are refused, remember until).
    users: Mutex<HashMap<String, (u64, u64)>>,
}

/// Inserts `key`, first dropping entries whose time has passed; refuses when still full.
fn insert_bounded<V>(
    map: &mut HashMap<String, V>,
    key: String,
    value: V,
    until: impl Fn(&V) -> u64,
    now: u64,
) -> Result<(), HeraldError> {
    if !map.contains_key(&key) && map.len() >= MAX_REVOCATIONS {
        map.retain(|_, v| until(v) > now);
        if map.len() >= MAX_REVOCATIONS {
            return Err(HeraldError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "{MAX_REVOCATIONS} revocations are held already; give them an earlier expire_at"
                ),
            ));
        }
    }
    map.insert(key, value);
    Ok(())
}

impl Revocations {
    /// Refuses the token with this `jti` until `until`.
    pub fn revoke_token(&self, jti: &str, until: u64, now: u64) -> Result<(), HeraldError> {
        insert_bounded(&mut self.tokens.lock(), jti.to_owned(), until, |u| *u, now)
    }

    /// Refuses `user`'s tokens issued before `issued_before`, until `until`.
    pub fn invalidate_user(
        &self,
        user: &str,
        issued_before: u64,
        until: u64,
        now: u64,
    ) -> Result<(), HeraldError> {
        insert_bounded(
            &mut self.users.lock(),
            user.to_owned(),
            (issued_before, until),
            |(_, u)| *u,
            now,
        )
    }

    /// Why a token is refused, if it is.
    pub fn check(
        &self,
        jti: Option<&str>,
        user: &str,
        issued_at: Option<u64>,
        now: u64,
    ) -> Result<(), HeraldError> {
        if let Some(jti) = jti
            && self
                .tokens
                .lock()
                .get(jti)
                .is_some_and(|until| *until > now)
        {
            return Err(HeraldError::new(
                ErrorCode::Unauthorized,
                "the token is revoked",
            ));
        }
        if let Some(&(before, until)) = self.users.lock().get(user)
            && until > now
            && issued_at.is_none_or(|iat| iat < before)
        {
            return Err(HeraldError::new(
                ErrorCode::Unauthorized,
                "the user's tokens issued before this time are invalidated",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_tokens_and_invalidated_users_are_refused_until_their_time() {
        let revocations = Revocations::default();
        revocations.revoke_token("t1", 200, 100).expect("revoke");
        assert!(
            revocations
                .check(Some("t1"), "alice", Some(90), 150)
                .is_err()
        );
        assert!(
            revocations
                .check(Some("t2"), "alice", Some(90), 150)
                .is_ok()
        );
        assert!(
            revocations
                .check(Some("t1"), "alice", Some(90), 250)
                .is_ok(),
            "forgotten"
        );
        revocations
            .invalidate_user("bob", 120, 300, 100)
            .expect("invalidate");
        assert!(
            revocations.check(None, "bob", Some(110), 150).is_err(),
            "issued before"
        );
        assert!(
            revocations.check(None, "bob", None, 150).is_err(),
            "no iat: refused"
        );
        assert!(
            revocations.check(None, "bob", Some(130), 150).is_ok(),
            "issued after"
        );
        assert!(revocations.check(None, "carol", Some(1), 150).is_ok());
    }
}
