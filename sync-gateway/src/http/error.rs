//! HTTP error answers: `{"error": code, "message": …}` with the status the code calls for.
//! A 500 says nothing about its cause (that goes to the log); a 503 says when to come back.

use crate::access::admission::Refusal;
use crate::access::limits::Busy;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio_postgres::error::SqlState;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: json!({"error": error, "message": message.into()}),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn unknown_entity(code: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "unknown_entity",
            format!("{code} is not a tracked entity"),
        )
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn gone_expired() -> Self {
        Self::new(
            StatusCode::GONE,
            "cursor_expired",
            "refetch a snapshot and continue from its cursor",
        )
    }

    /// A failed `expect`: the current row, as the user sees it.
    pub fn conflict(current: Value) -> Self {
        let mut e = Self::new(
            StatusCode::CONFLICT,
            "conflict",
            "the row is not as expected",
        );
        e.body["current"] = current;
        e
    }

    /// 503 with `Retry-After`: come back later.
    pub fn unavailable(message: impl Into<String>, retry_after: std::time::Duration) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "internal", message);
        e.retry_after = Some(retry_after.as_secs().max(1));
        e
    }

    /// A cursor this gateway has not reached yet (a standby still replaying): 503, come back
    /// later, here or at another gateway.
    pub fn behind(retry_after: std::time::Duration) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "behind",
            "this gateway has not reached since yet; retry",
        );
        e.retry_after = Some(retry_after.as_secs().max(1));
        e
    }

    /// Over a cap, or no connection in time: 503, come back later.
    pub fn busy(busy: Busy) -> Self {
        Self::unavailable(busy.to_string(), busy.retry_after())
    }

    /// An unexpected failure: logged, and answered without its details.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::warn!(%error, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }

    /// A database error as the client should see it: refusals by privileges or RLS are 403,
    /// bad values 400, anything else 500.
    pub fn from_db(error: tokio_postgres::Error) -> Self {
        let Some(db) = error.as_db_error() else {
            return Self::internal(crate::ErrorChain(&error));
        };
        let code = db.code();
        let class = &code.code()[..2];
        if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            Self::forbidden(db.message())
        } else if class == "22" || class == "23" {
            Self::bad_request(db.message())
        } else if *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::SNAPSHOT_TOO_OLD
        {
            // Also a standby's query cancelled by replay (conflict with recovery), or a
            // standby too far from its last tick for a cursor: both pass.
            Self::unavailable(db.message(), std::time::Duration::from_secs(1))
        } else {
            Self::internal(crate::ErrorChain(&error))
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Names the mutation the error is about.
    pub fn with_mutation(mut self, id: &str) -> Self {
        self.body["mutation"] = json!(id);
        self
    }
}

impl From<Busy> for ApiError {
    fn from(busy: Busy) -> Self {
        ApiError::busy(busy)
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Unknown(code) => ApiError::unknown_entity(&code),
            Refusal::NoRole(_) | Refusal::NoAccess(_) => ApiError::forbidden(refusal.to_string()),
            Refusal::Busy(busy) => ApiError::busy(busy),
            Refusal::Failed(e) => ApiError::internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
