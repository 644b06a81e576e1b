//! [`PeerNet`]: an IP network a peer may connect from (a DTU listener's `allow` list).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IPv4 or IPv6 network, `address/prefix`; a bare address is the host itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerNet {
    network: IpAddr,
    prefix: u8,
}

impl PeerNet {
    /// Whether `ip` lies in this network. IPv4-mapped IPv6 peers (a listener bound to
    /// `[::]`) are compared as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask(u128::from(u32::from(ip)), self.prefix, 32) == u128::from(u32::from(net))
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask(u128::from(ip), self.prefix, 128) == u128::from(net)
            }
            _ => false,
        }
    }
}

/// `bits` with everything after the first `prefix` of `width` bits cleared.
fn mask(bits: u128, prefix: u8, width: u8) -> u128 {
    let host = u32::from(width - prefix);
    if host >= 128 {
        0
    } else {
        bits >> host << host
    }
}

impl FromStr for PeerNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let example = "e.g. \"10.0.0.0/8\", \"192.168.1.7/32\" or \"fd00::/8\"";
        let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP network; {example}"))?;
        let width = if network.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            width
        } else {
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= width)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={width}; {example}"))?
        };
        let net = PeerNet {
            network: network.to_canonical(),
            prefix,
        };
        if !net.contains(network) {
            let bits = match network {
                IpAddr::V4(a) => IpAddr::V4(
                    u32::try_from(mask(u128::from(u32::from(a)), prefix, 32))
                        .expect("invariant: a masked u32 fits")
                        .into(),
                ),
                IpAddr::V6(a) => IpAddr::V6(mask(u128::from(a), prefix, 128).into()),
            };
            return Err(format!(
                "{s:?} has host bits set; the network is \"{bits}/{prefix}\""
            ));
        }
        Ok(net)
    }
}

impl fmt::Display for PeerNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> PeerNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn membership() {
        let cases = [
            ("10.0.0.0/8", "10.200.1.2", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("192.168.1.7/32", "192.168.1.7", true),
            ("192.168.1.7", "192.168.1.8", false),
            ("0.0.0.0/0", "203.0.113.9", true),
            ("10.0.0.0/8", "::ffff:10.1.2.3", true),
            ("127.0.0.0/8", "::1", false),
            ("fd00::/8", "fd12::1", true),
            ("fd00::/8", "fe80::1", false),
            ("::/0", "2001:db8::1", true),
        ];
        for (n, a, want) in cases {
            assert_eq!(net(n).contains(ip(a)), want, "{n} ∋ {a}");
        }
    }

    #[test]
    fn bad_networks_say_why() {
        let cases = [
            ("10.0.0.0/33", "prefix length must be 0..=32"),
            ("10.0.0.1/8", "the network is \"10.0.0.0/8\""),
            ("fd00::1/8", "the network is \"fd00::/8\""),
            ("10.0.0/8", "is not an IP network"),
            ("", "is not an IP network"),
        ];
        for (s, want) in cases {
            let e = s.parse::<PeerNet>().unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
        assert_eq!(net("192.168.1.7").to_string(), "192.168.1.7/32");
    }
}
