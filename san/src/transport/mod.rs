//! TCP for the SAN protocols. PLACEHOLDER until the transport lands (branch conn): it has the
//! API stratad calls and refuses to start.

use std::sync::Arc;

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Not built yet.
    #[error("the iSCSI transport is not built yet")]
    NotBuilt,
}

/// The iSCSI server (placeholder).
#[derive(Debug)]
pub struct IscsiServer;

impl IscsiServer {
    /// Refuses: the transport is not built yet.
    pub fn start(
        _registry: Arc<crate::target::Registry>,
        _portals: &[std::net::SocketAddr],
        _reactors: Vec<dataplane::reactor::ReactorLink>,
    ) -> Result<IscsiServer, TransportError> {
        Err(TransportError::NotBuilt)
    }

    /// Stops serving.
    pub fn shutdown(self) {}
}
