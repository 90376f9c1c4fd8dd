//! The submit's queue fields beside [`Priority`](crate::engine::Priority): the deadline
//! `cancel_after`, also Replicate's `Cancel-After` header, and its duration grammar.

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

/// The header that carries the deadline (Replicate's).
pub const CANCEL_AFTER_HEADER: &str = "Cancel-After";
/// The longest deadline accepted.
pub const MAX_CANCEL_AFTER: Duration = Duration::from_secs(24 * 3600);
/// The longest `cancel_after` text accepted (and quoted back in its 400).
const MAX_CANCEL_AFTER_BYTES: usize = 32;

/// The rule of `cancel_after` and `Cancel-After`, as its 400 states it.
pub const CANCEL_AFTER_RULE: &str = "must be a duration from 1s to 24h: whole hours, minutes \
     and seconds in that order, like \"90s\", \"5m\" or \"1h30m\" (a bare number is seconds)";

/// Seconds of a duration written as Replicate's `Cancel-After` examples are (`90s`, `5m`,
/// `1h30m`): whole hours, minutes and seconds, each at most once and in that order, or a bare
/// number of seconds. `None` when the text is not one (or overflows).
pub fn parse_duration(text: &str) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().ok();
    }
    let mut units = [("h", 3600), ("m", 60), ("s", 1)].into_iter();
    let (mut rest, mut total) = (text, 0u64);
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let n: u64 = rest[..digits].parse().ok()?;
        let unit = rest[digits..].get(..1)?;
        // the units left after this one: each at most once, in order
        let (_, scale) = units.find(|(u, _)| *u == unit)?;
        total = total.checked_add(n.checked_mul(scale)?)?;
        rest = &rest[digits + 1..];
    }
    Some(total)
}

/// A deadline: the task fails if it has not started this long after its admission, and is
/// cancelled if it is still running then. Kept as written for the echo.
#[derive(Clone, Debug, PartialEq)]
pub struct CancelAfter {
    duration: Duration,
    text: String,
}

impl CancelAfter {
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// The value as the request wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl std::str::FromStr for CancelAfter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let duration = parse_duration(s)
            .map(Duration::from_secs)
            .filter(|d| !d.is_zero() && *d <= MAX_CANCEL_AFTER);
        match duration {
            Some(duration) => Ok(CancelAfter {
                duration,
                text: s.to_string(),
            }),
            None if s.len() <= MAX_CANCEL_AFTER_BYTES => {
                Err(format!("{CANCEL_AFTER_RULE}, got {s:?}"))
            }
            None => Err(format!(
                "{CANCEL_AFTER_RULE}, at most {MAX_CANCEL_AFTER_BYTES} bytes"
            )),
        }
    }
}

impl Serialize for CancelAfter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for CancelAfter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CancelAfterVisitor;
        impl Visitor<'_> for CancelAfterVisitor {
            type Value = CancelAfter;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration string like \"90s\", \"5m\" or \"1h30m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CancelAfter, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(CancelAfterVisitor)
    }
}

impl PartialSchema for CancelAfter {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(r"^([0-9]+|([0-9]+h)?([0-9]+m)?([0-9]+s)?)$"))
            .max_length(Some(MAX_CANCEL_AFTER_BYTES))
            .examples(["90s", "5m", "1h30m"])
            .description(Some(
                "A deadline, as Replicate's Cancel-After header (which may carry it instead): \
                 whole hours, minutes and seconds in that order (\"90s\", \"5m\", \"1h30m\"; a \
                 bare number is seconds), from 1s to 24h, counted from the submit. A task not \
                 started by then fails with code 5005; one still running then is cancelled \
                 (status cancelled, code 5005). Given with a Cancel-After header that differs, \
                 a 400 naming both.",
            ))
            .into()
    }
}

impl ToSchema for CancelAfter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_hours_minutes_and_seconds_in_order() {
        for (text, secs) in [
            ("90s", 90),
            ("5m", 300),
            ("1h", 3600),
            ("1h30m", 5400),
            ("1h30m45s", 5445),
            ("2m0s", 120),
            ("0h1s", 1),
            ("90", 90),
            ("007s", 7),
            ("0", 0),
        ] {
            assert_eq!(parse_duration(text), Some(secs), "{text}");
        }
        for text in [
            "",
            "s",
            "1.5h",
            "-5s",
            "+5s",
            "5 s",
            " 5s",
            "5S",
            "5ms",
            "5d",
            "1m1h",
            "5s5s",
            "1h1h",
            "h1",
            "5sm",
            "1h30",
            "99999999999999999999s",
            "1x",
            "1h\u{e9}",
        ] {
            assert_eq!(parse_duration(text), None, "{text:?}");
        }
        assert_eq!(parse_duration("18446744073709551615h"), None, "overflow");
    }

    #[test]
    fn a_deadline_is_from_1s_to_24h() {
        let ok: CancelAfter = "1h30m".parse().unwrap();
        assert_eq!(
            (ok.duration(), ok.as_str()),
            (Duration::from_secs(5400), "1h30m")
        );
        assert_eq!(
            "1s".parse::<CancelAfter>().unwrap().duration(),
            Duration::from_secs(1)
        );
        assert_eq!(
            "24h".parse::<CancelAfter>().unwrap().duration(),
            MAX_CANCEL_AFTER
        );
        for bad in ["0", "0s", "0h0m0s", "24h1s", "86401", "soon"] {
            let e = bad.parse::<CancelAfter>().unwrap_err();
            assert_eq!(e, format!("{CANCEL_AFTER_RULE}, got {bad:?}"));
        }
        let long = "1".repeat(40);
        assert!(long
            .parse::<CancelAfter>()
            .unwrap_err()
            .ends_with("at most 32 bytes"));
        // the echo writes it as sent; a number is not a duration string
        assert_eq!(serde_json::to_value(&ok).unwrap(), "1h30m");
        let e = serde_json::from_value::<CancelAfter>(90.into()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid type: integer `90`, expected a duration string like \"90s\", \"5m\" or \"1h30m\""
        );
    }
}
