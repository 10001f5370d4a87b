//! Who may open a WebSocket: the client's address (through trusted proxies only), the
//! per-address connect rate, and the browser `Origin`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;

use axum::http::{HeaderMap, header};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;

use crate::config::ServerConfig;

/// `10.0.0.0/8`, `2001:db8::/32`, or a single address.
pub fn parse_cidr(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// One entry of `server.allowed_origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPattern {
    Any,
    /// `scheme://host[:port]`, lower case.
    Exact(String),
    /// `https://*.example.com[:port]`: any subdomain of the suffix (not the suffix itself).
    Subdomains {
        scheme: String,
        /// `.example.com`
        suffix: String,
        port: Option<u16>,
    },
}

/// `scheme://host[:port]` split into its parts; `None` when it is not an origin.
fn split_origin(origin: &str) -> Option<(&str, &str, Option<u16>)> {
    let (scheme, rest) = origin.split_once("://")?;
    if !matches!(scheme, "http" | "https") || rest.is_empty() || rest.contains(['/', '?', '#', '@'])
    {
        return None;
    }
    let (host, port) = match rest.rsplit_once(':') {
        // `[::1]:8080` or `host:8080`; a bare `[::1]` has its last colon inside the brackets.
        Some((host, port)) if !port.contains(']') => (host, Some(port.parse::<u16>().ok()?)),
        _ => (rest, None),
    };
    (!host.is_empty()).then_some((scheme, host, port))
}

impl OriginPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim().to_ascii_lowercase();
        if text == "*" {
            return Ok(OriginPattern::Any);
        }
        let Some((scheme, host, port)) = split_origin(&text) else {
            return Err(format!(
                "`{text}` is not an origin (`https://app.example.com`, `https://*.example.com` or `*`)"
            ));
        };
        if let Some(suffix) = host.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains('*') {
                return Err(format!("`{text}`: a wildcard is `*.` before a domain"));
            }
            return Ok(OriginPattern::Subdomains {
                scheme: scheme.to_string(),
                suffix: format!(".{suffix}"),
                port,
            });
        }
        if host.contains('*') {
            return Err(format!(
                "`{text}`: `*` may only stand first (`*.example.com`)"
            ));
        }
        Ok(OriginPattern::Exact(text))
    }

    fn matches(&self, origin: &str) -> bool {
        match self {
            OriginPattern::Any => true,
            OriginPattern::Exact(exact) => exact == origin,
            OriginPattern::Subdomains {
                scheme,
                suffix,
                port,
            } => split_origin(origin).is_some_and(|(s, host, p)| {
                s == scheme && host.len() > suffix.len() && host.ends_with(suffix) && p == *port
            }),
        }
    }
}

/// Why an upgrade was refused before it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Too many upgrades from one address (HTTP 429).
    ConnectRate,
    /// A browser page of an origin that is not allowed (HTTP 403).
    Origin,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::ConnectRate => "connect_rate",
            Refused::Origin => "origin",
        }
    }
}

/// The admission checks of the public listener, built once from the config.
pub struct Admission {
    trusted_proxies: Vec<IpNet>,
    origins: Vec<OriginPattern>,
    connect_rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl Admission {
    pub fn new(config: &ServerConfig) -> Self {
        let connect_rate = NonZeroU32::new(config.connect_rate_per_ip).map(|rate| {
            let burst = NonZeroU32::new(config.connect_burst_per_ip).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            // Both lists were checked by `Config::validate`.
            trusted_proxies: config
                .trusted_proxies
                .iter()
                .filter_map(|c| parse_cidr(c))
                .collect(),
            origins: config
                .allowed_origins
                .iter()
                .filter_map(|o| OriginPattern::parse(o).ok())
                .collect(),
            connect_rate,
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: the peer, or, when the peer is a trusted proxy, the nearest
    /// address in `Forwarded` (else `X-Forwarded-For`) that is not a trusted proxy itself.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer.ip());
        if !self.is_trusted(peer) {
            return peer;
        }
        let forwarded: Vec<IpAddr> = if headers.contains_key(header::FORWARDED) {
            headers
                .get_all(header::FORWARDED)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(forwarded_for)
                .collect()
        } else {
            headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|a| parse_node(a.trim()))
                .collect()
        };
        // Right to left: each trusted hop vouches for the one before it.
        let mut client = peer;
        for ip in forwarded.into_iter().rev() {
            client = canonical(ip);
            if !self.is_trusted(client) {
                break;
            }
        }
        client
    }

    /// Checks the connect rate of `client` and the browser origin of the request.
    pub fn check(&self, client: IpAddr, headers: &HeaderMap) -> Result<(), Refused> {
        if !self.origin_allowed(headers) {
            return Err(Refused::Origin);
        }
        if let Some(limiter) = &self.connect_rate
            && limiter.check_key(&rate_key(client)).is_err()
        {
            return Err(Refused::ConnectRate);
        }
        Ok(())
    }

    fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return true; // not a browser
        };
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let origin = origin.trim().to_ascii_lowercase();
        if self.origins.is_empty() {
            // Same origin only: the page was served by the host it connects to.
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_ascii_lowercase);
            return match (split_origin(&origin), host) {
                (Some((scheme, host, port)), Some(expected)) => {
                    let default_port = if scheme == "https" { 443 } else { 80 };
                    let (want_host, want_port) = match expected.rsplit_once(':') {
                        Some((h, p)) if !p.contains(']') => (h, p.parse().ok()),
                        _ => (expected.as_str(), Some(default_port)),
                    };
                    host == want_host && port.unwrap_or(default_port) == want_port.unwrap_or(0)
                }
                _ => false,
            };
        }
        self.origins.iter().any(|p| p.matches(&origin))
    }

    /// Forgets addresses whose bucket is full again, so the table stays small.
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.connect_rate {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// IPv4-mapped IPv6 addresses count as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One IPv6 client usually holds a whole /64: rate it as one.
fn rate_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// The `for=` address of one `Forwarded` element (RFC 7239).
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("for")
            .then(|| parse_node(value.trim().trim_matches('"')))
            .flatten()
    })
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]` or `[2001:db8::1]:80`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    node.parse::<SocketAddr>().ok().map(|s| s.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn config(origins: &[&str], proxies: &[&str]) -> ServerConfig {
        ServerConfig {
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            trusted_proxies: proxies.iter().map(|s| s.to_string()).collect(),
            connect_rate_per_ip: 2,
            connect_burst_per_ip: 2,
            ..ServerConfig::default()
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn origin_patterns() {
        let a = Admission::new(&config(
            &["https://app.example.com", "https://*.example.org:8443"],
            &[],
        ));
        let ok = |o: &str| a.origin_allowed(&headers(&[("origin", o), ("host", "gw:8080")]));
        assert!(ok("https://app.example.com"));
        assert!(ok("HTTPS://APP.EXAMPLE.COM"));
        assert!(!ok("http://app.example.com"));
        assert!(!ok("https://app.example.com.evil.net"));
        assert!(ok("https://a.b.example.org:8443"));
        assert!(!ok("https://example.org:8443"));
        assert!(!ok("https://a.example.org"));
        assert!(!ok("https://evilexample.org:8443"));
        assert!(!ok("null"));
        assert!(
            a.origin_allowed(&headers(&[("host", "gw")])),
            "no Origin: not a browser"
        );
        assert!(OriginPattern::parse("https://a.com/path").is_err());
        assert!(OriginPattern::parse("ftp://a.com").is_err());
        assert!(OriginPattern::parse("https://a.*.com").is_err());
        assert_eq!(OriginPattern::parse("*"), Ok(OriginPattern::Any));
    }

    #[test]
    fn same_origin_by_default() {
        let a = Admission::new(&config(&[], &[]));
        let ok = |o: &str, host: &str| a.origin_allowed(&headers(&[("origin", o), ("host", host)]));
        assert!(ok("http://gw.example.com", "gw.example.com"));
        assert!(ok("https://gw.example.com", "gw.example.com:443"));
        assert!(ok("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(!ok("http://127.0.0.1:8081", "127.0.0.1:8080"));
        assert!(!ok("https://evil.com", "gw.example.com"));
    }

    #[test]
    fn client_address_through_trusted_proxies_only() {
        let a = Admission::new(&config(&[], &["10.0.0.0/8", "192.168.1.1"]));
        let proxy: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let stranger: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        let xff = headers(&[("x-forwarded-for", "1.1.1.1, 198.51.100.7, 10.9.9.9")]);
        assert_eq!(
            a.client_ip(proxy, &xff),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            a.client_ip(stranger, &xff),
            stranger.ip(),
            "untrusted peer: header ignored"
        );
        let fwd = headers(&[(
            "forwarded",
            "for=\"[2001:db8::1]:4711\";proto=https, for=192.168.1.1",
        )]);
        assert_eq!(
            a.client_ip(proxy, &fwd),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        let garbage = headers(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(a.client_ip(proxy, &garbage), proxy.ip());
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert!(parse_cidr("::1").is_some());
    }

    #[test]
    fn connect_rate_per_address() {
        let a = Admission::new(&config(&["*"], &[]));
        let h = HeaderMap::new();
        let one: IpAddr = "198.51.100.1".parse().unwrap();
        let two: IpAddr = "198.51.100.2".parse().unwrap();
        assert!(a.check(one, &h).is_ok());
        assert!(a.check(one, &h).is_ok());
        assert_eq!(a.check(one, &h), Err(Refused::ConnectRate));
        assert!(
            a.check(two, &h).is_ok(),
            "another address has its own bucket"
        );
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2::2".parse().unwrap();
        assert!(a.check(v6a, &h).is_ok());
        assert!(a.check(v6b, &h).is_ok());
        assert_eq!(
            a.check(v6a, &h),
            Err(Refused::ConnectRate),
            "one /64, one bucket"
        );
    }
}
