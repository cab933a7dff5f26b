//! Client authentication: a JWT passed as `?token=` on `/ws`.

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::Config;
use crate::hub::Membership;
use crate::name::Name;
use crate::session::Session;

/// Verifies client tokens (HS256 with a secret, or RS256/ES256 with a public
/// key).
pub struct ClientAuth {
    key: DecodingKey,
    validation: Validation,
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
}

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
        // `exp` is honoured when present, not required; `aud` is not used.
        validation.required_spec_claims.clear();
        validation.validate_aud = false;
        validation.leeway = 5;
        Ok(Some(ClientAuth { key, validation }))
    }

    /// Checks a token; returns the membership its claims ask for.
    pub fn verify(&self, token: &str) -> Result<Membership, String> {
        let data = decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| format!("invalid token: {e}"))?;
        let claims = data.claims;
        let mut groups: Vec<String> = Vec::with_capacity(claims.groups.len());
        for Name(g) in claims.groups {
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        Ok(Membership {
            uid: claims.sub.map(|n| n.0),
            groups,
            session: claims.session.unwrap_or_default(),
        })
    }
}
