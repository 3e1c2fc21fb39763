//! The client's address behind trusted proxies: `server.trusted_proxies` (CIDRs) and the one
//! header they set (`server.forwarded_header`: `X-Forwarded-For`, or RFC 7239 `Forwarded`).
//!
//! For a request whose TCP peer is a trusted proxy, the client is the rightmost hop of that
//! header that is not itself a trusted proxy (everything left of it could have been written by
//! the client). From any other peer the headers are ignored: the client is the peer. A header
//! that does not parse, or a client hop that is `unknown` or obfuscated (`_hidden`), leaves
//! the peer as the client address — the request is then counted with the proxy's, never with
//! an address someone chose.
//!
//! Only the configured header is read: a proxy that appends to `X-Forwarded-For` passes a
//! client's own `Forwarded` header through untouched, and reading it would let the client pick
//! its address.
//!
//! Owns: parsing of CIDRs and of the two headers. Touches nothing (pure functions).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};

/// Which header trusted proxies set (`server.forwarded_header`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (nginx, HAProxy, cloud load balancers).
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client;proto=https, for="[2001:db8::1]:4711"`.
    #[serde(rename = "forwarded")]
    Forwarded,
}

/// One network in CIDR notation; a bare address is a /32 (IPv4) or /128 (IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network = IpAddr::from_str(address)
            .map_err(|_| format!("{text:?} is not an IP address or CIDR (10.0.0.0/8, ::1)"))?
            .to_canonical();
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
        };
        let cidr = Self { network, prefix };
        if cidr.mask(network) != network {
            // "10.0.0.1/8" is most likely a typo that would trust a whole network.
            return Err(format!(
                "{text:?} has bits set after the prefix: write the network ({}/{prefix}) or one address ({network})",
                cidr.mask(network)
            ));
        }
        Ok(cidr)
    }
}

impl Cidr {
    fn mask(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4);
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(bits & mask))
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(bits & mask))
            }
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.network.is_ipv4() && self.mask(ip) == self.network
    }
}

/// `server.trusted_proxies` and `server.forwarded_header`, ready for requests.
#[derive(Clone, Debug, Default)]
pub struct ProxyTrust {
    networks: Vec<Cidr>,
    header: ForwardedHeader,
}

impl ProxyTrust {
    /// Parses every entry; the error names the first bad one.
    pub fn new(networks: &[String], header: ForwardedHeader) -> Result<Self, String> {
        let networks = networks
            .iter()
            .map(|n| n.parse())
            .collect::<Result<_, _>>()?;
        Ok(Self { networks, header })
    }

    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|n| n.contains(ip))
    }

    /// The client's address for a request from `peer` with `headers` (see the module header).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.is_trusted(peer) {
            return peer;
        }
        let hops = match self.header {
            ForwardedHeader::XForwardedFor => x_forwarded_for(headers),
            ForwardedHeader::Forwarded => forwarded(headers),
        };
        let Some(hops) = hops else {
            return peer;
        };
        let mut leftmost = None;
        for hop in hops.iter().rev() {
            match hop {
                Some(ip) if self.is_trusted(*ip) => leftmost = Some(*ip),
                Some(ip) => return *ip,
                // The client hop hides its address: count the request with the proxy.
                None => return peer,
            }
        }
        // Every hop is a trusted proxy: the first one is where the request came from.
        leftmost.unwrap_or(peer)
    }
}

/// A hop's address, or `None` for `unknown` and obfuscated identifiers.
pub type Hop = Option<IpAddr>;

/// The values of every `name` header joined as one list (RFC 9110: the same as one header
/// with the values separated by commas), or `None` when absent or not visible ASCII.
fn joined(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut joined = String::new();
    for value in headers.get_all(name) {
        if !joined.is_empty() {
            joined.push(',');
        }
        joined.push_str(value.to_str().ok()?);
    }
    (!joined.is_empty()).then_some(joined)
}

/// The hops of `X-Forwarded-For`, left (client) to right (nearest proxy); `None` when absent
/// or malformed (the whole header is then ignored).
pub fn x_forwarded_for(headers: &HeaderMap) -> Option<Vec<Hop>> {
    parse_x_forwarded_for(&joined(headers, "x-forwarded-for")?)
}

pub fn parse_x_forwarded_for(value: &str) -> Option<Vec<Hop>> {
    value
        .split(',')
        .map(|entry| xff_hop(entry.trim()))
        .collect()
}

/// `192.0.2.1`, `2001:db8::1`, with a port (`192.0.2.1:80`, `[2001:db8::1]:80`), bracketed
/// (`[2001:db8::1]`), `unknown` or an obfuscated `_id`.
fn xff_hop(entry: &str) -> Option<Hop> {
    if let Ok(ip) = IpAddr::from_str(entry) {
        return Some(Some(ip.to_canonical()));
    }
    if let Ok(socket) = SocketAddr::from_str(entry) {
        return Some(Some(socket.ip().to_canonical()));
    }
    if let Some(inner) = entry.strip_prefix('[').and_then(|e| e.strip_suffix(']'))
        && let Ok(ip) = Ipv6Addr::from_str(inner)
    {
        return Some(Some(IpAddr::V6(ip).to_canonical()));
    }
    if entry.eq_ignore_ascii_case("unknown") || is_obfuscated(entry) {
        return Some(None);
    }
    None
}

/// RFC 7239 `obfnode` / `obfport`: `_` and then letters, digits, `.`, `_`, `-`.
fn is_obfuscated(text: &str) -> bool {
    text.strip_prefix('_').is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    })
}

/// The `for=` hops of `Forwarded`, one per element, left to right; an element without `for`
/// is an undisclosed hop. `None` when absent or malformed.
pub fn forwarded(headers: &HeaderMap) -> Option<Vec<Hop>> {
    parse_forwarded(&joined(headers, "forwarded")?)
}

pub fn parse_forwarded(value: &str) -> Option<Vec<Hop>> {
    let mut hops = Vec::new();
    let mut rest = value.as_bytes();
    loop {
        // One element: pairs separated by `;`.
        let mut hop: Option<Hop> = None;
        loop {
            rest = skip_ows(rest);
            let name_len = rest.iter().take_while(|b| is_tchar(**b)).count();
            if name_len == 0 {
                return None;
            }
            let (name, after) = rest.split_at(name_len);
            let after = after.strip_prefix(b"=")?;
            let (pair_value, after) = forwarded_value(after)?;
            if name.eq_ignore_ascii_case(b"for") {
                if hop.is_some() {
                    return None; // `for` twice in one element
                }
                hop = Some(forwarded_node(&pair_value)?);
            }
            rest = skip_ows(after);
            match rest.first() {
                Some(b';') => rest = &rest[1..],
                _ => break,
            }
        }
        hops.push(hop.unwrap_or(None));
        match rest.first() {
            None => return Some(hops),
            Some(b',') => rest = &rest[1..],
            Some(_) => return None,
        }
    }
}

fn skip_ows(bytes: &[u8]) -> &[u8] {
    let spaces = bytes
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t'))
        .count();
    &bytes[spaces..]
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A `token` or a `quoted-string` (with `\` escapes); returns the value and what follows.
fn forwarded_value(bytes: &[u8]) -> Option<(String, &[u8])> {
    if let Some(quoted) = bytes.strip_prefix(b"\"") {
        let mut value = Vec::new();
        let mut index = 0;
        while index < quoted.len() {
            match quoted[index] {
                b'"' => {
                    let text = String::from_utf8(value).ok()?;
                    return Some((text, &quoted[index + 1..]));
                }
                b'\\' => {
                    value.push(*quoted.get(index + 1)?);
                    index += 2;
                }
                b => {
                    value.push(b);
                    index += 1;
                }
            }
        }
        None // no closing quote
    } else {
        let len = bytes.iter().take_while(|b| is_tchar(**b)).count();
        if len == 0 {
            return None;
        }
        let (token, rest) = bytes.split_at(len);
        Some((String::from_utf8(token.to_vec()).ok()?, rest))
    }
}

/// RFC 7239 `node`: `IPv4`, `"[IPv6]"`, `unknown` or `_obfuscated`, each with an optional
/// `:port` (digits or `_obfuscated`).
fn forwarded_node(node: &str) -> Option<Hop> {
    let (name, port) = if let Some(v6) = node.strip_prefix('[') {
        let (inner, after) = v6.split_once(']')?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':')?),
        };
        let ip = Ipv6Addr::from_str(inner).ok()?;
        (Some(IpAddr::V6(ip).to_canonical()), port)
    } else {
        let (name, port) = match node.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (node, None),
        };
        let ip = if name.eq_ignore_ascii_case("unknown") || is_obfuscated(name) {
            None
        } else {
            Some(IpAddr::V4(Ipv4Addr::from_str(name).ok()?))
        };
        (ip, port)
    };
    if let Some(port) = port {
        let digits = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| p <= 65_535);
        if !digits && !is_obfuscated(port) {
            return None;
        }
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn cidrs() {
        let net: Cidr = "10.0.0.0/8".parse().expect("cidr");
        assert!(net.contains(ip("10.1.2.3")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(
            net.contains(ip("::ffff:10.9.9.9")),
            "IPv4-mapped peers match"
        );
        let one: Cidr = "127.0.0.2".parse().expect("address");
        assert!(one.contains(ip("127.0.0.2")) && !one.contains(ip("127.0.0.3")));
        let v6: Cidr = "2001:db8::/32".parse().expect("v6");
        assert!(v6.contains(ip("2001:db8:ffff::1")) && !v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        let all: Cidr = "0.0.0.0/0".parse().expect("all");
        assert!(all.contains(ip("203.0.113.9")));
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "::/129",
            "nope",
            "10.0.0.0/x",
            "",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn x_forwarded_for_entries() {
        let hops = parse_x_forwarded_for(
            "203.0.113.7, 2001:db8::1,198.51.100.2:8080 , [2001:db8::2]:443, [2001:db8::3], unknown, _hidden",
        )
        .expect("parses");
        assert_eq!(
            hops,
            vec![
                Some(ip("203.0.113.7")),
                Some(ip("2001:db8::1")),
                Some(ip("198.51.100.2")),
                Some(ip("2001:db8::2")),
                Some(ip("2001:db8::3")),
                None,
                None,
            ]
        );
        assert_eq!(
            parse_x_forwarded_for("::ffff:192.0.2.1"),
            Some(vec![Some(ip("192.0.2.1"))]),
            "mapped addresses are the IPv4 address"
        );
        for bad in [
            "",
            "1.2.3.4,",
            "1.2.3.4,,5.6.7.8",
            "example.com",
            "1.2.3.4 5.6.7.8",
            "_",
            "300.1.1.1",
        ] {
            assert_eq!(parse_x_forwarded_for(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn forwarded_elements() {
        let hops = parse_forwarded(
            "for=192.0.2.60;proto=http;by=203.0.113.43, For=\"[2001:db8:cafe::17]:4711\", for=unknown, for=\"_hidden:_port\", proto=https, for=\"198.51.100.1:80\"",
        )
        .expect("parses");
        assert_eq!(
            hops,
            vec![
                Some(ip("192.0.2.60")),
                Some(ip("2001:db8:cafe::17")),
                None,
                None,
                None,
                Some(ip("198.51.100.1")),
            ]
        );
        assert_eq!(
            parse_forwarded("for=\"[2001:db8::1]\" ; proto=https ,for=\"_a\\\"b\""),
            None,
            "an escaped quote in an obfuscated id is not an obfuscated id"
        );
        assert_eq!(
            parse_forwarded("for=\"[2001:db8::1]\" ; proto=https ,for=\"10.0.0.1\""),
            Some(vec![Some(ip("2001:db8::1")), Some(ip("10.0.0.1"))])
        );
        for bad in [
            "",
            "for=",
            "for=[2001:db8::1]",    // IPv6 must be quoted
            "for=\"2001:db8::1\"",  // and bracketed
            "for=\"[2001:db8::1\"", // unclosed bracket
            "for=\"192.0.2.1",      // unclosed quote
            "for=192.0.2.1;for=192.0.2.2",
            "for=192.0.2.1:99999",
            "for=\"192.0.2.1:\"",
            "for=example.com",
            "for=192.0.2.1 for=192.0.2.2",
            "=192.0.2.1",
            "for=192.0.2.1,",
            "for=_hidden:_port", // a `:` needs quotes
        ] {
            assert_eq!(parse_forwarded(bad), None, "{bad:?}");
        }
    }

    fn headers(name: &str, values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                value.parse().expect("value"),
            );
        }
        map
    }

    #[test]
    fn rightmost_untrusted_hop_from_trusted_peers_only() {
        let trust = ProxyTrust::new(
            &["10.0.0.0/8".into(), "2001:db8:ffff::/48".into()],
            ForwardedHeader::XForwardedFor,
        )
        .expect("trust");
        let proxy = ip("10.0.0.5");
        let xff = headers("x-forwarded-for", &["6.6.6.6, 203.0.113.7", "10.0.0.9"]);
        assert_eq!(trust.client_ip(proxy, &xff), ip("203.0.113.7"));
        assert_eq!(
            trust.client_ip(ip("198.51.100.1"), &xff),
            ip("198.51.100.1"),
            "an untrusted peer's header is ignored"
        );
        let all_trusted = headers("x-forwarded-for", &["10.1.1.1, 10.2.2.2"]);
        assert_eq!(trust.client_ip(proxy, &all_trusted), ip("10.1.1.1"));
        let hidden = headers("x-forwarded-for", &["203.0.113.7, unknown"]);
        assert_eq!(trust.client_ip(proxy, &hidden), proxy);
        let garbage = headers("x-forwarded-for", &["203.0.113.7, <script>"]);
        assert_eq!(trust.client_ip(proxy, &garbage), proxy);
        assert_eq!(trust.client_ip(proxy, &HeaderMap::new()), proxy);
        // Only the configured header counts.
        let other = headers("forwarded", &["for=203.0.113.8"]);
        assert_eq!(trust.client_ip(proxy, &other), proxy);
        let mapped = ip("::ffff:10.0.0.5");
        assert_eq!(trust.client_ip(mapped, &xff), ip("203.0.113.7"));

        let trust =
            ProxyTrust::new(&["10.0.0.0/8".into()], ForwardedHeader::Forwarded).expect("trust");
        let fwd = headers(
            "forwarded",
            &[
                "for=6.6.6.6",
                "for=\"[2001:db8::7]:1234\";proto=https, for=10.0.0.7",
            ],
        );
        assert_eq!(trust.client_ip(proxy, &fwd), ip("2001:db8::7"));
        assert_eq!(
            trust.client_ip(proxy, &xff),
            proxy,
            "X-Forwarded-For is not read"
        );
    }
}
