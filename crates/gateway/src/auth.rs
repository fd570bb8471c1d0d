//! Authentication: who is calling. For now the master key; virtual keys come later.

use axum::http::HeaderMap;
use secrecy::ExposeSecret;

use crate::config::Config;
use crate::error::ApiError;

/// The caller, as the rest of the pipeline sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `None` when the gateway runs keyless (loopback only).
    pub key_id: Option<String>,
}

/// The bearer key from `Authorization: Bearer ...` or Anthropic-style `x-api-key`.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
}

pub fn authenticate(headers: &HeaderMap, config: &Config) -> Result<Principal, ApiError> {
    let Some(master) = &config.server.master_key else {
        return Ok(Principal { key_id: None });
    };
    match presented_key(headers) {
        None => Err(ApiError::Unauthorized {
            message: "No API key provided. Send it as `Authorization: Bearer <key>`.".into(),
        }),
        Some(key) if constant_time_eq(key.as_bytes(), master.expose_secret().as_bytes()) => {
            Ok(Principal {
                key_id: Some("master".into()),
            })
        }
        Some(_) => Err(ApiError::Unauthorized {
            message: "Incorrect API key provided.".into(),
        }),
    }
}

/// Compare without returning early, so response time does not leak how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn master_key_is_required_when_set() {
        let config = Config::embedded_default(&[("SLUICE_MASTER_KEY", "s3cret")]).unwrap();
        let mut h = HeaderMap::new();
        assert!(matches!(
            authenticate(&h, &config),
            Err(ApiError::Unauthorized { .. })
        ));
        h.insert("authorization", "Bearer wrong".parse().unwrap());
        assert!(authenticate(&h, &config).is_err());
        h.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert_eq!(
            authenticate(&h, &config).unwrap().key_id.as_deref(),
            Some("master")
        );
        let open = Config::embedded_default(&[("X", "y")]).unwrap();
        assert_eq!(authenticate(&HeaderMap::new(), &open).unwrap().key_id, None);
    }
}
