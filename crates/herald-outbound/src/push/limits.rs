//! `limit_strategy`: when a device may get a push (its local-time window) and how many it may
//! get (rate policies counted on the queue's shared counters).
//!
//! Owns: time-of-day parsing, the next allowed instant in a device's time zone, and rate keys.
//!
//! May touch: the time zone database bundled with `jiff` (no I/O at run time).

use jiff::Timestamp;
use jiff::civil::Time;
use jiff::tz::TimeZone;

use super::request::{RateLimit, TimeLimit};
use herald_core::device::Device;

/// Parses `HH:MM:SS` (or `HH:MM`).
pub fn parse_time(text: &str) -> Result<Time, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let number = |s: &str, max: i8| -> Option<i8> {
        (s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<i8>().ok())
            .flatten()
            .filter(|n| (0..=max).contains(n))
    };
    let (h, m, s) = match parts.as_slice() {
        [h, m] => (number(h, 23), number(m, 59), Some(0)),
        [h, m, s] => (number(h, 23), number(m, 59), number(s, 59)),
        _ => (None, None, None),
    };
    match (h, m, s) {
        (Some(h), Some(m), Some(s)) => Time::new(h, m, s, 0).map_err(|e| e.to_string()),
        _ => Err(format!("time {text:?} is not HH:MM:SS")),
    }
}

/// The earliest instant at or after `now_ms` inside the device's window, in ms. A device
/// without a (known) time zone gets `now_ms` with `no_tz_send_now`, else its window in UTC.
pub fn window_start(limit: &TimeLimit, timezone: &str, now_ms: u64) -> Result<u64, String> {
    let after = parse_time(&limit.send_after_time)?;
    let before = parse_time(&limit.send_before_time)?;
    let tz = match (timezone.is_empty(), TimeZone::get(timezone)) {
        (false, Ok(tz)) => tz,
        _ if limit.no_tz_send_now => return Ok(now_ms),
        _ => TimeZone::UTC,
    };
    let now = Timestamp::from_millisecond(now_ms as i64).map_err(|e| e.to_string())?;
    let local = now.to_zoned_datetime(tz.clone());
    let time = local.time();
    let inside = if after <= before {
        time >= after && time < before
    } else {
        // The window wraps midnight (22:00–06:00).
        time >= after || time < before
    };
    if inside || after == before {
        return Ok(now_ms);
    }
    // Next `after` today, or tomorrow if it has passed.
    let today = local.date().to_datetime(after);
    let mut start = today
        .to_zoned_datetime(tz.clone())
        .map_err(|e| e.to_string())?;
    if start.timestamp() <= now {
        let tomorrow = local
            .date()
            .tomorrow()
            .map_err(|e| e.to_string())?
            .to_datetime(after);
        start = tomorrow.to_zoned_datetime(tz).map_err(|e| e.to_string())?;
    }
    Ok(start.timestamp().as_millisecond().max(0) as u64)
}

/// The counter key for `device` under `limit` (`{user}`, `{device}` replaced).
pub fn rate_key(limit: &RateLimit, device_id: &str, device: Option<&Device>) -> String {
    let template = limit.key.as_deref().unwrap_or("{device}");
    let user = device.map(|d| d.user.as_str()).unwrap_or("");
    format!(
        "push:{}",
        template
            .replace("{user}", user)
            .replace("{device}", device_id)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(after: &str, before: &str, no_tz_send_now: bool) -> TimeLimit {
        TimeLimit {
            send_after_time: after.into(),
            send_before_time: before.into(),
            no_tz_send_now,
        }
    }

    fn ms(rfc3339: &str) -> u64 {
        rfc3339
            .parse::<Timestamp>()
            .expect("timestamp")
            .as_millisecond() as u64
    }

    #[test]
    fn times_parse_strictly() {
        assert!(parse_time("09:00:00").is_ok());
        assert!(parse_time("23:59").is_ok());
        for bad in [
            "9:00:00",
            "24:00:00",
            "12:60:00",
            "noon",
            "12:00:00:00",
            "",
            "+1:+2:+3",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn inside_the_window_sends_now() {
        // 10:00 in Berlin (UTC+1 in winter) is 09:00 UTC.
        let now = ms("2026-12-07T09:00:00Z");
        let at = window_start(&limit("09:00:00", "18:00:00", false), "Europe/Berlin", now);
        assert_eq!(at, Ok(now));
    }

    #[test]
    fn before_the_window_waits_for_its_start_in_local_time() {
        // 06:00 in Berlin → 09:00 Berlin = 08:00 UTC the same day.
        let now = ms("2026-12-07T05:00:00Z");
        let at = window_start(&limit("09:00:00", "18:00:00", false), "Europe/Berlin", now);
        assert_eq!(at, Ok(ms("2026-12-07T08:00:00Z")));
    }

    #[test]
    fn after_the_window_waits_for_tomorrow() {
        // 20:00 in New York (UTC-5) → 09:00 the next day = 14:00 UTC.
        let now = ms("2026-12-08T01:00:00Z");
        let at = window_start(
            &limit("09:00:00", "18:00:00", false),
            "America/New_York",
            now,
        );
        assert_eq!(at, Ok(ms("2026-12-08T14:00:00Z")));
    }

    #[test]
    fn a_window_may_wrap_midnight() {
        let night = limit("22:00:00", "06:00:00", false);
        assert_eq!(
            window_start(&night, "UTC", ms("2026-12-07T23:30:00Z")),
            Ok(ms("2026-12-07T23:30:00Z"))
        );
        assert_eq!(
            window_start(&night, "UTC", ms("2026-12-07T12:00:00Z")),
            Ok(ms("2026-12-07T22:00:00Z"))
        );
    }

    #[test]
    fn devices_without_a_time_zone() {
        let now = ms("2026-12-07T05:00:00Z");
        assert_eq!(
            window_start(&limit("09:00:00", "18:00:00", true), "", now),
            Ok(now)
        );
        assert_eq!(
            window_start(&limit("09:00:00", "18:00:00", false), "Not/AZone", now),
            Ok(ms("2026-12-07T09:00:00Z"))
        );
    }
}
