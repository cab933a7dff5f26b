//! Client authentication: a JWT passed as `?token=` on `/ws`.
//!
//! What a token must be: signed with the configured key by the one
//! algorithm that key type allows (`alg: none` and algorithm confusion are
//! refused by the pinned list), with an `exp` in the future unless
//! `--client-jwt-require-exp=false`, an `nbf` (when present) in the past,
//! and the `aud` / `iss` the options name when they are set; `exp` and
//! `nbf` are checked with `--client-jwt-leeway`. Claims are read only after
//! the signature checked out (jsonwebtoken verifies before it decodes).
//! The claims gatecast keeps are capped: at most [`MAX_TOKEN_GROUPS`]
//! groups and a `session` of at most [`MAX_TOKEN_SESSION_BYTES`].

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::Config;
use crate::hub::Membership;
use crate::name::Name;
use crate::session::Session;

/// Most groups a token may name; a token with more is refused (401
/// `invalid token`), not cut short, so a mistake in the issuer shows.
pub const MAX_TOKEN_GROUPS: usize = 100;

/// Largest `session` a token may carry, in bytes of compact JSON; a token
/// with a larger one is refused (401 `invalid token`). Each group name and
/// the `sub` are at most 256 bytes, as everywhere ([`crate::name`]).
pub const MAX_TOKEN_SESSION_BYTES: usize = 8 << 10;

/// Verifies client tokens (HS256 with a secret, or RS256/ES256 with a public
/// key).
pub struct ClientAuth {
    key: DecodingKey,
    validation: Validation,
    /// `--client-jwt-enforce-exp`.
    enforce_exp: bool,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

/// The claims gatecast reads; others are ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    /// Bound as the connection's uid.
    sub: Option<Name>,
    /// Joined at connect.
    #[serde(default)]
    groups: Vec<Name>,
    /// The initial session.
    session: Option<Session>,
    /// Expiry, Unix seconds (checked by jsonwebtoken; kept to close the
    /// connection when it passes, with `--client-jwt-enforce-exp`).
    exp: Option<u64>,
}

/// What a valid token grants.
#[derive(Debug)]
pub struct Verified {
    /// Initial uid, groups and session.
    pub membership: Membership,
    /// When the token stops being valid (its `exp` plus the leeway), in
    /// Unix milliseconds, when it must close the connection then
    /// (`--client-jwt-enforce-exp`).
    pub close_at_unix_ms: Option<u64>,
}

/// Why a token was refused: logged at debug, never told to the client
/// (which check failed would help someone probing for a way in).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(String);

impl ClientAuth {
    /// The verifier the configuration asks for, if any.
    pub fn from_config(config: &Config) -> Result<Option<Self>, String> {
        let (key, algorithms) = if let Some(secret) = &config.client_jwt_secret {
            if secret.is_empty() {
                return Err("--client-jwt-secret must not be empty".into());
            }
            (
                DecodingKey::from_secret(secret.as_bytes()),
                vec![Algorithm::HS256],
            )
        } else if let Some(path) = &config.client_jwt_public_key {
            let pem =
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                (key, vec![Algorithm::RS256])
            } else {
                let key = DecodingKey::from_ec_pem(&pem).map_err(|e| {
                    format!(
                        "{} is neither an RSA nor an EC public key: {e}",
                        path.display()
                    )
                })?;
                (key, vec![Algorithm::ES256])
            }
        } else {
            return Ok(None);
        };
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        let mut required = Vec::new();
        if config.client_jwt_require_exp {
            required.push("exp");
        }
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // jsonwebtoken skips `iss` and `aud` checks when the token lacks the
        // claim: asking for a value requires the claim too.
        if let Some(issuer) = &config.client_jwt_issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &config.client_jwt_audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // jsonwebtoken would refuse every token that has an `aud`.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        validation.leeway = config.client_jwt_leeway.as_secs();
        Ok(Some(ClientAuth {
            key,
            validation,
            enforce_exp: config.client_jwt_enforce_exp,
        }))
    }

    /// Checks a token; returns what its claims grant.
    pub fn verify(&self, token: &str) -> Result<Verified, Invalid> {
        let data = decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| Invalid(e.to_string()))?;
        let claims = data.claims;
        if claims.groups.len() > MAX_TOKEN_GROUPS {
            return Err(Invalid(format!(
                "{} groups, more than {MAX_TOKEN_GROUPS}",
                claims.groups.len()
            )));
        }
        if let Some(session) = &claims.session {
            // Size and depth (what every node can read back).
            crate::session::check(session, MAX_TOKEN_SESSION_BYTES)
                .map_err(|e| Invalid(format!("token {e}")))?;
        }
        let mut groups: Vec<String> = Vec::with_capacity(claims.groups.len());
        for Name(g) in claims.groups {
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        let close_at_unix_ms = claims.exp.filter(|_| self.enforce_exp).map(|exp| {
            exp.saturating_add(self.validation.leeway)
                .saturating_mul(1000)
        });
        Ok(Verified {
            membership: Membership {
                uid: claims.sub.map(|n| n.0),
                groups,
                session: claims.session.unwrap_or_default(),
            },
            close_at_unix_ms,
        })
    }
}
