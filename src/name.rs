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
                Name::from_f64(v).map_err(E::custom)
            }
        }

        d.deserialize_any(NameVisitor)
    }
}

impl Name {
    /// A number's decimal string: `1e3` is "1000", as PHP would print it.
    fn from_f64(v: f64) -> Result<Name, String> {
        if !v.is_finite() {
            return Err("not a finite number".into());
        }
        if v.fract() == 0.0 && v.abs() < 1e15 {
            return Ok(Name((v as i64).to_string()));
        }
        Ok(Name(v.to_string()))
    }
}

/// One name or a list of them (GatewayWorker accepts both for uids and
/// groups).
#[derive(Debug, Clone)]
pub enum OneOrMany {
    /// A list.
    Many(Vec<Name>),
    /// A single name.
    One(Name),
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // By hand rather than `untagged`, so that a bad name reports what is
        // wrong with it instead of "did not match any variant".
        struct OneOrManyVisitor;

        impl<'de> Visitor<'de> for OneOrManyVisitor {
            type Value = OneOrMany;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a name (string or number) or a list of names")
            }

            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<Name>()? {
                    names.push(name);
                }
                Ok(OneOrMany::Many(names))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Name::new(v.to_owned())
                    .map(OneOrMany::One)
                    .map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(Name(v.to_string())))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(Name(v.to_string())))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<OneOrMany, E> {
                Name::from_f64(v).map(OneOrMany::One).map_err(E::custom)
            }
        }

        d.deserialize_any(OneOrManyVisitor)
    }
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
        let n: Name = serde_json::from_str("1e3").unwrap();
        assert_eq!(n.0, "1000");
    }

    #[test]
    fn rejects_empty_long_and_other_types() {
        assert!(serde_json::from_str::<Name>("\"\"").is_err());
        let long = format!("\"{}\"", "x".repeat(257));
        assert!(serde_json::from_str::<Name>(&long).is_err());
        assert!(serde_json::from_str::<Name>("true").is_err());
        assert!(serde_json::from_str::<Name>("{}").is_err());
    }

    #[test]
    fn one_or_many_explains_a_bad_name() {
        let many: OneOrMany = serde_json::from_str(r#"["a", 2]"#).unwrap();
        assert_eq!(many.into_strings(), vec!["a", "2"]);
        let err = serde_json::from_str::<OneOrMany>(r#"["a", ""]"#).unwrap_err();
        assert!(err.to_string().contains("must not be empty"), "{err}");
    }
}
