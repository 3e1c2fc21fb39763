//! Conversions between [`Publication`]s and rows of the `publications` table.
//!
//! Owns: how payload kind, tags and client info are laid out in columns, and the integer
//! conversions between Herald's `u64` and SQLite's `i64`.
//!
//! May touch: nothing; pure functions over values and rows.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use herald_core::publication::{ClientInfo, Payload, Publication};
use rusqlite::Row;
use rusqlite::types::Type;

/// The columns of a publication that need encoding, computed before a row is written so an
/// encoding failure rejects only its own request and consumes no offset.
#[derive(Debug)]
pub struct EncodedExtras {
    pub tags: Option<String>,
    pub info: Option<String>,
}

/// Encodes tags and client info as JSON text, `None` when absent.
pub fn encode_extras(publication: &Publication) -> Result<EncodedExtras, serde_json::Error> {
    let tags = if publication.tags.is_empty() {
        None
    } else {
        Some(serde_json::to_string(&publication.tags)?)
    };
    let info = publication
        .info
        .as_deref()
        .map(serde_json::to_string)
        .transpose()?;
    Ok(EncodedExtras { tags, info })
}

/// Reads a publication from a row of `seq, time_ms, is_binary, data, tags, info`.
pub fn decode_publication(row: &Row<'_>) -> rusqlite::Result<Publication> {
    let offset = to_u64(row.get(0)?);
    let time_ms = to_u64(row.get(1)?);
    let binary: i64 = row.get(2)?;
    let data = Bytes::from(row.get::<_, Vec<u8>>(3)?);
    let data = if binary != 0 {
        Payload::Binary(data)
    } else {
        Payload::Json(data)
    };
    let tags = match row.get::<_, Option<String>>(4)? {
        Some(text) => {
            serde_json::from_str::<BTreeMap<String, String>>(&text).map_err(|e| bad_json(4, e))?
        }
        None => BTreeMap::new(),
    };
    let info = match row.get::<_, Option<String>>(5)? {
        Some(text) => Some(Arc::new(
            serde_json::from_str::<ClientInfo>(&text).map_err(|e| bad_json(5, e))?,
        )),
        None => None,
    };
    Ok(Publication {
        offset,
        time_ms,
        data,
        tags,
        info,
    })
}

fn bad_json(column: usize, error: serde_json::Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, Type::Text, Box::new(error))
}

/// SQLite integers are signed; Herald's offsets and times never reach `i64::MAX`, and a value
/// that would (a far-future expiry) is clamped, which means "never" either way.
pub fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The inverse of [`to_i64`]; a negative value can only come from a hand-edited database and
/// reads as 0.
pub fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// A duration in whole milliseconds, saturating.
pub fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_conversions_clamp() {
        assert_eq!(to_i64(u64::MAX), i64::MAX);
        assert_eq!(to_i64(7), 7);
        assert_eq!(to_u64(-1), 0);
        assert_eq!(to_u64(7), 7);
    }

    #[test]
    fn extras_are_null_when_absent() {
        let publication = Publication {
            offset: 0,
            time_ms: 0,
            data: Payload::Json(Bytes::from_static(b"{}")),
            tags: BTreeMap::new(),
            info: None,
        };
        let extras = encode_extras(&publication).expect("encode");
        assert!(extras.tags.is_none() && extras.info.is_none());
    }
}
