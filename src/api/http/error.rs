//! The one place where errors become HTTP answers (contract §3):
//! `{"error": "...", "field": "..."}` with 400, 404, 413, 415, 429 or 503.
//! A 500 means the server itself failed (disk, a bug), never the request.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::api::auth::AuthError;
use crate::db::DbError;
use crate::limits::Invalid;
use crate::query::QueryError;
use crate::storage::StorageError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub field: Option<String>,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            field: None,
            retry_after_s: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> ApiError {
        self.field = Some(field.into());
        self
    }

    pub fn bad_request(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message).with_field(field)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    pub fn too_large(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, message).with_field(field)
    }

    pub fn unsupported_media(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> ApiError {
        let status = if e.reason.contains("at most") && e.reason.contains("bytes") {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(status, format!("{}: {}", e.field, e.reason)).with_field(e.field)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        match e {
            AuthError::Missing | AuthError::Invalid => {
                ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()).with_field("authorization")
            }
            AuthError::Forbidden { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, e.to_string()).with_field("authorization")
            }
            AuthError::Source { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, e.to_string()).with_field("source_system")
            }
        }
    }
}

impl From<crate::api::ratelimit::Limited> for ApiError {
    fn from(e: crate::api::ratelimit::Limited) -> ApiError {
        let mut out =
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string()).with_field("source_system");
        out.retry_after_s = Some(e.retry_after_s());
        out
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> ApiError {
        match e {
            StorageError::Poisoned(_) | StorageError::Closed => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> ApiError {
        match e {
            DbError::Storage(s) => s.into(),
            DbError::Query(QueryError::Invalid { field, reason }) => {
                ApiError::bad_request(field, format!("{field}: {reason}"))
            }
            DbError::Query(QueryError::Storage(s)) => s.into(),
            DbError::Query(QueryError::Index(i)) | DbError::Index(i) => {
                ApiError::internal(i.to_string())
            }
            DbError::TooLarge(invalid) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{}: {}", invalid.field, invalid.reason),
            )
            .with_field(invalid.field),
            DbError::Unavailable(why) => {
                let mut out = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why);
                out.retry_after_s = Some(10);
                out
            }
        }
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> ApiError {
        DbError::Query(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, "{}", self.message);
        }
        let body = match &self.field {
            Some(f) => serde_json::json!({ "error": self.message, "field": f }),
            None => serde_json::json!({ "error": self.message }),
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(s) = self.retry_after_s
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}
