//! Fetching `image_url` / `audio_url` for a caller, without becoming a proxy into the private
//! network (SSRF).
//!
//! - http and https only; at most [`MAX_REDIRECTS`] redirects, each checked again.
//! - Every address is checked where the connection is made: a custom DNS resolver drops
//!   private, loopback, link-local, CGNAT, multicast, reserved and unspecified addresses (IPv6
//!   forms that embed an IPv4 address are unwrapped and checked as IPv4), and the connection goes
//!   to the address that was checked, so a second lookup cannot rebind the name. URLs with an IP
//!   literal never reach the resolver, so they are checked before each request and redirect.
//! - A size cap (checked on `Content-Length` and while streaming) and a timeout.
//!
//! The operator may allow loopback or private addresses (tests allow loopback).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect;

/// Redirects followed before giving up: enough for a CDN hop or two.
pub const MAX_REDIRECTS: usize = 5;

/// Which destinations are allowed, and how much is fetched.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    pub allow_loopback: bool,
    pub allow_private: bool,
    /// The largest body fetched; larger answers are a 413.
    pub max_bytes: usize,
    pub timeout: Duration,
    /// Fixed name -> address answers used instead of DNS (tests).
    pub static_hosts: Vec<(String, IpAddr)>,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        Self {
            allow_loopback: false,
            allow_private: false,
            max_bytes: 16 << 20,
            timeout: Duration::from_secs(15),
            static_hosts: Vec::new(),
        }
    }
}

/// Why a fetch failed; each becomes a 422 (or 413) that says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    TooLarge(String),
}

/// Why an address is not fetched from, or None when it may be.
pub fn blocked_reason(ip: IpAddr, policy: &FetchPolicy) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4, policy),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                return blocked_v4(v4, policy);
            }
            let seg = v6.segments();
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                (!policy.allow_loopback).then_some("loopback")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if seg[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if seg[0] & 0xfe00 == 0xfc00 {
                (!policy.allow_private).then_some("private (unique local)")
            } else if seg[0] == 0x2001 && seg[1] == 0x0db8 {
                Some("reserved for documentation")
            } else {
                None
            }
        }
    }
}

fn blocked_v4(ip: Ipv4Addr, policy: &FetchPolicy) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        (!policy.allow_loopback).then_some("loopback")
    } else if ip.is_private() {
        (!policy.allow_private).then_some("private")
    } else if a == 100 && (64..128).contains(&b) {
        (!policy.allow_private).then_some("carrier-grade NAT")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_broadcast()
        || a >= 240
        || (a, b) == (198, 18)
        || (a, b) == (198, 19)
        || (a, b, ip.octets()[2]) == (192, 0, 0)
    {
        // 240/4 future use and broadcast, 198.18/15 benchmarking, 192.0.0/24 IETF protocol
        // assignments.
        Some("reserved")
    } else {
        None
    }
}

/// The IPv4 address inside IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`),
/// NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`) addresses.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = v6.to_ipv4_mapped() {
        Some(v4)
    } else if (s[..6] == [0, 0, 0, 0, 0, 0] && !v6.is_loopback() && !v6.is_unspecified())
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0])
    {
        // IPv4-compatible (deprecated) and NAT64: the IPv4 address is the last 32 bits.
        Some(tail)
    } else if s[0] == 0x2002 {
        Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ))
    } else {
        None
    }
}

/// The resolver the HTTP client connects through: only checked addresses come out.
struct CheckedResolver {
    policy: Arc<FetchPolicy>,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.policy);
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = match policy.static_hosts.iter().find(|(h, _)| *h == host)
            {
                Some((_, ip)) => vec![SocketAddr::new(*ip, 0)],
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match blocked_reason(a.ip(), &policy) {
                    Some(why) => {
                        refused = Some(format!("{host} resolves to {} ({why})", a.ip()));
                        false
                    }
                    None => true,
                })
                .collect();
            if allowed.is_empty() {
                let why = refused.unwrap_or_else(|| format!("{host} has no address"));
                return Err(Box::new(FetchError::Refused(why)) as Box<_>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// Checks a URL's scheme and, for an IP literal, its address.
fn check_url(url: &reqwest::Url, policy: &FetchPolicy) -> Result<(), FetchError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(FetchError::Refused(format!(
            "only http and https URLs are fetched, got {}:",
            url.scheme()
        )));
    }
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
        Some(url::Host::Domain(_)) => return Ok(()),
        None => return Err(FetchError::Refused("the URL has no host".into())),
    };
    match blocked_reason(ip, policy) {
        Some(why) => Err(FetchError::Refused(format!("{ip} is a {why} address"))),
        None => Ok(()),
    }
}

/// Fetches caller-given URLs under a [`FetchPolicy`].
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    policy: Arc<FetchPolicy>,
}

impl Fetcher {
    pub fn new(policy: FetchPolicy) -> anyhow::Result<Self> {
        let policy = Arc::new(policy);
        let redirect_policy = Arc::clone(&policy);
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(CheckedResolver {
                policy: Arc::clone(&policy),
            }))
            .redirect(redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > MAX_REDIRECTS {
                    return attempt.error(FetchError::Refused(format!(
                        "more than {MAX_REDIRECTS} redirects"
                    )));
                }
                match check_url(attempt.url(), &redirect_policy) {
                    Ok(()) => attempt.follow(),
                    Err(e) => attempt.error(FetchError::Refused(format!("redirect refused: {e}"))),
                }
            }))
            .timeout(policy.timeout)
            .no_proxy()
            .build()?;
        Ok(Self { client, policy })
    }

    /// GETs `url`; the body, or why not.
    pub async fn get(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let url = reqwest::Url::parse(url)
            .map_err(|e| FetchError::Refused(format!("not a valid URL: {e}")))?;
        check_url(&url, &self.policy)?;
        let mut response = self.client.get(url).send().await.map_err(explain)?;
        if !response.status().is_success() {
            return Err(FetchError::Failed(format!(
                "the server answered HTTP {}",
                response.status()
            )));
        }
        let cap = self.policy.max_bytes;
        let too_large =
            || FetchError::TooLarge(format!("the file is larger than the limit of {cap} bytes"));
        if response.content_length().is_some_and(|n| n > cap as u64) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(explain)? {
            if body.len() + chunk.len() > cap {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// Finds our own refusal in a reqwest error's causes, or describes the failure.
fn explain(error: reqwest::Error) -> FetchError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(e) = source {
        if let Some(ours) = e.downcast_ref::<FetchError>() {
            return ours.clone();
        }
        source = e.source();
    }
    if error.is_timeout() {
        FetchError::Failed("the server did not answer in time".into())
    } else if error.is_connect() {
        FetchError::Failed("could not connect to the server".into())
    } else {
        FetchError::Failed(format!("the request failed: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked(s: &str) -> Option<&'static str> {
        blocked_reason(s.parse().unwrap(), &FetchPolicy::default())
    }

    #[test]
    fn private_and_special_addresses_are_blocked() {
        for (ip, why) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("169.254.169.254", "link-local"),
            ("224.0.0.1", "multicast"),
            ("0.0.0.0", "unspecified"),
            ("255.255.255.255", "reserved"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fe80::1", "link-local"),
            ("fd00::1", "private (unique local)"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::127.0.0.1", "loopback"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("2002:7f00:1::", "loopback"),
            ("2002:c0a8:101::1", "private"),
        ] {
            assert_eq!(blocked(ip), Some(why), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "64:ff9b::808:808",
        ] {
            assert_eq!(blocked(ip), None, "{ip}");
        }
        let loopback_ok = FetchPolicy {
            allow_loopback: true,
            ..FetchPolicy::default()
        };
        assert_eq!(
            blocked_reason("127.0.0.1".parse().unwrap(), &loopback_ok),
            None
        );
        assert_eq!(
            blocked_reason("::ffff:127.0.0.1".parse().unwrap(), &loopback_ok),
            None
        );
        assert_eq!(
            blocked_reason("10.0.0.1".parse().unwrap(), &loopback_ok),
            Some("private")
        );
    }

    #[test]
    fn urls_are_checked_before_any_connection() {
        let policy = FetchPolicy::default();
        let check = |u: &str| check_url(&reqwest::Url::parse(u).unwrap(), &policy);
        assert!(check("https://example.com/a.png").is_ok());
        assert!(
            matches!(check("file:///etc/passwd"), Err(FetchError::Refused(m)) if m.contains("only http"))
        );
        assert!(
            matches!(check("http://[::ffff:127.0.0.1]:8080/"), Err(FetchError::Refused(m)) if m.contains("loopback"))
        );
        assert!(
            matches!(check("http://169.254.169.254/latest"), Err(FetchError::Refused(m)) if m.contains("link-local"))
        );
    }
}
