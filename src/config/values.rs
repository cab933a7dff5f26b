//! The types of option values that are more than a string or a number:
//! secrets (never printed), the log format, the welcome frame template.

use clap::ValueEnum;

/// A secret option's value (a key, a password, a URL that may hold
/// one): `Debug` prints `<redacted>`, so the configuration can be logged
/// or printed whole. Derefs to the `String` for the code that uses it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value itself, for the code that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::ops::Deref for Secret {
    type Target = String;
    fn deref(&self) -> &String {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_owned())
    }
}

/// How log lines are written.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The `--welcome-frame` template, cut once at its `{client_id}`
/// placeholders so that each connect only concatenates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WelcomeFrame {
    /// The text between placeholders: one more piece than placeholders,
    /// so at least two.
    pieces: Vec<String>,
}

impl WelcomeFrame {
    /// The placeholder replaced with the client_id.
    pub const PLACEHOLDER: &'static str = "{client_id}";
    /// gatecast's own welcome (SPEC section 2).
    pub const DEFAULT: &'static str = r#"{"type":"welcome","client_id":"{client_id}"}"#;

    /// A template with at least one `{client_id}`; every occurrence is
    /// replaced.
    pub fn parse(template: &str) -> Result<Self, String> {
        if !template.contains(Self::PLACEHOLDER) {
            return Err(format!(
                "the template must contain {} (e.g. {})",
                Self::PLACEHOLDER,
                r#"{"type":"init","client_id":"{client_id}"}"#
            ));
        }
        Ok(WelcomeFrame {
            pieces: template
                .split(Self::PLACEHOLDER)
                .map(str::to_owned)
                .collect(),
        })
    }

    /// The welcome text for `client_id`.
    pub fn render(&self, client_id: impl std::fmt::Display) -> String {
        use std::fmt::Write;
        let fixed: usize = self.pieces.iter().map(String::len).sum();
        // A client_id is 20 hex characters.
        let mut text = String::with_capacity(fixed + 20 * (self.pieces.len() - 1));
        let (first, rest) = self.pieces.split_first().expect("at least two pieces");
        text.push_str(first);
        for piece in rest {
            let _ = write!(text, "{client_id}");
            text.push_str(piece);
        }
        text
    }
}

/// `--drain-spread`: a duration, or `auto` (see `Config::drain_spread`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainSpread {
    /// Half of `--shutdown-grace`, at most 10s: fits any grace.
    Auto,
    /// This long.
    Fixed(std::time::Duration),
}

impl DrainSpread {
    /// `auto` or a duration (`10s`, `2500ms`).
    pub fn parse(value: &str) -> Result<Self, String> {
        if value.trim().eq_ignore_ascii_case("auto") {
            return Ok(DrainSpread::Auto);
        }
        humantime::parse_duration(value)
            .map(DrainSpread::Fixed)
            .map_err(|e| format!("{e} (expected `auto` or a duration such as 10s)"))
    }
}

/// `--rebalance`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebalance {
    /// Nodes above the mean move their excess to the others.
    On,
    /// Connections stay where they are.
    Off,
}
