//! [`PolicyStamp`]: the policy a batch was made under, as its envelope header names it.
//!
//! Every version 3 header carries the purpose name and the policy hash side by side; the hub
//! accepts a batch only when its gateway is approved for exactly that pair. Records the gateway
//! raises about itself (store recovery, audit) obey no operator policy: they go out on the audit
//! stream under the built-in [`PolicyStamp::gateway`], which the hub accepts there without
//! approval.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::reading::PurposeName;

/// The purpose name of the built-in stamp for records the gateway raises about itself.
pub const GATEWAY_PURPOSE: &str = "citygate-gateway";

/// The built-in stamp's hash is SHA-256 over these bytes (no terminator).
pub const GATEWAY_POLICY_CONSTANT: &[u8] = b"citygate/v1 gateway records";

/// The purpose and policy hash a batch is sealed under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PolicyStamp {
    pub purpose: PurposeName,
    /// SHA-256 naming the policy (for a gateway flow, `Policy::hash`).
    pub hash: [u8; 32],
}

impl PolicyStamp {
    pub fn new(purpose: PurposeName, hash: [u8; 32]) -> PolicyStamp {
        PolicyStamp { purpose, hash }
    }

    /// The built-in stamp of gateway-raised records: purpose [`GATEWAY_PURPOSE`], hash
    /// SHA-256([`GATEWAY_POLICY_CONSTANT`]).
    pub fn gateway() -> PolicyStamp {
        PolicyStamp {
            purpose: PurposeName::new(GATEWAY_PURPOSE).expect("invariant: a valid purpose name"),
            hash: Sha256::digest(GATEWAY_POLICY_CONSTANT).into(),
        }
    }

    /// Whether this is the built-in gateway stamp.
    pub fn is_gateway(&self) -> bool {
        *self == PolicyStamp::gateway()
    }

    /// The hash as 64 lowercase hex digits, as the hub config and `check` write it.
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }
}

impl fmt::Display for PolicyStamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.purpose, self.hash_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_stamp_is_the_documented_constant() {
        let g = PolicyStamp::gateway();
        assert_eq!(g.purpose.as_str(), "citygate-gateway");
        assert_eq!(
            g.hash_hex(),
            hex::encode(Sha256::digest(b"citygate/v1 gateway records"))
        );
        assert!(g.is_gateway());
        let other = PolicyStamp::new(g.purpose.clone(), [0; 32]);
        assert!(!other.is_gateway());
    }
}
