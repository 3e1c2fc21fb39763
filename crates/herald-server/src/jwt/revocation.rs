//! Token revocation: single tokens by their `jti`, and every token of a user issued before a
//! time (`iat`), each remembered until a given expiry (normally the revoked tokens' own `exp`,
//! after which they are refused anyway). Bounded in memory; with a data folder (the SQLite
//! engine) also kept in a file there, so a restart does not let a revoked token back in.
//!
//! The file (`revocations.jsonl`) is an append-only log, one JSON object per line:
//! `{"jti":…,"until":…}` or `{"user":…,"before":…,"until":…}`. Each revocation is appended and
//! synced before the API answers. At start-up the log is replayed (later lines win), entries
//! whose time has passed are dropped, and the rest is written back compacted; it is compacted
//! again whenever it holds more than twice the live entries. A last line cut short by a crash
//! is skipped (its API call had not been answered); any other unreadable line stops the start,
//! since starting without it would silently let a revoked token in.
//!
//! May touch: its own maps and its file in the data folder.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use herald_core::{ErrorCode, HeraldError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Most revocations of each kind held at once.
pub const MAX_REVOCATIONS: usize = 100_000;

/// The log's name in the data folder.
pub const REVOCATIONS_FILE: &str = "revocations.jsonl";

/// Lines the log may hold beyond the live entries before it is compacted.
const COMPACT_SLACK: usize = 1024;

#[derive(Debug, Default)]
pub struct Revocations {
    /// `jti` → remember until (Unix seconds).
    tokens: Mutex<HashMap<String, u64>>,
    /// user → (tokens issued before this are refused, remember until).
    users: Mutex<HashMap<String, (u64, u64)>>,
    /// The log, once [`Revocations::persist_to`] opened it. Held while a revocation is
    /// applied and appended, so the file's order is the maps' order.
    log: Mutex<Option<Log>>,
}

#[derive(Debug)]
struct Log {
    path: PathBuf,
    file: File,
    /// Lines in the file.
    lines: usize,
    /// A write failed part-way: the file may end in a partial line, so the next revocation
    /// rewrites it whole instead of appending after that line.
    broken: bool,
}

/// One line of the log.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged, deny_unknown_fields)]
enum Entry {
    Token {
        jti: String,
        until: u64,
    },
    User {
        user: String,
        before: u64,
        until: u64,
    },
}

/// Why the revocations file could not be used at start-up.
#[derive(Debug, thiserror::Error)]
pub enum RevocationFileError {
    #[error("cannot read or write the revocations file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the revocations file {path} is damaged at line {line} ({reason}); fix or delete that line \
         (deleting it forgets that revocation) and start again"
    )]
    Damaged {
        path: PathBuf,
        line: usize,
        reason: String,
    },
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
        let mut log = self.log.lock();
        insert_bounded(&mut self.tokens.lock(), jti.to_owned(), until, |u| *u, now)?;
        self.append(
            &mut log,
            &Entry::Token {
                jti: jti.to_owned(),
                until,
            },
            now,
        )
    }

    /// Refuses `user`'s tokens issued before `issued_before`, until `until`.
    pub fn invalidate_user(
        &self,
        user: &str,
        issued_before: u64,
        until: u64,
        now: u64,
    ) -> Result<(), HeraldError> {
        let mut log = self.log.lock();
        insert_bounded(
            &mut self.users.lock(),
            user.to_owned(),
            (issued_before, until),
            |(_, u)| *u,
            now,
        )?;
        self.append(
            &mut log,
            &Entry::User {
                user: user.to_owned(),
                before: issued_before,
                until,
            },
            now,
        )
    }

    /// Loads the revocations kept at `path` (none if it does not exist yet), drops the ones
    /// whose time has passed, rewrites the file with the rest, and from then on appends every
    /// new revocation to it. Returns how many were loaded.
    pub fn persist_to(&self, path: &Path, now: u64) -> Result<usize, RevocationFileError> {
        let io = |source| RevocationFileError::Io {
            path: path.to_owned(),
            source,
        };
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(error) => return Err(io(error)),
        };
        let mut log = self.log.lock();
        {
            let (mut tokens, mut users) = (self.tokens.lock(), self.users.lock());
            let lines: Vec<&str> = text.split_inclusive('\n').collect();
            for (index, line) in lines.iter().enumerate() {
                let torn = index + 1 == lines.len() && !line.ends_with('\n');
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Entry>(line) {
                    Ok(Entry::Token { jti, until }) => {
                        tokens.insert(jti, until);
                    }
                    Ok(Entry::User {
                        user,
                        before,
                        until,
                    }) => {
                        users.insert(user, (before, until));
                    }
                    Err(error) if torn => {
                        tracing::warn!(path = %path.display(), error = %error, "the revocations file ends in a line cut short (a crash while it was written); skipped");
                    }
                    Err(error) => {
                        return Err(RevocationFileError::Damaged {
                            path: path.to_owned(),
                            line: index + 1,
                            reason: error.to_string(),
                        });
                    }
                }
            }
            tokens.retain(|_, until| *until > now);
            users.retain(|_, (_, until)| *until > now);
        }
        let (file, lines) = self.rewrite(path).map_err(io)?;
        *log = Some(Log {
            path: path.to_owned(),
            file,
            lines,
            broken: false,
        });
        Ok(lines)
    }

    /// Writes the live revocations to a new file next to `path` and renames it over `path`;
    /// returns the file (open for appending) and its line count.
    fn rewrite(&self, path: &Path) -> std::io::Result<(File, usize)> {
        let mut text = String::new();
        let mut lines = 0;
        let mut push = |entry: &Entry| {
            // Serialising these plain structs cannot fail.
            if let Ok(line) = serde_json::to_string(entry) {
                text.push_str(&line);
                text.push('\n');
                lines += 1;
            }
        };
        for (jti, until) in self.tokens.lock().iter() {
            push(&Entry::Token {
                jti: jti.clone(),
                until: *until,
            });
        }
        for (user, (before, until)) in self.users.lock().iter() {
            push(&Entry::User {
                user: user.clone(),
                before: *before,
                until: *until,
            });
        }
        let fresh = path.with_extension("jsonl.new");
        {
            let mut file = File::create(&fresh)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
        }
        fs::rename(&fresh, path)?;
        if let Some(dir) = path.parent() {
            // The rename is durable once the folder is synced.
            File::open(dir)?.sync_all()?;
        }
        let file = OpenOptions::new().append(true).open(path)?;
        Ok((file, lines))
    }

    /// Appends `entry` to the log, if there is one, and syncs it; compacts a log that has
    /// grown past twice the live entries. The revocation is in force either way: an error
    /// says it would not survive a restart.
    fn append(&self, log: &mut Option<Log>, entry: &Entry, now: u64) -> Result<(), HeraldError> {
        let Some(open) = log.as_mut() else {
            return Ok(());
        };
        let not_kept = |error: std::io::Error| {
            tracing::error!(path = %open.path.display(), error = %error, "revocation not written to disk");
            HeraldError::new(
                ErrorCode::Internal,
                format!("revoked, but not written to disk (a restart would forget it): {error}"),
            )
        };
        let mut line = serde_json::to_string(entry)
            .map_err(|error| HeraldError::internal(error.to_string()))?;
        line.push('\n');
        if !open.broken {
            let written = open
                .file
                .write_all(line.as_bytes())
                .and_then(|()| open.file.sync_data());
            if let Err(error) = written {
                open.broken = true;
                return Err(not_kept(error));
            }
            open.lines += 1;
        }
        let live = self.tokens.lock().len() + self.users.lock().len();
        if open.broken || open.lines > 2 * live + COMPACT_SLACK {
            self.tokens.lock().retain(|_, until| *until > now);
            self.users.lock().retain(|_, (_, until)| *until > now);
            let (file, lines) = self.rewrite(&open.path).map_err(not_kept)?;
            open.file = file;
            open.lines = lines;
            open.broken = false;
        }
        Ok(())
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

    fn lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .expect("read")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn revocations_survive_a_reload_and_expired_ones_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(REVOCATIONS_FILE);
        let first = Revocations::default();
        assert_eq!(
            first.persist_to(&path, 100).expect("open"),
            0,
            "no file yet"
        );
        first.revoke_token("t1", 500, 100).expect("revoke");
        first.revoke_token("short", 150, 100).expect("revoke");
        first
            .invalidate_user("bob", 120, 500, 100)
            .expect("invalidate");
        first
            .revoke_token("t1", 600, 110)
            .expect("again, later expiry");
        assert_eq!(lines(&path).len(), 4, "one line per call");

        // A restart at 200: "short" has expired, the rest is refused again.
        let second = Revocations::default();
        assert_eq!(second.persist_to(&path, 200).expect("reload"), 2);
        assert!(
            second.check(Some("t1"), "alice", None, 550).is_err(),
            "the later expiry won"
        );
        assert!(second.check(Some("short"), "alice", None, 200).is_ok());
        assert!(second.check(None, "bob", Some(110), 200).is_err());
        assert!(second.check(None, "bob", Some(130), 200).is_ok());
        assert_eq!(lines(&path).len(), 2, "compacted to the live ones");
    }

    #[test]
    fn a_torn_last_line_is_skipped_a_damaged_one_stops_the_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(REVOCATIONS_FILE);
        fs::write(
            &path,
            "{\"jti\":\"t1\",\"until\":500}\n{\"jti\":\"t2\",\"un",
        )
        .expect("write");
        let revocations = Revocations::default();
        assert_eq!(revocations.persist_to(&path, 100).expect("torn tail"), 1);
        assert!(revocations.check(Some("t1"), "a", None, 100).is_err());

        fs::write(
            &path,
            "{\"jti\":\"t1\",\"until\":500}\nnot json\n{\"jti\":\"t3\",\"until\":500}\n",
        )
        .expect("write");
        let error = Revocations::default()
            .persist_to(&path, 100)
            .expect_err("a damaged line in the middle");
        let text = error.to_string();
        assert!(
            text.contains("line 2") && text.contains("revocations.jsonl"),
            "{text}"
        );
        assert!(matches!(
            error,
            RevocationFileError::Damaged { line: 2, .. }
        ));
    }

    #[test]
    fn the_log_is_compacted_as_it_grows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(REVOCATIONS_FILE);
        let revocations = Revocations::default();
        revocations.persist_to(&path, 100).expect("open");
        for n in 0..3 * COMPACT_SLACK {
            revocations
                .revoke_token("same", 1000 + n as u64, 100)
                .expect("revoke");
        }
        let kept = lines(&path);
        assert!(
            kept.len() <= COMPACT_SLACK + 3,
            "{} lines for one live entry",
            kept.len()
        );
        let reloaded = Revocations::default();
        assert_eq!(reloaded.persist_to(&path, 100).expect("reload"), 1);
        let last = 1000 + 3 * COMPACT_SLACK as u64 - 1;
        assert!(reloaded.check(Some("same"), "a", None, last - 1).is_err());
        assert!(
            reloaded.check(Some("same"), "a", None, last).is_ok(),
            "the newest expiry won"
        );
    }

    /// A failed write (here: a full disk) keeps the revocation in force, says it was not
    /// kept, and the next revocation rewrites the file whole, the first one included.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_failed_write_is_repaired_by_the_next_revocation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(REVOCATIONS_FILE);
        let revocations = Revocations::default();
        revocations.persist_to(&path, 100).expect("open");
        revocations.log.lock().as_mut().expect("log").file = OpenOptions::new()
            .append(true)
            .open("/dev/full")
            .expect("/dev/full");
        let error = revocations
            .revoke_token("t1", 500, 100)
            .expect_err("the disk is full");
        assert_eq!(error.code, ErrorCode::Internal);
        assert!(
            revocations.check(Some("t1"), "a", None, 100).is_err(),
            "in force"
        );
        revocations.revoke_token("t2", 500, 100).expect("rewritten");
        let reloaded = Revocations::default();
        assert_eq!(reloaded.persist_to(&path, 100).expect("reload"), 2);
        assert!(reloaded.check(Some("t1"), "a", None, 100).is_err());
        assert!(reloaded.check(Some("t2"), "a", None, 100).is_err());
    }

    #[test]
    fn without_a_file_nothing_is_written() {
        let revocations = Revocations::default();
        revocations
            .revoke_token("t1", 500, 100)
            .expect("in memory only");
        assert!(revocations.check(Some("t1"), "a", None, 100).is_err());
    }
}
