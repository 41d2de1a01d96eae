//! Who sent a request. The TCP peer, unless the peer is a trusted proxy:
//! then the address the proxies say they forwarded for, in the one header
//! they are configured to write, read from the right (the hop nearest us)
//! past every trusted proxy. Headers from anyone else, and the other
//! header from anyone, are ignored, so a client cannot choose its own
//! address for the per-address limits.

use std::net::{IpAddr, SocketAddr};

use actix_web::http::header::HeaderMap;

use crate::settings::{ClientAddressHeader, ProxyNetwork};

/// The proxies whose forwarding header is believed, and which header that is.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies {
    networks: Vec<ProxyNetwork>,
    header: ClientAddressHeader,
}

impl TrustedProxies {
    pub fn new(networks: &[ProxyNetwork], header: ClientAddressHeader) -> Self {
        Self {
            networks: networks.to_vec(),
            header,
        }
    }

    /// True when `peer` is one of the trusted proxies.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = canonical(peer);
        self.networks
            .iter()
            .any(|network| network.0.contains(&peer))
    }

    /// The client's address: `peer`, or what a trusted `peer` forwarded for.
    /// A hop that does not parse ends the walk at the proxy that named it.
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let hops = match self.header {
            ClientAddressHeader::XForwardedFor => x_forwarded_for(headers),
            ClientAddressHeader::Forwarded => forwarded_for(headers),
        };
        let mut client = peer;
        for hop in hops.into_iter().rev() {
            match hop {
                Some(address) if self.trusts(client) => client = address,
                _ => break,
            }
        }
        client
    }
}

/// An IPv4 address mapped into IPv6 is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The `for=` of every element of every `Forwarded` header, in order
/// (RFC 7239); `None` for one that is not an address (`unknown`, an
/// obfuscated name).
fn forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all("forwarded")
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                key.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| parse_node(value.trim().trim_matches('"')))
            })
        })
        .collect()
}

/// Every address of every `X-Forwarded-For` header, in order.
fn x_forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all("x-forwarded-for")
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|hop| parse_node(hop.trim()))
        .collect()
}

/// `192.0.2.7`, `192.0.2.7:4711`, `2001:db8::1`, `[2001:db8::1]:4711`.
fn parse_node(node: &str) -> Option<IpAddr> {
    let address = node
        .parse::<IpAddr>()
        .or_else(|_| node.parse::<SocketAddr>().map(|socket| socket.ip()))
        .or_else(|_| node.trim_start_matches('[').trim_end_matches(']').parse())
        .ok()?;
    Some(canonical(address))
}

#[cfg(test)]
mod tests {
    use actix_web::http::header::{HeaderName, HeaderValue};

    use super::*;

    fn proxies(list: &[&str]) -> TrustedProxies {
        proxies_writing(list, ClientAddressHeader::XForwardedFor)
    }

    fn proxies_writing(list: &[&str], header: ClientAddressHeader) -> TrustedProxies {
        let networks: Vec<_> = list.iter().map(|p| p.parse().unwrap()).collect();
        TrustedProxies::new(&networks, header)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_static(name),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let claims = headers(&[("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=5.6.7.8")]);
        assert_eq!(
            trusted.client_address(ip("192.0.2.9"), &claims),
            ip("192.0.2.9")
        );
        assert_eq!(
            TrustedProxies::default().client_address(ip("10.0.0.1"), &claims),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn a_trusted_proxy_names_the_client_and_a_spoofed_left_part_is_skipped() {
        let trusted = proxies(&["10.0.0.0/8", "192.0.2.1"]);
        // The client sent "6.6.6.6" itself; nginx appended its real address.
        let chain = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.5, 10.1.2.3")]);
        assert_eq!(
            trusted.client_address(ip("192.0.2.1"), &chain),
            ip("203.0.113.5")
        );
        let only = headers(&[("x-forwarded-for", "203.0.113.5")]);
        assert_eq!(
            trusted.client_address(ip("10.9.9.9"), &only),
            ip("203.0.113.5")
        );
        // Without a header, the proxy itself is the client.
        assert_eq!(
            trusted.client_address(ip("10.9.9.9"), &HeaderMap::new()),
            ip("10.9.9.9")
        );
    }

    #[test]
    fn only_the_configured_header_is_read_and_forwarded_understands_ports_quotes_and_ipv6() {
        let forged_forwarded = headers(&[
            ("forwarded", "for=203.0.113.66"),
            ("x-forwarded-for", "198.51.100.1"),
        ]);
        // A proxy that writes X-Forwarded-For passes a client's Forwarded on.
        let xff = proxies(&["127.0.0.1"]);
        assert_eq!(
            xff.client_address(ip("127.0.0.1"), &forged_forwarded),
            ip("198.51.100.1")
        );
        let only_forwarded = headers(&[("forwarded", "for=203.0.113.66")]);
        assert_eq!(
            xff.client_address(ip("127.0.0.1"), &only_forwarded),
            ip("127.0.0.1")
        );
        let rfc7239 = proxies_writing(&["::1", "127.0.0.1"], ClientAddressHeader::Forwarded);
        assert_eq!(
            rfc7239.client_address(ip("127.0.0.1"), &forged_forwarded),
            ip("203.0.113.66")
        );
        let only_xff = headers(&[("x-forwarded-for", "198.51.100.1")]);
        assert_eq!(
            rfc7239.client_address(ip("127.0.0.1"), &only_xff),
            ip("127.0.0.1")
        );

        let v6 = headers(&[("forwarded", r#"for="[2001:db8:cafe::17]:4711";proto=https"#)]);
        assert_eq!(
            rfc7239.client_address(ip("::1"), &v6),
            ip("2001:db8:cafe::17")
        );
        let v4 = headers(&[("forwarded", r#"for="198.51.100.2:80", For=127.0.0.1"#)]);
        assert_eq!(
            rfc7239.client_address(ip("127.0.0.1"), &v4),
            ip("198.51.100.2")
        );
        // A mapped peer address is its IPv4 self.
        let mapped = headers(&[("x-forwarded-for", "198.51.100.3")]);
        assert_eq!(
            xff.client_address(ip("::ffff:127.0.0.1"), &mapped),
            ip("198.51.100.3")
        );
    }

    #[test]
    fn a_hop_that_is_not_an_address_stops_at_the_proxy_that_named_it() {
        let rfc7239 = proxies_writing(&["10.0.0.0/8"], ClientAddressHeader::Forwarded);
        let unknown = headers(&[("forwarded", "for=unknown, for=10.0.0.2")]);
        assert_eq!(
            rfc7239.client_address(ip("10.0.0.1"), &unknown),
            ip("10.0.0.2")
        );
        let garbage = headers(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(
            proxies(&["10.0.0.0/8"]).client_address(ip("10.0.0.1"), &garbage),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn proxy_networks_parse_addresses_and_cidrs_and_refuse_the_rest() {
        for good in ["10.0.0.7", "10.0.0.0/8", "fd00::/8", "::1"] {
            assert!(good.parse::<ProxyNetwork>().is_ok(), "{good}");
        }
        for bad in ["10.0.0.0/33", "example.com", ""] {
            assert!(bad.parse::<ProxyNetwork>().is_err(), "{bad}");
        }
    }
}
