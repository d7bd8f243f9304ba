//! A migration's version, ordered as the tools that write them order them.
//!
//! A version is the digit prefix of a file name, optionally split by `-` as diesel writes it
//! (`0003`, `20261124093000`, `2026-11-24-093000`, `2025-11-19-091444-0000`). Two kinds:
//!
//! * **Timestamps**: 14 digits or more whose first 14 read as a date and time
//!   (`YYYYMMDDHHMMSS`). They order chronologically whatever their width: by their first 14
//!   digits, then by the rest as text. So diesel's 18-digit `2025-11-19-091444-0000` runs
//!   before the 14-digit `2026-01-20-162913`, as diesel (which compares versions as digit
//!   strings) runs them; read as plain integers, every 14-digit version would come first.
//! * **Plain integers** (`1`, `2`, `10`, `0001`…`0010`): numerically; leading zeros do not
//!   count (`0001` is version `1`).
//! * **Versions wider than a 64-bit integer**: ory's pop writes 20 digits, whose first 14 are
//!   not always a date (`20150100000001000000`). They order as timestamps do, by their first
//!   14 digits, then by the rest.
//! * **Runs of zeros wider than a timestamp**: `diesel setup` writes
//!   `00000000000000_diesel_initial_setup`, version 0 like `0`. A run of more than 14 zeros is
//!   a version of its own, after it and before `1`, the wider the later, as diesel (comparing
//!   texts) orders them: Lemmy ships `000000000000000_forbid_diesel_cli` to run right after
//!   its initial setup. Its digits after the 14th break the tie, as a timestamp's do.
//!
//! * **Dotted versions**, as Flyway writes them (`1.1`, `2.0.3`, `2024.01.15.1200`; Flyway's
//!   `V1_1__x.sql` is `1.1`): part by part, numerically, a missing part counting as 0, so
//!   `1` < `1.0.5` < `1.1` < `1.10` < `2`, and `1.0` is `1` (Flyway's `MigrationVersion`).
//!   A plain integer is a dotted version of one part.
//!
//! This is one order for every folder; the tools do not all share it. Where a folder's tool
//! would run two of its migrations the other way round (dbmate sorts by file name, so
//! `10_b.sql` before `9_a.sql`; diesel compares digits as text; golang-migrate, sqlx, goose,
//! refinery and Flyway compare integers, so a 16-digit timestamp after a 14-digit one),
//! reading the folder refuses it, naming the two files.
//!
//! The version keeps its text as the file writes it: that is what it prints, what JSON carries
//! and what the history table records.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

/// Digits a timestamp's date and time take: `YYYYMMDDHHMMSS`.
const TIME_DIGITS: usize = 14;

/// A migration's version: ordered chronologically for timestamps (whatever their width),
/// numerically for plain integers, and shown as written. See the [module documentation](self).
///
/// ```
/// use svcdb::migrate::Version;
/// let diesel_18: Version = "2025-11-19-091444-0000".parse().unwrap();
/// let diesel_14: Version = "2026-01-20-162913".parse().unwrap();
/// assert!(diesel_18 < diesel_14);
/// assert_eq!(diesel_14.to_string(), "2026-01-20-162913");
/// assert_eq!("0010".parse::<Version>().unwrap(), Version::from(10u32));
/// ```
#[derive(Clone)]
pub struct Version {
    /// As written (`2026-01-20-162913`, `0003`).
    text: Box<str>,
    /// The first ordering key: a timestamp's first 14 digits, or a plain integer's value. The
    /// second is a timestamp's digits after the 14th, compared as text ([`Version::rest`]).
    major: i64,
    /// Whether the first 14 digits read as a date and time.
    timestamp: bool,
    /// More digits than a 64-bit integer holds (ory's pop writes 20, whose first 14 are not
    /// always a date: `20150100000001000000`): ordered as a timestamp is, by its first 14
    /// digits and then the rest, and keyed in the history by a hash, as a dotted version is.
    wide: bool,
    /// A dotted version's parts after the first, without trailing zeros (`1.2.0` → `[2]`);
    /// empty for every other version. The second ordering key.
    minor: Box<[u64]>,
}

/// Why a text is not a [`Version`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseVersionError {
    /// Something other than digits separated by `-` or by `.`, or no digit at all.
    #[error("{text:?} is not a version: a version is digits, optionally separated by `-` (`0003`, `20261124093000`, `2026-11-24-093000`) or by `.` (`1.1`)")]
    NotANumber {
        /// The text given.
        text: String,
    },
    /// A part of a dotted version with more digits than a 64-bit integer holds.
    #[error("version {text} is too large: each part of a dotted version is read as a 64-bit integer, at most 9223372036854775807\n  hint: give the migration a version with smaller parts")]
    TooLarge {
        /// The text given.
        text: String,
    },
}

impl ParseVersionError {
    /// True for text that is not digits and `-`.
    pub fn is_not_a_number(&self) -> bool {
        matches!(self, ParseVersionError::NotANumber { .. })
    }

    /// True for a version with too many digits.
    pub fn is_too_large(&self) -> bool {
        matches!(self, ParseVersionError::TooLarge { .. })
    }
}

impl Version {
    /// The version as written in the file name (`2026-01-20-162913`, `0003`).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Every digit read as one integer (`2026-01-20-162913` → 20260120162913, `0003` → 3): how
    /// svcdb before text versions recorded it, and how sqlx, golang-migrate, goose and refinery
    /// record theirs. Not an ordering: use the version itself. A version too wide for a
    /// 64-bit integer (ory's pop writes 20 digits) is `i64::MAX`.
    pub fn number(&self) -> i64 {
        // Parsing checked that the digits fit, unless the version is wide.
        self.digits().fold(0i64, |n, d| {
            n.saturating_mul(10).saturating_add(i64::from(d - b'0'))
        })
    }

    /// Its digits, as ASCII bytes, without the `-` and `.` between them.
    pub(crate) fn digits(&self) -> impl Iterator<Item = u8> + '_ {
        self.text.bytes().filter(u8::is_ascii_digit)
    }

    /// The history table's integer key: [`Version::number`], with two exceptions, where the
    /// digits alone would make two versions one:
    ///
    /// * a run of more than 14 zeros is minus its zeros past the 14th (`000000000000000` is -1);
    ///   as a number it would be 0, the key of diesel's `00000000000000`;
    /// * a dotted version with a part after the first that is not 0 (`1.1`, whose digits are
    ///   those of `11`) is a negative number below -2^62 taken from the SHA-256 of its parts,
    ///   so that equal versions (`1.1`, `1_1`, `01.1.0`) share it. Reading a folder refuses two
    ///   versions that would share a key ([`Version::key`] collisions are checked there).
    ///
    /// * a version too wide for a 64-bit integer (`20150100000001000000`) is a negative number
    ///   between -3·2^60 and -2^61, from the SHA-256 of its first 14 digits and the rest.
    ///
    /// A dotted version without such a part (`2.0`) is its first part, as the version `2` it
    /// equals. No other version is negative.
    pub(crate) fn key(&self) -> i64 {
        use sha2::Digest;
        let hashed = |parts: &mut dyn Iterator<Item = [u8; 8]>| -> u64 {
            let mut hash = sha2::Sha256::new();
            parts.for_each(|p| hash.update(p));
            let bytes: [u8; 8] = hash.finalize()[..8].try_into().unwrap_or_default();
            u64::from_be_bytes(bytes)
        };
        if !self.minor.is_empty() {
            let mut parts = std::iter::once(self.major.to_be_bytes())
                .chain(self.minor.iter().map(|p| p.to_be_bytes()));
            const DOTTED_BASE: i64 = -(1 << 62);
            DOTTED_BASE - (hashed(&mut parts) >> 3) as i64
        } else if self.wide {
            let mut parts = std::iter::once(self.major.to_be_bytes())
                .chain(self.rest().map(|d| u64::from(d).to_be_bytes()));
            const WIDE_BASE: i64 = -(1 << 61);
            WIDE_BASE - (hashed(&mut parts) >> 4) as i64
        } else if self.is_zero() {
            -i64::try_from(self.rest().count()).unwrap_or(i64::MAX)
        } else if self.is_dotted() {
            self.major
        } else {
            self.number()
        }
    }

    /// The order of the tools that read versions as integers: golang-migrate (`uint`), sqlx
    /// (`i64`), goose (`int64`), refinery, and Flyway (part by part, each a `BigInteger`). It
    /// differs from the version's own order only for timestamps wider than 14 digits (which
    /// the integers put after every narrower version) and runs of more than 14 zeros (one
    /// number, 0, to them): reading a folder refuses those where its tool would run them in
    /// another order ([`source`](super::source)).
    pub(crate) fn cmp_as_integers(&self, other: &Self) -> Ordering {
        if self.is_dotted() || other.is_dotted() {
            let first = |v: &Self| if v.is_dotted() { v.major } else { v.number() };
            return first(self)
                .cmp(&first(other))
                .then_with(|| self.minor.cmp(&other.minor));
        }
        // Every digit as one integer, however wide: fewer significant digits is smaller.
        let significant = |v: &Self| -> Vec<u8> { v.digits().skip_while(|&d| d == b'0').collect() };
        let (a, b) = (significant(self), significant(other));
        a.len().cmp(&b.len()).then_with(|| a.cmp(&b))
    }

    /// The version as one number for a metric: every digit, as [`Version::number`], however
    /// wide (a 20-digit timestamp to the nearest `f64`).
    pub(crate) fn as_f64(&self) -> f64 {
        let digits: String = self.digits().map(char::from).collect();
        digits.parse().unwrap_or(0.0)
    }

    /// True for a version of zeros only (`0`, `00000000000000`, `0.0`).
    fn is_zero(&self) -> bool {
        !self.timestamp && !self.wide && self.major == 0 && self.minor.is_empty()
    }

    /// True for a version written with `.` (or, as Flyway's file names write it, `_`).
    fn is_dotted(&self) -> bool {
        self.text.contains('.')
    }

    /// A timestamp's digits after the 14th, or a run of zeros' (none for a plain integer or a
    /// dotted version): the tie-break after `major` and `minor`.
    fn rest(&self) -> impl Iterator<Item = u8> + '_ {
        let skip = if self.timestamp || self.wide || (self.is_zero() && !self.is_dotted()) {
            TIME_DIGITS
        } else {
            usize::MAX
        };
        self.digits().skip(skip)
    }

    /// True for a timestamp version (its first 14 digits read as `YYYYMMDDHHMMSS`).
    pub fn is_timestamp(&self) -> bool {
        self.timestamp
    }

    /// A timestamp's first 14 digits (`YYYYMMDDHHMMSS`) as an integer; `None` for a plain
    /// integer.
    pub(crate) fn time(&self) -> Option<i64> {
        self.timestamp.then_some(self.major)
    }

    /// A plain integer's value, a dotted version's first part (`1.1` → 1), a timestamp's
    /// first 14 digits: the version `migrate new` counts on from.
    pub(crate) fn major(&self) -> i64 {
        self.major
    }
}

/// True when 14 digits read as `YYYYMMDDHHMMSS` (year 1000 on, months, days, hours, minutes
/// and seconds in range; the calendar itself is not checked).
fn looks_like_time(digits: &str) -> bool {
    let field = |range: std::ops::Range<usize>| digits[range].parse::<u32>().unwrap_or(u32::MAX);
    field(0..4) >= 1000
        && (1..=12).contains(&field(4..6))
        && (1..=31).contains(&field(6..8))
        && field(8..10) <= 23
        && field(10..12) <= 59
        && field(12..14) <= 60
}

impl FromStr for Version {
    type Err = ParseVersionError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let not_a_number = || ParseVersionError::NotANumber {
            text: text.to_owned(),
        };
        let too_large = || ParseVersionError::TooLarge {
            text: text.to_owned(),
        };
        if text.contains('.') {
            // Flyway's `1.2.3`: digits between the dots, none of them empty.
            let mut parts = text.split('.').map(|part| {
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(not_a_number());
                }
                // Each part below 2^63, as the error (and the README) says: found by a user
                // trial, `migrate new` after `V1.9223372036854775807` wrote a version one
                // above it, which parsed.
                part.parse::<i64>()
                    .ok()
                    .and_then(|n| u64::try_from(n).ok())
                    .ok_or_else(too_large)
            });
            let major = parts.next().ok_or_else(not_a_number)??;
            let major = i64::try_from(major).map_err(|_| too_large())?;
            let mut minor = parts.collect::<Result<Vec<u64>, _>>()?;
            while minor.last() == Some(&0) {
                minor.pop();
            }
            return Ok(Self {
                text: text.into(),
                major,
                timestamp: false,
                wide: false,
                minor: minor.into(),
            });
        }
        // Digits, or groups of digits joined by single dashes (diesel's `2026-05-27-120000`):
        // `-1`, `1-` and `1--2` are no version.
        if !text
            .split('-')
            .all(|group| !group.is_empty() && group.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(not_a_number());
        }
        let digits: String = text.chars().filter(char::is_ascii_digit).collect();
        let number = digits.parse::<i64>().ok();
        let timestamp = digits.len() >= TIME_DIGITS && looks_like_time(&digits[..TIME_DIGITS]);
        let major = match number {
            Some(number) if !timestamp => number,
            // A timestamp, or wider than any integer (so wider than 14 digits).
            _ => digits[..TIME_DIGITS].parse().map_err(|_| too_large())?,
        };
        Ok(Self {
            text: text.into(),
            major,
            timestamp,
            wide: number.is_none(),
            minor: Box::default(),
        })
    }
}

impl From<u32> for Version {
    /// A plain integer version, written without leading zeros.
    fn from(n: u32) -> Self {
        Self {
            text: n.to_string().into(),
            major: n.into(),
            timestamp: false,
            wide: false,
            minor: Box::default(),
        }
    }
}

impl TryFrom<i64> for Version {
    type Error = ParseVersionError;

    /// The version an integer history column records (sqlx, golang-migrate, goose, refinery,
    /// svcdb before text versions): its digits, without leading zeros. Negative numbers are
    /// no version.
    fn try_from(n: i64) -> Result<Self, Self::Error> {
        if n < 0 {
            return Err(ParseVersionError::NotANumber {
                text: n.to_string(),
            });
        }
        n.to_string().parse()
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Version {}

impl Hash for Version {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.major.hash(state);
        self.minor.hash(state);
        self.rest().for_each(|d| d.hash(state));
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        // `minor` has no trailing zeros, so comparing it as a slice is comparing part by part
        // with missing parts as 0.
        self.major
            .cmp(&other.major)
            .then_with(|| self.minor.cmp(&other.minor))
            .then_with(|| self.rest().cmp(other.rest()))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    /// The text as written in the file name (padded to a width, if one is given).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.text)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Version({:?})", self.text)
    }
}

impl serde::Serialize for Version {
    /// A JSON string of the text as written (`"0003"`, `"2026-01-20-162913"`): a number would
    /// lose the dashes and leading zeros, and JavaScript readers the last digits of an
    /// 18-digit version.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        text.parse().unwrap()
    }

    #[test]
    fn timestamps_order_by_time_whatever_their_width() {
        assert!(v("2025-11-19-091444-0000") < v("2026-01-20-162913"));
        assert!(v("2026-01-20-162913") < v("2026-01-20-162913-0000"));
        assert!(v("2026-01-20-162913-0000") < v("2026-01-20-162913-0001"));
        assert!(v("20251119091444") < v("202601201629130000"));
        assert!(v("2025-11-19-091444-0000").is_timestamp());
        // Read as integers, the order would be the other way round: the control.
        assert!(
            v("2025-11-19-091444-0000").number() > v("2026-01-20-162913").number(),
            "the 18-digit number is the larger integer"
        );
    }

    #[test]
    fn plain_integers_order_numerically_and_ignore_leading_zeros() {
        let mut versions: Vec<Version> = (1..=10).rev().map(|n| v(&format!("{n:04}"))).collect();
        versions.sort();
        let texts: Vec<&str> = versions.iter().map(Version::as_str).collect();
        assert_eq!(
            texts,
            ["0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008", "0009", "0010"]
        );
        assert!(v("2") < v("10"));
        assert_eq!(v("0001"), v("1"));
        assert_eq!(v("0001").to_string(), "0001");
        assert_eq!(
            Version::try_from(20260120162913_i64).unwrap(),
            v("2026-01-20-162913")
        );
        assert!(!v("0010").is_timestamp());
    }

    #[test]
    fn runs_of_zeros_wider_than_14_digits_are_versions_of_their_own_in_diesels_order() {
        // Lemmy's two first migrations.
        let setup = v("00000000000000");
        let forbid = v("000000000000000");
        assert!(setup < forbid && forbid < v("000000000000000000") && forbid < v("1"));
        assert_ne!(setup.key(), forbid.key());
        assert_eq!((setup.key(), forbid.key()), (0, -1));
        // Up to 14 zeros, still the one version 0 (`0` is `00000000000000`), recorded as before.
        assert_eq!(v("0"), setup);
        assert_eq!(v("0000").key(), 0);
        // The control: as numbers the two are one.
        assert_eq!(setup.number(), forbid.number());
    }

    #[test]
    fn dotted_versions_order_part_by_part_as_flyway_orders_them() {
        let mut versions: Vec<Version> = ["2", "1.10", "1.1", "1.0.5", "1", "0.9", "10", "1.2"]
            .into_iter()
            .map(v)
            .collect();
        versions.sort();
        let texts: Vec<&str> = versions.iter().map(Version::as_str).collect();
        assert_eq!(
            texts,
            ["0.9", "1", "1.0.5", "1.1", "1.2", "1.10", "2", "10"]
        );
        // Leading zeros and trailing `.0`s do not count, as in Flyway.
        assert_eq!(v("1.1"), v("01.1.0"));
        assert_eq!(v("1.0"), v("1"));
        assert_eq!(v("1.0").key(), v("1").key());
        assert_eq!(v("01.1.0").key(), v("1.1").key());
        assert_eq!(v("1.1").to_string(), "1.1");
        // `1.1` and `11` have the same digits: distinct keys, the first below -2^62.
        assert_ne!(v("1.1").key(), v("11").key());
        assert!(v("1.1").key() < -(1 << 62) && v("1.2").key() < -(1 << 62));
        assert_ne!(v("1.1").key(), v("1.2").key());
        assert_eq!(v("2024.01.15.1200").major(), 2024);
        assert!(!v("2024.01.15.1200").is_timestamp());
        // The control: as numbers `1.1` and `11` are one.
        assert_eq!(v("1.1").number(), v("11").number());
    }

    #[test]
    fn the_integer_tools_order_wider_timestamps_later() {
        // golang-migrate, sqlx, goose, refinery, Flyway: the larger integer runs later.
        let (wide, narrow) = (v("2023061215230001"), v("20230613000000"));
        assert!(wide < narrow, "svcdb: by time");
        assert_eq!(wide.cmp_as_integers(&narrow), Ordering::Greater);
        // Otherwise alike: plain numbers, 14-digit timestamps, Flyway's dotted versions.
        assert_eq!(v("9").cmp_as_integers(&v("10")), Ordering::Less);
        assert_eq!(v("0009").cmp_as_integers(&v("9")), Ordering::Equal);
        assert_eq!(v("1.1").cmp_as_integers(&v("11")), Ordering::Less);
        assert_eq!(v("1.10").cmp_as_integers(&v("1.2")), Ordering::Greater);
        assert_eq!(
            v("20230612152300").cmp_as_integers(&v("20230613000000")),
            Ordering::Less
        );
        // Runs of zeros are all 0 to them.
        assert_eq!(
            v("0").cmp_as_integers(&v("000000000000000")),
            Ordering::Equal
        );
    }

    #[test]
    fn not_a_version() {
        assert!("".parse::<Version>().unwrap_err().is_not_a_number());
        assert!("-".parse::<Version>().unwrap_err().is_not_a_number());
        for bad in [
            "1.", ".1", "1..2", "1.a", "1.1-2", "1_1", "-1", "1-", "1--2", "-",
        ] {
            assert!(
                bad.parse::<Version>().unwrap_err().is_not_a_number(),
                "{bad}"
            );
        }
        assert!("1.99999999999999999999"
            .parse::<Version>()
            .unwrap_err()
            .is_too_large());
        // Each part below 2^63, as the error says; the largest one is a version.
        assert!("1.9223372036854775808"
            .parse::<Version>()
            .unwrap_err()
            .is_too_large());
        assert!("1.9223372036854775807".parse::<Version>().is_ok());
        assert!(Version::try_from(-5_i64).unwrap_err().is_not_a_number());
    }

    /// ory's pop writes 20-digit versions, the first ones not even dates (`20150100000001…`):
    /// read, in order, each its own history key. Found by a trial on kratos's folder.
    #[test]
    fn versions_wider_than_an_integer_order_by_their_first_14_digits_and_key_apart() {
        let v = |t: &str| t.parse::<Version>().unwrap();
        let ordered = [
            v("20150100000001000000"),
            v("20150100000001000001"),
            v("20150100000002"),
            v("20191100000001000000"),
            v("20200519101057000000"),
            v("99999999999999999999"),
        ];
        for pair in ordered.windows(2) {
            assert!(pair[0] < pair[1], "{} < {}", pair[0], pair[1]);
            assert_eq!(
                pair[0].cmp_as_integers(&pair[1]),
                pair[0]
                    .as_str()
                    .len()
                    .cmp(&pair[1].as_str().len())
                    .then(Ordering::Less),
                "{} vs {}",
                pair[0],
                pair[1]
            );
        }
        let keys: std::collections::HashSet<i64> = ordered.iter().map(Version::key).collect();
        assert_eq!(keys.len(), ordered.len());
        for wide in [&ordered[0], &ordered[1], &ordered[3], &ordered[5]] {
            assert!(
                (-3 * (1_i64 << 60)..=-(1_i64 << 61)).contains(&wide.key()),
                "{wide}"
            );
            assert_eq!(wide.key(), v(wide.as_str()).key());
            assert_eq!(wide.number(), i64::MAX);
        }
        assert_eq!(ordered[2].key(), 20150100000002);
        assert!(v("20150100000001000000").as_f64() > 2.01e19);
        // Leading zeros still make no integer wide.
        assert_eq!(v("000000000000000000000042").key(), 42);
    }
}
