//! Who is asking: the token of a request (`Authorization: Bearer`, or `?token=` on GETs,
//! since browsers cannot set headers on a WebSocket) and whom its holder acts as, as an
//! extractor every endpoint takes.

use super::error::ApiError;
use crate::access::auth::Claims;
use crate::access::roles::UserContext;
use crate::AppState;
use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};
use serde::Deserialize;
use std::sync::Arc;

/// A valid token and the user it stands for. A role the gateway may not act as is refused
/// like a bad token: 401, `forbidden`.
pub struct Authenticated {
    pub claims: Claims,
    pub user: UserContext,
}

impl Authenticated {
    /// The user, who must act as a role: every endpoint that reads or writes a table needs one.
    pub fn with_role(self) -> Result<UserContext, ApiError> {
        match self.user.role {
            Some(_) => Ok(self.user),
            None => Err(ApiError::forbidden(
                "the token names no role and the gateway has no default role",
            )),
        }
    }
}

#[derive(Deserialize)]
struct TokenParam {
    token: Option<String>,
}

impl FromRequestParts<Arc<AppState>> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let bearer = bearer(&parts.headers);
        let query = if parts.method == Method::GET {
            Query::<TokenParam>::from_request_parts(parts, state)
                .await
                .ok()
                .and_then(|q| q.0.token)
        } else {
            None
        };
        authenticate(state, bearer.or(query))
    }
}

/// The holder of `token` (None: no token given).
pub fn authenticate(state: &AppState, token: Option<String>) -> Result<Authenticated, ApiError> {
    let token = token.ok_or_else(|| {
        ApiError::unauthorized("a token is required: Authorization: Bearer or ?token=")
    })?;
    let claims = state
        .verifier
        .verify(&token)
        .map_err(|e| ApiError::unauthorized(e.to_string()))?;
    let user = state
        .roles
        .user(&claims)
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "forbidden", e.to_string()))?;
    Ok(Authenticated { claims, user })
}

/// The token of `Authorization: Bearer`, if any.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
}

/// A client id (an origin tag, SPEC 2.3) must not hold `:`, which separates the user from
/// the client id in the tags `/v1/write` records (`<sub>:<clientId>`): with it, one user's
/// tag could spell another user's.
pub fn check_client_id(client_id: Option<&str>) -> Result<(), ApiError> {
    match client_id {
        Some(id) if id.is_empty() || id.len() > 128 || id.contains(':') => Err(
            ApiError::bad_request("clientId must have 1 to 128 characters and no ':'"),
        ),
        _ => Ok(()),
    }
}
