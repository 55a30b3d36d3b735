//! The JSON-RPC error object as a typed error: the five standard codes of the specification
//! and the application codes a daemon defines (JSON-RPC reserves -32000..=-32099 for
//! implementation-defined server errors; any other integer is free for applications).

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Invalid JSON was received.
pub const PARSE_ERROR: i64 = -32700;
/// The JSON sent is not a valid request object.
pub const INVALID_REQUEST: i64 = -32600;
/// The method does not exist.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// Invalid method parameters.
pub const INVALID_PARAMS: i64 = -32602;
/// Internal JSON-RPC error (e.g. a result that cannot be encoded, a handler that panicked).
pub const INTERNAL_ERROR: i64 = -32603;

/// Which error an [`RpcError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// -32700.
    ParseError,
    /// -32600.
    InvalidRequest,
    /// -32601.
    MethodNotFound,
    /// -32602.
    InvalidParams,
    /// -32603.
    InternalError,
    /// Any other code: defined by the application.
    Application(i64),
}

impl ErrorCode {
    /// The code on the wire.
    pub fn as_i64(self) -> i64 {
        match self {
            ErrorCode::ParseError => PARSE_ERROR,
            ErrorCode::InvalidRequest => INVALID_REQUEST,
            ErrorCode::MethodNotFound => METHOD_NOT_FOUND,
            ErrorCode::InvalidParams => INVALID_PARAMS,
            ErrorCode::InternalError => INTERNAL_ERROR,
            ErrorCode::Application(c) => c,
        }
    }

    /// The code of a wire value (a standard code is never an `Application` code).
    pub fn from_i64(c: i64) -> ErrorCode {
        match c {
            PARSE_ERROR => ErrorCode::ParseError,
            INVALID_REQUEST => ErrorCode::InvalidRequest,
            METHOD_NOT_FOUND => ErrorCode::MethodNotFound,
            INVALID_PARAMS => ErrorCode::InvalidParams,
            INTERNAL_ERROR => ErrorCode::InternalError,
            c => ErrorCode::Application(c),
        }
    }
}

/// A JSON-RPC error: its code and its message (what the user of a client sees).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct RpcError {
    /// Which error.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
}

impl RpcError {
    /// An error with any code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
        }
    }

    /// -32700: the line is not JSON.
    pub fn parse_error(detail: impl std::fmt::Display) -> RpcError {
        RpcError::new(ErrorCode::ParseError, format!("parse error: {detail}"))
    }

    /// -32600: not a request object.
    pub fn invalid_request(detail: impl std::fmt::Display) -> RpcError {
        RpcError::new(
            ErrorCode::InvalidRequest,
            format!("invalid request: {detail}"),
        )
    }

    /// -32601.
    pub fn method_not_found(method: &str) -> RpcError {
        RpcError::new(
            ErrorCode::MethodNotFound,
            format!("unknown method '{method}'"),
        )
    }

    /// -32602: missing, extra or ill-typed parameters, or values out of range.
    pub fn invalid_params(detail: impl std::fmt::Display) -> RpcError {
        RpcError::new(
            ErrorCode::InvalidParams,
            format!("invalid params: {detail}"),
        )
    }

    /// -32603.
    pub fn internal(detail: impl std::fmt::Display) -> RpcError {
        RpcError::new(
            ErrorCode::InternalError,
            format!("internal error: {detail}"),
        )
    }

    /// An application error: `code` is the daemon's own, `message` is shown as is.
    pub fn application(code: i64, message: impl Into<String>) -> RpcError {
        RpcError::new(ErrorCode::from_i64(code), message)
    }
}

/// The error object as it is on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WireError {
    pub code: i64,
    pub message: String,
}

impl From<&RpcError> for WireError {
    fn from(e: &RpcError) -> Self {
        WireError {
            code: e.code.as_i64(),
            message: e.message.clone(),
        }
    }
}

impl From<WireError> for RpcError {
    fn from(w: WireError) -> Self {
        RpcError::new(ErrorCode::from_i64(w.code), w.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_standard_codes_are_never_application_codes() {
        for c in [
            ErrorCode::ParseError,
            ErrorCode::InvalidRequest,
            ErrorCode::MethodNotFound,
            ErrorCode::InvalidParams,
            ErrorCode::InternalError,
            ErrorCode::Application(-32000),
            ErrorCode::Application(7),
        ] {
            assert_eq!(ErrorCode::from_i64(c.as_i64()), c);
        }
        assert_eq!(
            RpcError::application(-32601, "x").code,
            ErrorCode::MethodNotFound
        );
        let e = RpcError::invalid_params("missing field `name`");
        assert_eq!(e.to_string(), "invalid params: missing field `name`");
        assert_eq!(RpcError::from(WireError::from(&e)), e);
    }
}
