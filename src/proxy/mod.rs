//! The wire-protocol proxy (work in progress).

use crate::cli::ProxyArgs;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the proxy is not built yet")]
    NotBuilt,
}

pub async fn run(_args: ProxyArgs) -> Result<(), ProxyError> {
    Err(ProxyError::NotBuilt)
}
