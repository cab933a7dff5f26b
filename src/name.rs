//! uid and group names: non-empty strings of at most 256 bytes; JSON numbers
//! are accepted and turned into their decimal string, as PHP backends often
//! pass integer uids.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Longest uid or group name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// A validated uid or group name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Name(pub String);

impl Name {
    /// Validates a name.
    pub fn new(s: String) -> Result<Self, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > MAX_NAME_BYTES {
            return Err(format!("must be at most {MAX_NAME_BYTES} bytes"));
        }
        Ok(Name(s))
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NameVisitor;

        impl Visitor<'_> for NameVisitor {
            type Value = Name;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-empty string of at most 256 bytes, or a number")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Name, E> {
                Name::new(v.to_owned()).map_err(E::custom)
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Name, E> {
                Name::new(v).map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Name, E> {
                Ok(Name(v.to_string()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Name, E> {
                Ok(Name(v.to_string()))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Name, E> {
                Ok(Name(
                    serde_json::Number::from_f64(v)
                        .map(|n| n.to_string())
                        .ok_or_else(|| E::custom("not a finite number"))?,
                ))
            }
        }

        d.deserialize_any(NameVisitor)
    }
}

/// One name or a list of them (GatewayWorker accepts both for uids and
/// groups).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A list.
    Many(Vec<Name>),
    /// A single name.
    One(Name),
}

impl OneOrMany {
    /// The names as strings.
    pub fn into_strings(self) -> Vec<String> {
        match self {
            OneOrMany::One(n) => vec![n.0],
            OneOrMany::Many(v) => v.into_iter().map(|n| n.0).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_strings_and_numbers() {
        let n: Name = serde_json::from_str("\"alice\"").unwrap();
        assert_eq!(n.0, "alice");
        let n: Name = serde_json::from_str("42").unwrap();
        assert_eq!(n.0, "42");
        let n: Name = serde_json::from_str("-7").unwrap();
        assert_eq!(n.0, "-7");
    }

    #[test]
    fn rejects_empty_long_and_other_types() {
        assert!(serde_json::from_str::<Name>("\"\"").is_err());
        let long = format!("\"{}\"", "x".repeat(257));
        assert!(serde_json::from_str::<Name>(&long).is_err());
        assert!(serde_json::from_str::<Name>("true").is_err());
        assert!(serde_json::from_str::<Name>("{}").is_err());
    }
}
