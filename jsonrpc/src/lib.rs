//! A small JSON-RPC 2.0 server and client over stream sockets (Unix and TCP), the protocol of
//! Strata's control sockets (stratad's, the name server's) and of `stratactl`.
//!
//! Framing: one JSON value per line (`\n`-terminated, no embedded newlines — serde_json never
//! writes one), one response line per request; a notification (a request without `id`) gets
//! no response line; a batch (a JSON array of requests) gets one array of responses.
//!
//! Map of the crate:
//! - [`error`]: [`RpcError`], the typed error object with the standard codes
//!   (-32700/-32600/-32601/-32602/-32603) and application codes.
//! - [`message`]: parsing a request line into requests (pure: the fuzz target's entry) and
//!   encoding responses.
//! - [`methods`]: [`Methods`], a daemon's method table (name → handler with serde-typed
//!   params and result), `rpc_get_methods` built in, and the handling of one request line.
//! - [`stream`]: the socket abstraction ([`Stream`]) and line reading/writing under absolute
//!   deadlines and a byte bound (a slow or silent peer cannot hold a thread forever).
//! - [`server`]: serving connections from a listener: [`Limits`], a bounded number of
//!   connection threads.
//! - [`client`]: [`Client`], one connection making calls with a deadline each.
//!
//! Method names follow one scheme, SPDK-style `object_verb` (e.g. `datastore_disk_create`,
//! `ns_dd_create`); see the daemons for their tables.

pub mod client;
pub mod error;
pub mod message;
pub mod methods;
pub mod server;
pub mod stream;

pub use client::{Client, ClientError, ClientLimits};
pub use error::{ErrorCode, RpcError};
pub use methods::{Methods, NoParams};
pub use server::{Limits, Server};
pub use stream::Stream;
