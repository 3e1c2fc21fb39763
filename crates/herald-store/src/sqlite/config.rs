//! Configuration of the embedded SQLite history store.
//!
//! Owns: [`SqliteConfig`] (deserialised straight from the server's config file section, with
//! `deny_unknown_fields` so typos fail loudly), [`SyncPolicy`] and the checks that reject
//! values the store cannot run with.
//!
//! May touch: nothing; pure data.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Name of the database file inside the data directory.
pub const DATABASE_FILE: &str = "herald.db";

/// Name of the lock file that keeps two processes off one data directory.
pub const LOCK_FILE: &str = "herald.lock";

/// When a commit is on disk.
///
/// Both run SQLite in WAL mode, where neither loses a committed publication when the
/// *process* crashes; they differ on power loss or an OS crash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncPolicy {
    /// `synchronous=FULL`: every group commit is fsynced before `append` returns, so a
    /// publication that was acknowledged survives power loss.
    Full,
    /// `synchronous=NORMAL`: the WAL is fsynced only at checkpoints. An acknowledged
    /// publication survives a process crash, but the last commits before a power loss or OS
    /// crash may be rolled back (the database itself stays consistent). The default: the
    /// same trade most brokers make by default, at a fraction of `Full`'s commit latency.
    #[default]
    Normal,
}

impl SyncPolicy {
    /// The value of SQLite's `synchronous` pragma for this policy.
    pub fn pragma_value(self) -> &'static str {
        match self {
            Self::Full => "FULL",
            Self::Normal => "NORMAL",
        }
    }
}

/// Settings of the embedded SQLite history store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqliteConfig {
    /// Directory holding `herald.db` (and its WAL); created if missing.
    pub data_dir: PathBuf,
    /// fsync policy, `"full"` or `"normal"`.
    pub sync: SyncPolicy,
    /// Most commands the writer puts into one transaction (group commit).
    pub max_batch: usize,
    /// Read connections, each used by one read at a time off the async workers.
    pub readers: usize,
    /// How often expired publications and idempotency keys are deleted (`"5s"`, `"1m"`, …).
    #[serde(with = "human_duration")]
    pub prune_interval: Duration,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("herald-data"),
            sync: SyncPolicy::default(),
            max_batch: 1024,
            readers: 2,
            prune_interval: Duration::from_secs(5),
        }
    }
}

impl SqliteConfig {
    /// A default configuration storing into `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            ..Self::default()
        }
    }

    /// `<data_dir>/herald.db`.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join(DATABASE_FILE)
    }

    pub(crate) fn lock_path(&self) -> PathBuf {
        self.data_dir.join(LOCK_FILE)
    }

    /// Rejects values the store cannot run with; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_batch == 0 {
            return Err("sqlite max_batch must be at least 1".to_owned());
        }
        if self.readers == 0 {
            return Err("sqlite readers must be at least 1".to_owned());
        }
        if self.prune_interval.is_zero() {
            return Err("sqlite prune_interval must be greater than zero".to_owned());
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err("sqlite data_dir must not be empty".to_owned());
        }
        Ok(())
    }
}

/// `Duration` as `"5s"`-style text via [`herald_core::duration::HumanDuration`].
mod human_duration {
    use std::time::Duration;

    use herald_core::duration::HumanDuration;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        HumanDuration(*value).serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        HumanDuration::deserialize(deserializer).map(HumanDuration::as_duration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserialises_with_defaults_and_human_durations() {
        let config: SqliteConfig = serde_json::from_str(
            r#"{"data_dir": "/var/lib/herald", "sync": "full", "prune_interval": "250ms"}"#,
        )
        .expect("valid config");
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/herald"));
        assert_eq!(config.sync, SyncPolicy::Full);
        assert_eq!(config.prune_interval, Duration::from_millis(250));
        assert_eq!(config.max_batch, 1024);
        assert_eq!(config.readers, 2);
        assert_eq!(
            config.database_path(),
            PathBuf::from("/var/lib/herald/herald.db")
        );

        let defaults: SqliteConfig = serde_json::from_str("{}").expect("empty config");
        assert_eq!(defaults, SqliteConfig::default());
        assert_eq!(defaults.sync, SyncPolicy::Normal);
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        assert!(serde_json::from_str::<SqliteConfig>(r#"{"dir": "x"}"#).is_err());
        assert!(serde_json::from_str::<SqliteConfig>(r#"{"sync": "off"}"#).is_err());
        assert!(serde_json::from_str::<SqliteConfig>(r#"{"prune_interval": "5 weeks"}"#).is_err());
        let bad = |edit: fn(&mut SqliteConfig)| {
            let mut config = SqliteConfig::default();
            edit(&mut config);
            config.validate()
        };
        assert!(bad(|c| c.max_batch = 0).is_err());
        assert!(bad(|c| c.readers = 0).is_err());
        assert!(bad(|c| c.prune_interval = Duration::ZERO).is_err());
        assert!(bad(|_| ()).is_ok());
    }

    #[test]
    fn serialises_round_trip() {
        let config = SqliteConfig {
            sync: SyncPolicy::Normal,
            ..SqliteConfig::new("d")
        };
        let text = serde_json::to_string(&config).expect("serialise");
        assert!(text.contains(r#""prune_interval":"5s""#), "{text}");
        assert_eq!(
            serde_json::from_str::<SqliteConfig>(&text).expect("parse"),
            config
        );
    }
}
