//! The error type every API shares, with stable numeric codes.
//!
//! Codes follow the Centrifugo client/server protocol table so that its SDKs and server API
//! clients understand them; HTTP status mapping lives in the server crate.

use crate::store::StoreError;

/// An error with the errors under it, for logs and stored reasons ("error performing TLS
/// handshake: invalid peer certificate: UnknownIssuer"): many library errors show only their
/// own kind. A cause whose text the line already ends with is not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let shown = next.to_string();
        if !text.ends_with(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        cause = next.source();
    }
    text
}

/// Stable, machine-readable error codes (the Centrifugo protocol table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    Internal = 100,
    Unauthorized = 101,
    UnknownChannel = 102,
    PermissionDenied = 103,
    MethodNotFound = 104,
    AlreadySubscribed = 105,
    LimitExceeded = 106,
    BadRequest = 107,
    NotAvailable = 108,
    TokenExpired = 109,
    Expired = 110,
    TooManyRequests = 111,
    UnrecoverablePosition = 112,
}

impl ErrorCode {
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    /// The protocol's canonical message for the code.
    pub fn message(self) -> &'static str {
        match self {
            Self::Internal => "internal server error",
            Self::Unauthorized => "unauthorized",
            Self::UnknownChannel => "unknown channel",
            Self::PermissionDenied => "permission denied",
            Self::MethodNotFound => "method not found",
            Self::AlreadySubscribed => "already subscribed",
            Self::LimitExceeded => "limit exceeded",
            Self::BadRequest => "bad request",
            Self::NotAvailable => "not available",
            Self::TokenExpired => "token expired",
            Self::Expired => "expired",
            Self::TooManyRequests => "too many requests",
            Self::UnrecoverablePosition => "unrecoverable position",
        }
    }
}

/// An error with a stable code and a human-readable detail.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} ({}): {detail}", code.message(), code.as_u32())]
pub struct HeraldError {
    pub code: ErrorCode,
    pub detail: String,
    /// The engine could not be reached: nothing was done, and the same call may succeed
    /// later (HTTP 503; `temporary` in the client protocol).
    pub unavailable: bool,
}

impl HeraldError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
            unavailable: false,
        }
    }

    /// The engine (history, fan-out between nodes) cannot be reached right now.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self {
            unavailable: true,
            ..Self::new(ErrorCode::Internal, detail)
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, detail)
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, detail)
    }

    /// `"<canonical message>: <detail>"`, or just the canonical message when there is no detail.
    pub fn message(&self) -> String {
        if self.detail.is_empty() {
            self.code.message().to_owned()
        } else {
            format!("{}: {}", self.code.message(), self.detail)
        }
    }
}

impl From<StoreError> for HeraldError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::UnrecoverablePosition(detail) => {
                Self::new(ErrorCode::UnrecoverablePosition, detail)
            }
            StoreError::Unavailable(detail) => {
                Self::unavailable(format!("engine unavailable: {detail}"))
            }
            StoreError::Backend(detail) => Self::new(
                ErrorCode::Internal,
                format!("history store error: {detail}"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn the_chain_shows_every_cause_once() {
        let root = Layer("UnknownIssuer", None);
        let middle = Layer(
            "invalid peer certificate: UnknownIssuer",
            Some(Box::new(root)),
        );
        let top = Layer("error performing TLS handshake", Some(Box::new(middle)));
        assert_eq!(
            error_chain(&top),
            "error performing TLS handshake: invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }
}
