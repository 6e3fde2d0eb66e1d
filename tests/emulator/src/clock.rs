//! Calendar formatting of the wall clock for reply tails, greetings and token errors.
//!
//! Trusts only `SystemTime::now()`; a clock before 1970 formats as the epoch rather than failing,
//! because a reply with a wrong date is more useful to a test than no reply.

use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC instant broken into calendar fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub millis: u32,
    /// 0 = Sunday.
    pub weekday: u32,
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];
const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];

impl Civil {
    pub(crate) fn from_system(t: SystemTime) -> Civil {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        Civil::from_unix(d.as_secs() as i64, d.subsec_millis())
    }

    pub(crate) fn now() -> Civil {
        Civil::from_system(SystemTime::now())
    }

    /// Howard Hinnant's days-to-civil algorithm: exact for the whole proleptic Gregorian range,
    /// so no date crate is needed.
    pub(crate) fn from_unix(secs: i64, millis: u32) -> Civil {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Civil {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem / 60 % 60) as u32,
            second: (rem % 60) as u32,
            millis,
            weekday: (days + 4).rem_euclid(7) as u32,
        }
    }

    /// `Sun, 23 Nov 2025 11:12:20 +0000`, as in the Exchange greeting.
    pub(crate) fn rfc2822(&self) -> String {
        format!(
            "{}, {} {} {} {:02}:{:02}:{:02} +0000",
            DAYS[self.weekday as usize % 7],
            self.day,
            MONTHS[(self.month as usize + 11) % 12],
            self.year,
            self.hour,
            self.minute,
            self.second
        )
    }

    /// `2025-11-23T11:12:20.123Z`, as in the reply tails.
    pub(crate) fn iso_millis(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second, self.millis
        )
    }

    /// `2025-11-23 11:12:20Z`, as in Entra ID error bodies.
    pub(crate) fn entra(&self) -> String {
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_the_doc_example() {
        // 2025-11-23T11:12:20Z
        let c = Civil::from_unix(1_763_896_340, 123);
        assert_eq!(c.rfc2822(), "Sun, 23 Nov 2025 11:12:20 +0000");
        assert_eq!(c.iso_millis(), "2025-11-23T11:12:20.123Z");
        assert_eq!(c.entra(), "2025-11-23 11:12:20Z");
    }

    #[test]
    fn epoch_and_leap_day() {
        assert_eq!(
            Civil::from_unix(0, 0).rfc2822(),
            "Thu, 1 Jan 1970 00:00:00 +0000"
        );
        assert_eq!(
            Civil::from_unix(951_782_400, 0).iso_millis(),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
