//! Tokens (SPEC 2.2): JWTs checked with one configured key whose algorithm is the only one
//! accepted (HS256 secret, or an RS256/ES256 public key), and minted for development with
//! `sync-gateway token`. `alg: none`, another algorithm, a bad signature, a missing or past
//! `exp`, a future `nbf`, a missing `sub` and, when configured, a wrong `aud` are refused.

use crate::config::AuthArgs;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("configure exactly one of --jwt-secret and --jwt-public-key")]
    NoKey,
    #[error("cannot read the public key {path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the public key is neither an RSA nor a P-256 key in PEM")]
    KeyFormat,
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("invalid token: sub must be a non-empty string")]
    BadSubject,
}

/// What a valid token says.
#[derive(Clone, Debug)]
pub struct Claims {
    /// `sub`: the user id.
    pub sub: String,
    /// `exp`, in seconds since the Unix epoch.
    pub exp: u64,
    /// `role`: the PostgreSQL role for row visibility.
    pub role: Option<String>,
    /// `client_id`: the origin tag of this client's writes.
    pub client_id: Option<String>,
    /// Every claim, as row-level-security policies see them.
    pub all: Map<String, Value>,
}

impl Claims {
    /// Time left before `exp`.
    pub fn remaining(&self) -> Duration {
        Duration::from_secs(self.exp.saturating_sub(now()))
    }
}

/// Checks tokens with the configured key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn new(args: &AuthArgs) -> Result<Self, AuthError> {
        let (key, algorithm) = match (&args.jwt_secret, &args.jwt_public_key) {
            (Some(secret), None) if !secret.is_empty() => (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ),
            (None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|source| AuthError::KeyFile {
                    path: path.display().to_string(),
                    source,
                })?;
                if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                    (key, Algorithm::RS256)
                } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                    (key, Algorithm::ES256)
                } else {
                    return Err(AuthError::KeyFormat);
                }
            }
            _ => return Err(AuthError::NoKey),
        };
        let mut validation = Validation::new(algorithm);
        validation.validate_nbf = true;
        validation.leeway = 0;
        if let Some(issuer) = &args.jwt_issuer {
            validation.set_issuer(&[issuer]);
        }
        match &args.jwt_audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.set_required_spec_claims(&required(&["exp", "sub", "aud"], args));
            }
            None => {
                validation.validate_aud = false;
                validation.set_required_spec_claims(&required(&["exp", "sub"], args));
            }
        }
        Ok(Verifier { key, validation })
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let all = decode::<Map<String, Value>>(token, &self.key, &self.validation)?.claims;
        let sub = match all.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(AuthError::BadSubject),
        };
        let exp = all.get("exp").and_then(Value::as_u64).unwrap_or(0);
        let text = |name: &str| all.get(name).and_then(Value::as_str).map(str::to_owned);
        Ok(Claims {
            sub,
            exp,
            role: text("role"),
            client_id: text("client_id"),
            all,
        })
    }
}

/// The claims a token must carry: `iss` too when an issuer is configured.
fn required<'a>(claims: &[&'a str], args: &AuthArgs) -> Vec<&'a str> {
    let mut claims = claims.to_vec();
    if args.jwt_issuer.is_some() {
        claims.push("iss");
    }
    claims
}

/// A token signed with an HS256 secret, for development.
pub fn mint(
    secret: &str,
    sub: &str,
    role: Option<&str>,
    ttl: Duration,
    audience: Option<&str>,
    extra: &[(String, String)],
) -> String {
    let mut claims = Map::new();
    for (key, value) in extra {
        claims.insert(key.clone(), Value::String(value.clone()));
    }
    claims.insert("sub".into(), sub.into());
    claims.insert("iat".into(), now().into());
    claims.insert("exp".into(), (now() + ttl.as_secs()).into());
    if let Some(role) = role {
        claims.insert("role".into(), role.into());
    }
    if let Some(audience) = audience {
        claims.insert("aud".into(), audience.into());
    }
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing does not fail")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(secret: &str, audience: Option<&str>) -> AuthArgs {
        AuthArgs {
            jwt_secret: Some(secret.into()),
            jwt_public_key: None,
            jwt_audience: audience.map(Into::into),
            jwt_issuer: None,
        }
    }

    fn hs256(claims: Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn a_minted_token_verifies_with_its_claims() {
        let verifier = Verifier::new(&args("s3cret", None)).unwrap();
        let token = mint(
            "s3cret",
            "alice",
            Some("app_user"),
            Duration::from_secs(60),
            None,
            &[("team".into(), "a".into())],
        );
        let claims = verifier.verify(&token).unwrap();
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.role.as_deref(), Some("app_user"));
        assert_eq!(claims.all["team"], "a");
        assert!(claims.remaining() > Duration::from_secs(50));
    }

    #[test]
    fn bad_tokens_are_refused() {
        let verifier = Verifier::new(&args("s3cret", None)).unwrap();
        let later = now() + 600;
        for (why, token) in [
            (
                "wrong secret",
                hs256(serde_json::json!({"sub": "a", "exp": later}), "other"),
            ),
            (
                "expired",
                hs256(serde_json::json!({"sub": "a", "exp": now() - 5}), "s3cret"),
            ),
            ("no exp", hs256(serde_json::json!({"sub": "a"}), "s3cret")),
            ("no sub", hs256(serde_json::json!({"exp": later}), "s3cret")),
            (
                "empty sub",
                hs256(serde_json::json!({"sub": "", "exp": later}), "s3cret"),
            ),
            (
                "not yet valid",
                hs256(
                    serde_json::json!({"sub": "a", "exp": later, "nbf": later - 60}),
                    "s3cret",
                ),
            ),
            (
                "alg none",
                format!(
                    "{}.{}.",
                    b64(r#"{"alg":"none","typ":"JWT"}"#),
                    b64(&format!(r#"{{"sub":"a","exp":{later}}}"#))
                ),
            ),
            (
                "HS384",
                encode(
                    &Header::new(Algorithm::HS384),
                    &serde_json::json!({"sub": "a", "exp": later}),
                    &EncodingKey::from_secret(b"s3cret"),
                )
                .unwrap(),
            ),
            ("garbage", "not.a.token".into()),
        ] {
            assert!(verifier.verify(&token).is_err(), "accepted: {why}");
        }
    }

    #[test]
    fn the_audience_is_checked_when_configured() {
        let verifier = Verifier::new(&args("s3cret", Some("sync"))).unwrap();
        let later = now() + 600;
        assert!(verifier
            .verify(&hs256(
                serde_json::json!({"sub": "a", "exp": later, "aud": "sync"}),
                "s3cret"
            ))
            .is_ok());
        assert!(verifier
            .verify(&hs256(
                serde_json::json!({"sub": "a", "exp": later, "aud": "other"}),
                "s3cret"
            ))
            .is_err());
        assert!(verifier
            .verify(&hs256(
                serde_json::json!({"sub": "a", "exp": later}),
                "s3cret"
            ))
            .is_err());
    }

    #[test]
    fn the_issuer_is_checked_when_configured() {
        let verifier = Verifier::new(&AuthArgs {
            jwt_issuer: Some("https://id.example".into()),
            ..args("s3cret", None)
        })
        .unwrap();
        let later = now() + 600;
        let with = |iss: Value| {
            hs256(
                serde_json::json!({"sub": "a", "exp": later, "iss": iss}),
                "s3cret",
            )
        };
        assert!(verifier.verify(&with("https://id.example".into())).is_ok());
        assert!(verifier
            .verify(&with("https://evil.example".into()))
            .is_err());
        assert!(verifier
            .verify(&hs256(
                serde_json::json!({"sub": "a", "exp": later}),
                "s3cret"
            ))
            .is_err());
    }

    #[test]
    fn public_keys_pin_rs256_and_es256() {
        let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/");
        let claims = serde_json::json!({"sub": "a", "exp": now() + 600});
        for (public, private, algorithm) in [
            ("rs256-public.pem", "rs256-private.pem", Algorithm::RS256),
            (
                "es256-public.pem",
                "es256-private.pk8.pem",
                Algorithm::ES256,
            ),
        ] {
            let public_path = format!("{keys}{public}");
            let args = AuthArgs {
                jwt_secret: None,
                jwt_public_key: Some(public_path.clone().into()),
                jwt_audience: None,
                jwt_issuer: None,
            };
            let verifier = Verifier::new(&args).unwrap();
            let pem = std::fs::read(format!("{keys}{private}")).unwrap();
            let key = match algorithm {
                Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
                _ => EncodingKey::from_ec_pem(&pem).unwrap(),
            };
            let good = encode(&Header::new(algorithm), &claims, &key).unwrap();
            assert_eq!(verifier.verify(&good).unwrap().sub, "a", "{algorithm:?}");
            // The classic confusion: HS256 "signed" with the public key as the secret.
            let public_bytes = std::fs::read(&public_path).unwrap();
            let forged = encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(&public_bytes),
            )
            .unwrap();
            assert!(
                verifier.verify(&forged).is_err(),
                "{algorithm:?} accepted HS256"
            );
        }
    }

    #[test]
    fn exactly_one_key_is_required() {
        assert!(matches!(
            Verifier::new(&AuthArgs {
                jwt_secret: None,
                jwt_public_key: None,
                jwt_audience: None,
                jwt_issuer: None,
            }),
            Err(AuthError::NoKey)
        ));
    }

    fn b64(text: &str) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = text.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().fold(0u32, |n, &b| n << 8 | b as u32) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }
}
