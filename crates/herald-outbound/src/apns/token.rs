//! APNs provider tokens: ES256 JWTs (header `kid`, claims `iss` = team id and `iat`) signed
//! with the app's `.p8` key, cached and shared by every request of that app.
//!
//! Apple refuses a token older than an hour (`ExpiredProviderToken`) and one replaced more
//! often than every 20 minutes (`TooManyProviderTokenUpdates`), so a token is re-signed once
//! it is [`REFRESH_AFTER`] old: never sooner than 20 minutes, always before 60. When Apple
//! still says it expired (clock skew), [`ProviderToken::rejected`] re-signs at once, but only
//! if the rejected token is still the current one, so a burst of concurrent rejections costs
//! one signature.
//!
//! Owns: the key and the cached token. May touch: the [`Clock`] it is given.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::RwLock;
use serde::Serialize;

use crate::clock::{Clock, unix_secs};

/// Age at which a token is replaced.
pub const REFRESH_AFTER: Duration = Duration::from_secs(50 * 60);
/// How far ahead of the clock a cached token's `iat` may be and still be used.
const FUTURE_TOLERANCE_SECS: u64 = 60;

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
}

#[derive(Clone)]
struct Signed {
    jwt: Arc<str>,
    iat: u64,
}

/// One app's signing key and its current token.
pub(crate) struct ProviderToken {
    key: EncodingKey,
    key_id: String,
    team_id: String,
    current: RwLock<Option<Signed>>,
    signatures: AtomicU64,
}

impl ProviderToken {
    /// Loads the PKCS#8 PEM key and signs a first token, so a bad key fails at start-up.
    pub(crate) fn new(
        pem: &str,
        key_id: &str,
        team_id: &str,
        clock: &dyn Clock,
    ) -> Result<Self, String> {
        let key = EncodingKey::from_ec_pem(pem.as_bytes())
            .map_err(|e| format!("not a PKCS#8 P-256 private key (.p8): {e}"))?;
        let token = Self {
            key,
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
            current: RwLock::new(None),
            signatures: AtomicU64::new(0),
        };
        let first = token.sign(unix_secs(clock.now()))?;
        *token.current.write() = Some(first);
        Ok(token)
    }

    fn sign(&self, iat: u64) -> Result<Signed, String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let claims = Claims {
            iss: &self.team_id,
            iat,
        };
        let jwt = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| format!("signing the APNs provider token failed: {e}"))?;
        self.signatures.fetch_add(1, Ordering::Relaxed);
        Ok(Signed {
            jwt: jwt.into(),
            iat,
        })
    }

    /// The token to send now, re-signed first if it is [`REFRESH_AFTER`] old (or dated well
    /// in the future: the clock went back; a second or so ahead is [`Self::rejected`]'s doing).
    pub(crate) fn current(&self, clock: &dyn Clock) -> Result<Arc<str>, String> {
        let now = unix_secs(clock.now());
        let fresh = |s: &Signed| {
            s.iat <= now + FUTURE_TOLERANCE_SECS
                && now.saturating_sub(s.iat) < REFRESH_AFTER.as_secs()
        };
        if let Some(signed) = self.current.read().as_ref().filter(|s| fresh(s)) {
            return Ok(signed.jwt.clone());
        }
        let mut current = self.current.write();
        if let Some(signed) = current.as_ref().filter(|s| fresh(s)) {
            return Ok(signed.jwt.clone());
        }
        let signed = self.sign(now)?;
        let jwt = signed.jwt.clone();
        *current = Some(signed);
        Ok(jwt)
    }

    /// Apple said `rejected` expired: replace it now unless someone already did. The new
    /// token's `iat` is at least one second later than the rejected one's, so it differs even
    /// within the same second (ES256 signing here is deterministic).
    pub(crate) fn rejected(&self, rejected: &str, clock: &dyn Clock) -> Result<(), String> {
        let mut current = self.current.write();
        let old_iat = match current.as_ref() {
            Some(signed) if &*signed.jwt == rejected => signed.iat,
            _ => return Ok(()),
        };
        let now = unix_secs(clock.now());
        *current = Some(self.sign(now.max(old_iat + 1))?);
        Ok(())
    }

    /// How many tokens were signed (start-up included).
    pub(crate) fn signatures(&self) -> u64 {
        self.signatures.load(Ordering::Relaxed)
    }
}
