//! Where an outbound call to a URL that a *client* supplied may go (server-side request forgery
//! protection).
//!
//! Owns: the classifier of IP addresses that are not on the public Internet
//! ([`non_public_reason`]), and [`PublicOnlyResolver`], a reqwest DNS resolver that refuses a
//! host unless every address it resolves to is public. Because reqwest connects only to the
//! addresses the resolver returns, the check and the connection use the same answer: a DNS
//! rebind between a check and the connect cannot slip a private address in.
//!
//! May touch: the system resolver (`tokio::net::lookup_host`). Nothing else.
//!
//! IP literals in a URL never reach a resolver (hyper connects to them directly), so callers
//! check those with [`non_public_reason`] themselves before sending.

use std::error::Error as StdError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// A host was refused because it is, or resolves to, an address that is not public.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{host} resolves to {ip}, a {reason} address; only public addresses are allowed")]
pub struct ForbiddenAddress {
    pub host: String,
    pub ip: IpAddr,
    pub reason: &'static str,
}

/// Why `ip` is not a public unicast address, or `None` when it is.
///
/// IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`) and
/// 6to4 (`2002::/16`) IPv6 addresses are judged by the IPv4 address they carry, since that is
/// where a packet to them ends up.
pub fn non_public_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    let reason = match (a, b, c) {
        (0, _, _) => "unspecified (0.0.0.0/8)",
        (10, _, _) => "private (10.0.0.0/8)",
        (100, 64..=127, _) => "shared/CGNAT (100.64.0.0/10)",
        (127, _, _) => "loopback (127.0.0.0/8)",
        (169, 254, _) => "link-local (169.254.0.0/16)",
        (172, 16..=31, _) => "private (172.16.0.0/12)",
        (192, 0, 0) => "IETF protocol assignment (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation (TEST-NET)",
        (192, 88, 99) => "6to4 relay anycast (192.88.99.0/24)",
        (192, 168, _) => "private (192.168.0.0/16)",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, _, _) => "multicast (224.0.0.0/4)",
        (240..=255, _, _) => "reserved or broadcast (240.0.0.0/4)",
        _ => return None,
    };
    Some(reason)
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified (::)");
    }
    if ip.is_loopback() {
        return Some("loopback (::1)");
    }
    // Forms that carry an IPv4 address: judge the IPv4 address.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_reason(v4);
    }
    if seg[..6] == [0; 6] {
        // IPv4-compatible (deprecated), ::a.b.c.d
        return v4_reason(Ipv4Addr::from(embedded_low_v4(&seg)));
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64 well-known prefix 64:ff9b::/96
        return v4_reason(Ipv4Addr::from(embedded_low_v4(&seg)));
    }
    if seg[0] == 0x2002 {
        // 6to4: 2002:AABB:CCDD::/48 routes to AA.BB.CC.DD
        let v4 = (u32::from(seg[1]) << 16) | u32::from(seg[2]);
        return v4_reason(Ipv4Addr::from(v4)).map(|_| "6to4 carrying a non-public IPv4 address");
    }
    let reason = match seg[0] {
        0x0064 if seg[1] == 0xff9b && seg[2] == 1 => "local-use NAT64 (64:ff9b:1::/48)",
        0x0100 if seg[1..4] == [0, 0, 0] => "discard-only (100::/64)",
        0x2001 if seg[1] == 0x0db8 => "documentation (2001:db8::/32)",
        // 2001::/23: IETF protocol assignments (Teredo, ORCHID, AS112, …), never a web server.
        0x2001 if seg[1] < 0x0200 => "IETF protocol assignment (2001::/23)",
        0x3fff if seg[1] < 0x1000 => "documentation (3fff::/20)",
        s if s & 0xfe00 == 0xfc00 => "unique local (fc00::/7)",
        s if s & 0xffc0 == 0xfe80 => "link-local (fe80::/10)",
        s if s & 0xffc0 == 0xfec0 => "site-local (fec0::/10)",
        s if s & 0xff00 == 0xff00 => "multicast (ff00::/8)",
        // Everything outside 2000::/3 is unassigned or special: allow only global unicast.
        s if s & 0xe000 != 0x2000 => "not global unicast (outside 2000::/3)",
        _ => return None,
    };
    Some(reason)
}

fn embedded_low_v4(seg: &[u16; 8]) -> u32 {
    (u32::from(seg[6]) << 16) | u32::from(seg[7])
}

/// Why the host of `url` is refused when it is an IP literal that is not public (literals
/// never reach the resolver); `None` for public literals and host names.
pub fn literal_host_reason(url: &reqwest::Url) -> Option<&'static str> {
    let ip = match url.host()? {
        url::Host::Ipv4(ip) => IpAddr::V4(ip),
        url::Host::Ipv6(ip) => IpAddr::V6(ip),
        url::Host::Domain(_) => return None,
    };
    non_public_reason(ip)
}

/// A reqwest DNS resolver that resolves with the system resolver and fails with
/// [`ForbiddenAddress`] unless every address is public. Refusing the whole host (rather than
/// filtering out the bad addresses) is deliberate: a host that mixes private and public
/// addresses is misconfigured or hostile either way.
#[derive(Clone, Copy, Debug, Default)]
pub struct PublicOnlyResolver;

impl Resolve for PublicOnlyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: hyper puts the URL's port on the addresses it gets back.
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            check_resolved(&host, &addrs)?;
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// Every address of `host` must be public.
pub fn check_resolved(host: &str, addrs: &[SocketAddr]) -> Result<(), ForbiddenAddress> {
    for addr in addrs {
        if let Some(reason) = non_public_reason(addr.ip()) {
            return Err(ForbiddenAddress {
                host: host.to_owned(),
                ip: addr.ip(),
                reason,
            });
        }
    }
    Ok(())
}

/// The [`ForbiddenAddress`] somewhere in an error's source chain (reqwest wraps the resolver's
/// error in its connect error), so the caller can tell "refused by policy" from "unreachable".
pub fn forbidden_in_chain<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a ForbiddenAddress> {
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<ForbiddenAddress>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(text: &str) -> Option<&'static str> {
        non_public_reason(text.parse().expect("test address"))
    }

    #[test]
    fn ipv4_non_public_ranges_are_refused() {
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.255.0.9",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(reason(ip).is_some(), "{ip} should be refused");
        }
    }

    #[test]
    fn ipv4_public_addresses_pass() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "192.167.1.1",
            "192.169.0.1",
            "198.17.0.1",
            "198.20.0.1",
            "142.250.74.10",
            "223.255.255.255",
        ] {
            assert_eq!(reason(ip), None, "{ip} should pass");
        }
    }

    #[test]
    fn ipv6_non_public_ranges_are_refused() {
        for ip in [
            "::",
            "::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "fc00::1",
            "fd12:3456:789a::1",
            "ff02::1",
            "ff0e::1",
            "2001:db8::1",
            "2001::1",
            "2001:1ff::1",
            "3fff::1",
            "100::1",
            "64:ff9b:1::1",
            "::2",
            "1234::1",
            "4000::1",
            "e000::1",
        ] {
            assert!(reason(ip).is_some(), "{ip} should be refused");
        }
    }

    #[test]
    fn ipv6_public_addresses_pass() {
        for ip in [
            "2606:4700:4700::1111",
            "2a00:1450:4001:82b::200a",
            "2001:4860:4860::8888",
            "2400:cb00::1",
        ] {
            assert_eq!(reason(ip), None, "{ip} should pass");
        }
    }

    #[test]
    fn ipv6_forms_carrying_ipv4_are_judged_by_the_ipv4_address() {
        // v4-mapped
        assert!(reason("::ffff:127.0.0.1").is_some());
        assert!(reason("::ffff:10.1.2.3").is_some());
        assert!(reason("::ffff:169.254.169.254").is_some());
        assert_eq!(reason("::ffff:8.8.8.8"), None);
        // v4-compatible (deprecated)
        assert!(reason("::127.0.0.1").is_some());
        assert!(reason("::192.168.0.1").is_some());
        // NAT64
        assert!(reason("64:ff9b::10.0.0.1").is_some());
        assert!(reason("64:ff9b::7f00:1").is_some());
        assert_eq!(reason("64:ff9b::8.8.8.8"), None);
        // 6to4
        assert!(reason("2002:7f00:1::1").is_some());
        assert!(reason("2002:c0a8:101::1").is_some());
        assert_eq!(reason("2002:808:808::1"), None);
    }

    #[test]
    fn a_host_is_refused_when_any_address_is_not_public() {
        let public: SocketAddr = "8.8.8.8:0".parse().expect("addr");
        let private: SocketAddr = "[fd00::1]:0".parse().expect("addr");
        assert!(check_resolved("h", &[public]).is_ok());
        let err = check_resolved("h", &[public, private]).expect_err("mixed must be refused");
        assert_eq!(err.ip, private.ip());
        assert!(err.to_string().contains("unique local"), "{err}");
    }

    #[tokio::test]
    async fn the_resolver_refuses_localhost() {
        let name: Name = "localhost".parse().expect("name");
        let err = match PublicOnlyResolver.resolve(name).await {
            Ok(addrs) => panic!("localhost resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(err) => err,
        };
        let forbidden = forbidden_in_chain(err.as_ref()).expect("a ForbiddenAddress");
        assert!(forbidden.ip.is_loopback(), "{forbidden}");
    }
}
