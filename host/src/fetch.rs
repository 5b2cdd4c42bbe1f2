//! Fetching `image_url` / `audio_url` for a caller, without becoming a proxy into the private
//! network (SSRF).
//!
//! - http and https only, on the ports of [`FetchPolicy::allowed_ports`] (80 and 443 unless the
//!   operator says otherwise); at most [`MAX_REDIRECTS`] redirects, each checked again.
//! - Every address is judged by [`SPECIAL_RANGES`], the IANA special-purpose registries with
//!   Kiln's verdict on each row: private, loopback, link-local, CGNAT, multicast, documentation,
//!   benchmarking, reserved, anycast-service, identifier-only and unspecified addresses are
//!   refused; IPv6 forms that carry an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64
//!   `64:ff9b::/96`, 6to4) are judged by that IPv4 address.
//! - The check happens where the connection is made: a custom DNS resolver drops refused
//!   addresses, and the connection goes to the address that was checked, so a second lookup
//!   cannot rebind the name. A name with a trailing dot (`localhost.`) is resolved and checked
//!   like any other. URLs with an IP literal never reach the resolver, so they are checked
//!   before each request and redirect.
//! - A size cap (checked on `Content-Length` and while streaming) and a timeout.
//!
//! The operator may allow loopback or private addresses (tests allow loopback), and other ports.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect;

/// Redirects followed before giving up: enough for a CDN hop or two.
pub const MAX_REDIRECTS: usize = 5;

/// The ports URLs are fetched from unless `fetch_allowed_ports` says otherwise (declared with
/// the option, in `kiln-config`).
pub use kiln_config::DEFAULT_ALLOWED_PORTS;

/// Which destinations are allowed, and how much is fetched.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    pub allow_loopback: bool,
    pub allow_private: bool,
    /// The ports a URL may name (its scheme's port when it names none); empty: none.
    pub allowed_ports: Vec<u16>,
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
            allowed_ports: DEFAULT_ALLOWED_PORTS.to_vec(),
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

/// One row of [`SPECIAL_RANGES`]: a range of addresses as a registry lists it, and what Kiln
/// does with the addresses in it.
#[derive(Debug, PartialEq, Eq)]
pub struct SpecialRange {
    /// `address/length`.
    pub prefix: &'static str,
    /// The registry's name for it.
    pub name: &'static str,
    /// Where it is defined.
    pub rfc: &'static str,
    /// The registry's "Globally Reachable" column.
    pub reachable: Reachable,
    pub rule: Rule,
    /// Why Kiln applies that rule (for readers of this table; callers see the rule's label).
    pub why: &'static str,
}

/// The "Globally Reachable" column of the registries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reachable {
    Yes,
    No,
    /// "N/A" (tunnels, whose addresses stand for others), or blank on a deprecated row.
    NotApplicable,
    /// Not in the special-purpose registries; from the RFC named (multicast, site-local, ...).
    NotListed,
}

/// What Kiln does with an address of a [`SpecialRange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Never fetched from. The label completes "`<address>` is ...", for the caller.
    Refuse(&'static str),
    /// Fetched from only when the operator sets `fetch_allow_loopback`.
    Loopback,
    /// Fetched from only when the operator sets `fetch_allow_private`; the label as above.
    Private(&'static str),
    /// An IPv6 form that carries an IPv4 address: that address is judged instead.
    CarriesIpv4(Carried),
}

/// Where an IPv6 address keeps the IPv4 address it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// The last 32 bits (IPv4-mapped, IPv4-compatible, NAT64 with a /96 prefix).
    Last32Bits,
    /// Bits 16 to 48 (6to4, `2002:AABB:CCDD::`).
    SixToFour,
}

use Reachable::{No, NotApplicable, NotListed, Yes};
use Rule::{CarriesIpv4, Loopback, Private, Refuse};

const ANYCAST: Rule = Refuse("an anycast service address");
const ANYCAST_WHY: &str = "answered by the nearest instance of a network service, which may be \
                           inside the server's own network; no web content is served there";
const DOCUMENTATION: Rule = Refuse("a documentation address");
const DOCUMENTATION_WHY: &str = "for examples only: a URL with it is a mistake or a probe, and \
                                 some networks route it internally";
const LINK_LOCAL_WHY: &str = "reaches the server's own network segment; cloud metadata services \
                              (169.254.169.254) live here";
const PRIVATE_WHY: &str = "the operator's own network";

const fn row(
    prefix: &'static str,
    name: &'static str,
    rfc: &'static str,
    reachable: Reachable,
    rule: Rule,
    why: &'static str,
) -> SpecialRange {
    SpecialRange {
        prefix,
        name,
        rfc,
        reachable,
        rule,
        why,
    }
}

/// The IANA IPv4 and IPv6 Special-Purpose Address Registries, every row, as of the registries
/// last updated 2025-04 (the newest row: `100:0:0:1::/64`, RFC 9780), with Kiln's rule for each;
/// then the ranges the registries leave to others (multicast, deprecated site-local and
/// IPv4-compatible, SIIT, and IPv6 outside global unicast `2000::/3`).
///
/// An address is judged by the most specific row that holds it (`192.0.0.9` by its /32, not by
/// `192.0.0.0/24`); an address in no row is fetched from. Every row refuses, except the IPv6
/// forms that carry an IPv4 address (judged by that address, so `64:ff9b::808:808`, 8.8.8.8
/// through a NAT64 gateway, is fetched from and `64:ff9b::a9fe:a9fe` is not), and those the
/// operator may allow (loopback, private). Globally reachable rows are refused too where
/// nothing a caller could want is there: anycast services (answered by the nearest instance,
/// maybe inside our network) and identifiers that are no locators (ORCHIDv2, DETs).
#[rustfmt::skip]
pub const SPECIAL_RANGES: &[SpecialRange] = &[
    // IANA IPv4 Special-Purpose Address Registry.
    row("0.0.0.0/8", "\"This network\"", "RFC 791 §3.2", No, Refuse("an address of \"this network\""),
        "a source address only; as a destination, Linux sends 0.0.0.0 to the local host"),
    row("0.0.0.0/32", "\"This host on this network\"", "RFC 1122 §3.2.1.3", No, Refuse("the unspecified address"),
        "a source address only; as a destination it reaches the local host"),
    row("10.0.0.0/8", "Private-Use", "RFC 1918", No, Private("a private address"), PRIVATE_WHY),
    row("100.64.0.0/10", "Shared Address Space", "RFC 6598", No, Private("a carrier-grade NAT address"),
        "the operator's side of a carrier-grade NAT"),
    row("127.0.0.0/8", "Loopback", "RFC 1122 §3.2.1.3", No, Loopback, "the server itself"),
    row("169.254.0.0/16", "Link Local", "RFC 3927", No, Refuse("a link-local address"), LINK_LOCAL_WHY),
    row("172.16.0.0/12", "Private-Use", "RFC 1918", No, Private("a private address"), PRIVATE_WHY),
    row("192.0.0.0/24", "IETF Protocol Assignments", "RFC 6890 §2.1", No, Refuse("an IETF protocol assignment"),
        "protocol plumbing, not hosts"),
    row("192.0.0.0/29", "IPv4 Service Continuity Prefix", "RFC 7335", No, Refuse("an IPv4 service continuity address"),
        "the inside of a DS-Lite or 464XLAT tunnel on the server's own network"),
    row("192.0.0.8/32", "IPv4 dummy address", "RFC 7600", No, Refuse("the IPv4 dummy address"),
        "a placeholder source address, never a destination"),
    row("192.0.0.9/32", "Port Control Protocol Anycast", "RFC 7723", Yes, ANYCAST, ANYCAST_WHY),
    row("192.0.0.10/32", "Traversal Using Relays around NAT Anycast", "RFC 8155", Yes, ANYCAST, ANYCAST_WHY),
    row("192.0.0.170/32", "NAT64/DNS64 Discovery", "RFC 8880, RFC 7050 §2.2", No, Refuse("a NAT64 discovery address"),
        "used in DNS answers to find the local NAT64 prefix, never connected to"),
    row("192.0.0.171/32", "NAT64/DNS64 Discovery", "RFC 8880, RFC 7050 §2.2", No, Refuse("a NAT64 discovery address"),
        "used in DNS answers to find the local NAT64 prefix, never connected to"),
    row("192.0.2.0/24", "Documentation (TEST-NET-1)", "RFC 5737", No, DOCUMENTATION, DOCUMENTATION_WHY),
    row("192.31.196.0/24", "AS112-v4", "RFC 7535", Yes, ANYCAST, ANYCAST_WHY),
    row("192.52.193.0/24", "AMT", "RFC 7450", Yes, ANYCAST, ANYCAST_WHY),
    row("192.88.99.0/24", "Deprecated (6to4 Relay Anycast)", "RFC 7526", NotApplicable, ANYCAST,
        "deprecated 6to4 relays: the nearest one may be inside the server's own network"),
    row("192.88.99.2/32", "6a44-relay anycast address", "RFC 6751", No, ANYCAST, ANYCAST_WHY),
    row("192.168.0.0/16", "Private-Use", "RFC 1918", No, Private("a private address"), PRIVATE_WHY),
    row("192.175.48.0/24", "Direct Delegation AS112 Service", "RFC 7534", Yes, ANYCAST, ANYCAST_WHY),
    row("198.18.0.0/15", "Benchmarking", "RFC 2544", No, Refuse("a benchmarking address"),
        "for test labs, which route it internally"),
    row("198.51.100.0/24", "Documentation (TEST-NET-2)", "RFC 5737", No, DOCUMENTATION, DOCUMENTATION_WHY),
    row("203.0.113.0/24", "Documentation (TEST-NET-3)", "RFC 5737", No, DOCUMENTATION, DOCUMENTATION_WHY),
    row("240.0.0.0/4", "Reserved", "RFC 1112 §4", No, Refuse("a reserved address"),
        "never allocated; some networks use it internally"),
    row("255.255.255.255/32", "Limited Broadcast", "RFC 8190, RFC 919 §7", No, Refuse("the broadcast address"),
        "every host of the server's own segment"),
    // IANA IPv6 Special-Purpose Address Registry.
    row("::1/128", "Loopback Address", "RFC 4291", No, Loopback, "the server itself"),
    row("::/128", "Unspecified Address", "RFC 4291", No, Refuse("the unspecified address"),
        "a source address only; as a destination it reaches the local host"),
    row("::ffff:0:0/96", "IPv4-mapped Address", "RFC 4291", No, CarriesIpv4(Carried::Last32Bits),
        "the socket connects to the IPv4 address inside, over IPv4"),
    row("64:ff9b::/96", "IPv4-IPv6 Translat.", "RFC 6052", Yes, CarriesIpv4(Carried::Last32Bits),
        "a NAT64 gateway connects to the IPv4 address inside"),
    row("64:ff9b:1::/48", "IPv4-IPv6 Translat.", "RFC 8215", No, Refuse("a local-use NAT64 address"),
        "the operator's own translator, whose layout only it knows: the IPv4 address reached \
         cannot be checked"),
    row("100::/64", "Discard-Only Address Block", "RFC 6666", No, Refuse("a discard-only address"),
        "a sink for unwanted traffic"),
    row("100:0:0:1::/64", "Dummy IPv6 Prefix", "RFC 9780", No, Refuse("a dummy address"),
        "a placeholder, never a destination"),
    row("2001::/23", "IETF Protocol Assignments", "RFC 2928", No, Refuse("an IETF protocol assignment"),
        "protocol plumbing, not hosts"),
    row("2001::/32", "TEREDO", "RFC 4380, RFC 8190", NotApplicable, Refuse("a Teredo address"),
        "a tunnel to a host behind a NAT, through a relay; the IPv4 address inside is obscured \
         and cannot be checked"),
    row("2001:1::1/128", "Port Control Protocol Anycast", "RFC 7723", Yes, ANYCAST, ANYCAST_WHY),
    row("2001:1::2/128", "Traversal Using Relays around NAT Anycast", "RFC 8155", Yes, ANYCAST, ANYCAST_WHY),
    row("2001:1::3/128", "DNS-SD Service Registration Protocol Anycast", "RFC 9665", Yes, ANYCAST, ANYCAST_WHY),
    row("2001:2::/48", "Benchmarking", "RFC 5180", No, Refuse("a benchmarking address"),
        "for test labs, which route it internally"),
    row("2001:3::/32", "AMT", "RFC 7450", Yes, ANYCAST, ANYCAST_WHY),
    row("2001:4:112::/48", "AS112-v6", "RFC 7535", Yes, ANYCAST, ANYCAST_WHY),
    row("2001:10::/28", "Deprecated (previously ORCHID)", "RFC 4843", NotApplicable, Refuse("an ORCHID identifier"),
        "a cryptographic identifier, not a locator: no host is there"),
    row("2001:20::/28", "ORCHIDv2", "RFC 7343", Yes, Refuse("an ORCHID identifier"),
        "a cryptographic identifier, not a locator: no host is there"),
    row("2001:30::/28", "Drone Remote ID Protocol Entity Tags (DETs) Prefix", "RFC 9374", Yes,
        Refuse("a drone remote ID tag"), "an identifier, not a locator: no web host is there"),
    row("2001:db8::/32", "Documentation", "RFC 3849", No, DOCUMENTATION, DOCUMENTATION_WHY),
    row("2002::/16", "6to4", "RFC 3056", NotApplicable, CarriesIpv4(Carried::SixToFour),
        "the tunnel ends at the IPv4 address inside"),
    row("2620:4f:8000::/48", "Direct Delegation AS112 Service", "RFC 7534", Yes, ANYCAST, ANYCAST_WHY),
    row("3fff::/20", "Documentation", "RFC 9637", No, DOCUMENTATION, DOCUMENTATION_WHY),
    row("5f00::/16", "Segment Routing (SRv6) SIDs", "RFC 9602", No, Refuse("a segment routing (SRv6) address"),
        "meaningful only inside an operator's segment-routing domain"),
    row("fc00::/7", "Unique-Local", "RFC 4193, RFC 8190", No, Private("a unique-local address"), PRIVATE_WHY),
    row("fe80::/10", "Link-Local Unicast", "RFC 4291", No, Refuse("a link-local address"), LINK_LOCAL_WHY),
    // Not in the special-purpose registries.
    row("224.0.0.0/4", "Multicast", "RFC 5771", NotListed, Refuse("a multicast address"),
        "a group, not a host; it reaches the server's own network"),
    row("ff00::/8", "Multicast", "RFC 4291 §2.7", NotListed, Refuse("a multicast address"),
        "a group, not a host; it reaches the server's own network"),
    row("fec0::/10", "Site-Local (deprecated)", "RFC 3879", NotListed, Refuse("a site-local address"),
        "deprecated, yet still routed inside some networks"),
    row("::/96", "IPv4-compatible Address (deprecated)", "RFC 4291 §2.5.5.1", NotListed,
        CarriesIpv4(Carried::Last32Bits), "stands for the IPv4 address inside"),
    row("::ffff:0:0:0/96", "IPv4-translated Address (SIIT)", "RFC 2765, RFC 6145", NotListed,
        Refuse("an IPv4-translated (SIIT) address"),
        "meaningful only behind the operator's own SIIT translator"),
    // The IANA IPv6 Address Space registry allocates only 2000::/3 to global unicast; the rest
    // is reserved or used as the rows above say (the more specific row decides).
    row("::/3", "Not global unicast", "RFC 4291 §2.4", NotListed, Refuse("a reserved address"),
        "not allocated: no public host is there"),
    row("4000::/2", "Not global unicast", "RFC 4291 §2.4", NotListed, Refuse("a reserved address"),
        "not allocated: no public host is there"),
    row("8000::/1", "Not global unicast", "RFC 4291 §2.4", NotListed, Refuse("a reserved address"),
        "not allocated: no public host is there"),
];

/// Why an address is not fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The address as given.
    pub address: IpAddr,
    /// The range that refuses it.
    pub range: &'static SpecialRange,
    /// The IPv4 address judged instead, when `address` carries one, and the row of that form.
    pub carried: Option<(Ipv4Addr, &'static SpecialRange)>,
}

impl Refusal {
    /// What the refusing range's rule says the address is ("a loopback address").
    pub fn label(&self) -> &'static str {
        match self.range.rule {
            Refuse(label) | Private(label) => label,
            Loopback => "a loopback address",
            // A refusal names a range that refuses, never one that passes the address on.
            CarriesIpv4(_) => "an address that carries an IPv4 address",
        }
    }
}

/// `127.0.0.1 is a loopback address (127.0.0.0/8, RFC 1122 §3.2.1.3)`.
impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.address, self.predicate())
    }
}

impl Refusal {
    /// What is said of the address: `is a loopback address (127.0.0.0/8, RFC 1122 §3.2.1.3)`,
    /// or, for a form that carries an IPv4 address, `carries 127.0.0.1 (::ffff:0:0/96,
    /// IPv4-mapped Address), and 127.0.0.1 is a loopback address (...)`.
    fn predicate(&self) -> String {
        let range = self.range;
        let is = format!("is {} ({}, {})", self.label(), range.prefix, range.rfc);
        match self.carried {
            Some((v4, form)) => format!(
                "carries {v4} ({}, {}), and {v4} {is}",
                form.prefix, form.name
            ),
            None => is,
        }
    }
}

/// Whether `ip` may be fetched from under `policy`: `Ok`, or which range refuses it.
pub fn check_address(ip: IpAddr, policy: &FetchPolicy) -> Result<(), Refusal> {
    let Some(range) = special_range(ip) else {
        return Ok(());
    };
    let refused = |range| Refusal {
        address: ip,
        range,
        carried: None,
    };
    match (range.rule, ip) {
        (Loopback, _) if policy.allow_loopback => Ok(()),
        (Private(_), _) if policy.allow_private => Ok(()),
        (CarriesIpv4(place), IpAddr::V6(v6)) => {
            let v4 = carried_ipv4(v6, place);
            check_address(IpAddr::V4(v4), policy).map_err(|inner| Refusal {
                carried: Some((v4, range)),
                ..refused(inner.range)
            })
        }
        _ => Err(refused(range)),
    }
}

/// The most specific row of [`SPECIAL_RANGES`] that holds `ip`.
fn special_range(ip: IpAddr) -> Option<&'static SpecialRange> {
    SPECIAL_RANGES
        .iter()
        .filter_map(|range| {
            let (network, length) = parse_prefix(range.prefix)?;
            in_prefix(ip, network, length).then_some((length, range))
        })
        .max_by_key(|&(length, _)| length)
        .map(|(_, range)| range)
}

/// `address/length`; None when it is not one (a test checks every row is).
fn parse_prefix(prefix: &str) -> Option<(IpAddr, u8)> {
    let (address, length) = prefix.split_once('/')?;
    let address: IpAddr = address.parse().ok()?;
    let length: u8 = length.parse().ok()?;
    let bits = if address.is_ipv4() { 32 } else { 128 };
    (length <= bits).then_some((address, length))
}

/// Whether the first `length` bits of `ip` are those of `network` (of the same family).
fn in_prefix(ip: IpAddr, network: IpAddr, length: u8) -> bool {
    // `checked_shl` is None for a shift by the whole width: a /0 keeps no bit.
    match (ip, network) {
        (IpAddr::V4(ip), IpAddr::V4(network)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(length)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(network) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(network)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(length)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(network) & mask
        }
        _ => false,
    }
}

/// The IPv4 address an IPv6 address carries at `place`.
fn carried_ipv4(v6: Ipv6Addr, place: Carried) -> Ipv4Addr {
    let bits = u128::from(v6);
    let v4 = match place {
        Carried::Last32Bits => bits as u32,
        Carried::SixToFour => (bits >> 80) as u32,
    };
    Ipv4Addr::from(v4)
}

/// The resolver the HTTP client connects through: only checked addresses come out.
struct CheckedResolver {
    policy: Arc<FetchPolicy>,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.policy);
        Box::pin(async move { resolve_checked(name.as_str(), &policy).await })
    }
}

/// The addresses of `host` that `policy` allows; a refusal when there is none.
async fn resolve_checked(
    host: &str,
    policy: &FetchPolicy,
) -> Result<Addrs, Box<dyn std::error::Error + Send + Sync>> {
    // `example.com.` (fully qualified, with the root's dot) is the same name as `example.com`:
    // the system resolver treats it so, and so do the fixed answers.
    let unrooted = |name: &str| name.strip_suffix('.').unwrap_or(name).to_owned();
    let fixed = policy
        .static_hosts
        .iter()
        .find(|(name, _)| unrooted(name) == unrooted(host));
    let found: Vec<SocketAddr> = match fixed {
        Some((_, ip)) => vec![SocketAddr::new(*ip, 0)],
        None => tokio::net::lookup_host((host, 0)).await?.collect(),
    };
    let mut refused = None;
    let allowed: Vec<SocketAddr> = found
        .into_iter()
        .filter(|a| match check_address(a.ip(), policy) {
            Ok(()) => true,
            Err(refusal) => {
                let (ip, predicate) = (a.ip(), refusal.predicate());
                refused = Some(format!("{host} resolves to {ip}, which {predicate}"));
                false
            }
        })
        .collect();
    if allowed.is_empty() {
        let why = refused.unwrap_or_else(|| format!("{host} has no address"));
        return Err(Box::new(FetchError::Refused(why)));
    }
    Ok(Box::new(allowed.into_iter()))
}

/// Checks a URL's scheme, its port and, for an IP literal, its address: all that can be known
/// before a name is resolved.
fn check_url(url: &reqwest::Url, policy: &FetchPolicy) -> Result<(), FetchError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(FetchError::Refused(format!(
            "only http and https URLs are fetched, got {}:",
            url.scheme()
        )));
    }
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        Some(url::Host::Domain(_)) => None,
        None => return Err(FetchError::Refused("the URL has no host".into())),
    };
    if let Some(ip) = ip {
        check_address(ip, policy).map_err(|refusal| FetchError::Refused(refusal.to_string()))?;
    }
    // http and https always have a port: the URL's, else the scheme's (80, 443).
    let port = url.port_or_known_default().unwrap_or(0);
    if !policy.allowed_ports.contains(&port) {
        return Err(FetchError::Refused(port_refused(
            port,
            &policy.allowed_ports,
        )));
    }
    Ok(())
}

/// `port 8080 is not fetched from: only ports 80 and 443 are`.
fn port_refused(port: u16, allowed: &[u16]) -> String {
    let list: Vec<String> = allowed.iter().map(u16::to_string).collect();
    match list.as_slice() {
        [] => format!("port {port} is not fetched from: this server fetches no URL"),
        [one] => format!("port {port} is not fetched from: only port {one} is"),
        [first @ .., last] => format!(
            "port {port} is not fetched from: only ports {} and {last} are",
            first.join(", ")
        ),
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
    use std::collections::BTreeSet;

    use super::*;

    /// The prefix of the row that refuses `ip` under `policy`, or None when it is fetched from.
    fn refused_by(ip: &str, policy: &FetchPolicy) -> Option<&'static str> {
        check_address(ip.parse().unwrap(), policy)
            .err()
            .map(|refusal| refusal.range.prefix)
    }

    /// One address (at least) in each row of [`SPECIAL_RANGES`]: the address, the most specific
    /// row it falls in, and the row that refuses it by default (None: fetched from). For a form
    /// that carries an IPv4 address, the refusing row is that address's.
    #[rustfmt::skip]
    const ROW_CASES: &[(&str, &str, Option<&str>)] = &[
        // IPv4 registry.
        ("0.1.2.3", "0.0.0.0/8", Some("0.0.0.0/8")),
        ("0.0.0.0", "0.0.0.0/32", Some("0.0.0.0/32")),
        ("10.20.30.40", "10.0.0.0/8", Some("10.0.0.0/8")),
        ("100.64.0.1", "100.64.0.0/10", Some("100.64.0.0/10")),
        ("127.0.0.1", "127.0.0.0/8", Some("127.0.0.0/8")),
        ("169.254.169.254", "169.254.0.0/16", Some("169.254.0.0/16")),
        ("172.16.0.1", "172.16.0.0/12", Some("172.16.0.0/12")),
        ("192.0.0.200", "192.0.0.0/24", Some("192.0.0.0/24")),
        ("192.0.0.1", "192.0.0.0/29", Some("192.0.0.0/29")),
        ("192.0.0.8", "192.0.0.8/32", Some("192.0.0.8/32")),
        ("192.0.0.9", "192.0.0.9/32", Some("192.0.0.9/32")),
        ("192.0.0.10", "192.0.0.10/32", Some("192.0.0.10/32")),
        ("192.0.0.170", "192.0.0.170/32", Some("192.0.0.170/32")),
        ("192.0.0.171", "192.0.0.171/32", Some("192.0.0.171/32")),
        ("192.0.2.1", "192.0.2.0/24", Some("192.0.2.0/24")),
        ("192.31.196.1", "192.31.196.0/24", Some("192.31.196.0/24")),
        ("192.52.193.1", "192.52.193.0/24", Some("192.52.193.0/24")),
        ("192.88.99.1", "192.88.99.0/24", Some("192.88.99.0/24")),
        ("192.88.99.2", "192.88.99.2/32", Some("192.88.99.2/32")),
        ("192.168.1.1", "192.168.0.0/16", Some("192.168.0.0/16")),
        ("192.175.48.1", "192.175.48.0/24", Some("192.175.48.0/24")),
        ("198.19.255.255", "198.18.0.0/15", Some("198.18.0.0/15")),
        ("198.51.100.7", "198.51.100.0/24", Some("198.51.100.0/24")),
        ("203.0.113.9", "203.0.113.0/24", Some("203.0.113.0/24")),
        ("240.0.0.1", "240.0.0.0/4", Some("240.0.0.0/4")),
        ("255.255.255.255", "255.255.255.255/32", Some("255.255.255.255/32")),
        // IPv6 registry.
        ("::1", "::1/128", Some("::1/128")),
        ("::", "::/128", Some("::/128")),
        ("::ffff:127.0.0.1", "::ffff:0:0/96", Some("127.0.0.0/8")),
        ("::ffff:8.8.8.8", "::ffff:0:0/96", None),
        ("64:ff9b::a9fe:a9fe", "64:ff9b::/96", Some("169.254.0.0/16")),
        ("64:ff9b::808:808", "64:ff9b::/96", None),
        ("64:ff9b:1::808:808", "64:ff9b:1::/48", Some("64:ff9b:1::/48")),
        ("100::1", "100::/64", Some("100::/64")),
        ("100:0:0:1::1", "100:0:0:1::/64", Some("100:0:0:1::/64")),
        ("2001:100::1", "2001::/23", Some("2001::/23")),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001::/32", Some("2001::/32")),
        ("2001:1::1", "2001:1::1/128", Some("2001:1::1/128")),
        ("2001:1::2", "2001:1::2/128", Some("2001:1::2/128")),
        ("2001:1::3", "2001:1::3/128", Some("2001:1::3/128")),
        ("2001:2::1", "2001:2::/48", Some("2001:2::/48")),
        ("2001:3::1", "2001:3::/32", Some("2001:3::/32")),
        ("2001:4:112::1", "2001:4:112::/48", Some("2001:4:112::/48")),
        ("2001:10::1", "2001:10::/28", Some("2001:10::/28")),
        ("2001:20::1", "2001:20::/28", Some("2001:20::/28")),
        ("2001:30::1", "2001:30::/28", Some("2001:30::/28")),
        ("2001:db8::1", "2001:db8::/32", Some("2001:db8::/32")),
        ("2002:c0a8:101::1", "2002::/16", Some("192.168.0.0/16")),
        ("2002:7f00:1::", "2002::/16", Some("127.0.0.0/8")),
        ("2002:808:808::1", "2002::/16", None),
        ("2620:4f:8000::1", "2620:4f:8000::/48", Some("2620:4f:8000::/48")),
        ("3fff::1", "3fff::/20", Some("3fff::/20")),
        ("5f00::1", "5f00::/16", Some("5f00::/16")),
        ("fd00::1", "fc00::/7", Some("fc00::/7")),
        ("fe80::1", "fe80::/10", Some("fe80::/10")),
        // Not in the registries.
        ("224.0.0.1", "224.0.0.0/4", Some("224.0.0.0/4")),
        ("239.255.255.250", "224.0.0.0/4", Some("224.0.0.0/4")),
        ("ff02::1", "ff00::/8", Some("ff00::/8")),
        ("fec0::1", "fec0::/10", Some("fec0::/10")),
        ("::127.0.0.2", "::/96", Some("127.0.0.0/8")),
        ("::8.8.8.8", "::/96", None),
        ("::ffff:0:a00:1", "::ffff:0:0:0/96", Some("::ffff:0:0:0/96")),
        ("1000::1", "::/3", Some("::/3")),
        ("4000::1", "4000::/2", Some("4000::/2")),
        ("8000::1", "8000::/1", Some("8000::/1")),
    ];

    #[test]
    fn every_row_of_the_registries_is_judged_as_its_rule_says() {
        let policy = FetchPolicy::default();
        for &(ip, row, refusing) in ROW_CASES {
            let found = special_range(ip.parse().unwrap()).map(|r| r.prefix);
            assert_eq!(found, Some(row), "{ip} falls in");
            assert_eq!(refused_by(ip, &policy), refusing, "{ip} is refused by");
        }
        let tested: BTreeSet<&str> = ROW_CASES.iter().map(|&(_, row, _)| row).collect();
        for range in SPECIAL_RANGES {
            assert!(
                tested.contains(range.prefix),
                "no case for {}",
                range.prefix
            );
        }
    }

    #[test]
    fn every_row_is_a_prefix_listed_once() {
        let mut seen = BTreeSet::new();
        for range in SPECIAL_RANGES {
            let (network, length) = parse_prefix(range.prefix)
                .unwrap_or_else(|| panic!("{} is not address/length", range.prefix));
            assert!(seen.insert(range.prefix), "{} twice", range.prefix);
            // The network address has no bit past the length (a typo would match elsewhere).
            assert!(in_prefix(network, network, length), "{}", range.prefix);
            let host_bits = match network {
                IpAddr::V4(v4) => u128::from(u32::from(v4)) & (u128::from(u32::MAX) >> length),
                IpAddr::V6(v6) => {
                    u128::from(v6) & u128::MAX.checked_shr(length.into()).unwrap_or(0)
                }
            };
            assert_eq!(host_bits, 0, "{} has bits past its length", range.prefix);
            // Only IPv6 forms pass an address on, to the IPv4 rows.
            if let CarriesIpv4(_) = range.rule {
                assert!(network.is_ipv6(), "{}", range.prefix);
            }
        }
    }

    #[test]
    fn the_edges_of_ranges_are_exact() {
        let policy = FetchPolicy::default();
        #[rustfmt::skip]
        let edges = [
            // Just outside, then just inside.
            ("9.255.255.255", None), ("10.0.0.0", Some("10.0.0.0/8")),
            ("11.0.0.0", None), ("10.255.255.255", Some("10.0.0.0/8")),
            ("100.63.255.255", None), ("100.64.0.0", Some("100.64.0.0/10")),
            ("100.128.0.0", None), ("100.127.255.255", Some("100.64.0.0/10")),
            ("172.15.255.255", None), ("172.32.0.0", None), ("172.31.255.255", Some("172.16.0.0/12")),
            ("192.0.1.0", None), ("192.0.0.255", Some("192.0.0.0/24")),
            ("192.0.3.0", None), ("192.0.2.255", Some("192.0.2.0/24")),
            ("192.88.98.255", None), ("192.88.100.0", None),
            ("198.17.255.255", None), ("198.20.0.0", None), ("198.18.0.0", Some("198.18.0.0/15")),
            ("198.51.99.255", None), ("198.51.101.0", None),
            ("203.0.112.255", None), ("203.0.114.0", None),
            ("223.255.255.255", None), ("224.0.0.0", Some("224.0.0.0/4")),
            ("1.0.0.0", None), ("0.255.255.255", Some("0.0.0.0/8")),
            ("2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", Some("2001::/23")), ("2001:200::", None),
            ("2001:1::4", Some("2001::/23")),
            ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", None), ("2001:db9::", None),
            ("1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some("::/3")), ("2000::", None),
            ("3fff:1000::", None), ("3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", Some("3fff::/20")),
            ("3ffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None), ("4000::", Some("4000::/2")),
            ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some("8000::/1")),
            ("64:ff9b::1:0:0", Some("::/3")), ("64:ff9b:1:ffff::", Some("64:ff9b:1::/48")),
            ("100::1:0:0:0", Some("100::/64")), ("100:0:0:2::", Some("::/3")),
        ];
        for (ip, refusing) in edges {
            assert_eq!(refused_by(ip, &policy), refusing, "{ip}");
        }
    }

    #[test]
    fn the_operator_lifts_loopback_and_private_and_nothing_else() {
        let loopback_ok = FetchPolicy {
            allow_loopback: true,
            ..FetchPolicy::default()
        };
        for ip in [
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
        ] {
            assert_eq!(refused_by(ip, &loopback_ok), None, "{ip}");
        }
        assert_eq!(refused_by("10.0.0.1", &loopback_ok), Some("10.0.0.0/8"));
        let private_ok = FetchPolicy {
            allow_private: true,
            ..FetchPolicy::default()
        };
        for ip in [
            "10.0.0.1",
            "172.16.5.4",
            "192.168.0.1",
            "100.64.1.1",
            "fd12::1",
            "::ffff:10.1.1.1",
        ] {
            assert_eq!(refused_by(ip, &private_ok), None, "{ip}");
        }
        // Never lifted: the cloud metadata address, documentation, multicast, the server's
        // own segment.
        let both = FetchPolicy {
            allow_loopback: true,
            allow_private: true,
            ..FetchPolicy::default()
        };
        for ip in [
            "169.254.169.254",
            "fe80::1",
            "192.0.2.1",
            "224.0.0.1",
            "0.0.0.0",
            "::",
            "64:ff9b:1::1",
        ] {
            assert!(refused_by(ip, &both).is_some(), "{ip}");
        }
    }

    #[test]
    fn a_refusal_says_which_address_and_why() {
        let policy = FetchPolicy::default();
        let why = |ip: &str| {
            check_address(ip.parse().unwrap(), &policy)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            why("127.0.0.1"),
            "127.0.0.1 is a loopback address (127.0.0.0/8, RFC 1122 §3.2.1.3)"
        );
        assert_eq!(
            why("::ffff:10.0.0.1"),
            "::ffff:10.0.0.1 carries 10.0.0.1 (::ffff:0:0/96, IPv4-mapped Address), and 10.0.0.1 \
             is a private address (10.0.0.0/8, RFC 1918)"
        );
        assert_eq!(
            why("2001:db8::1"),
            "2001:db8::1 is a documentation address (2001:db8::/32, RFC 3849)"
        );
    }

    #[test]
    fn urls_are_checked_before_any_connection() {
        let policy = FetchPolicy::default();
        let check = |u: &str| check_url(&reqwest::Url::parse(u).unwrap(), &policy);
        let refused = |u: &str| match check(u) {
            Err(FetchError::Refused(m)) => m,
            other => panic!("{u}: {other:?}"),
        };
        assert!(check("https://example.com/a.png").is_ok());
        assert!(check("http://example.com:443/a.png").is_ok());
        assert!(refused("file:///etc/passwd").contains("only http"));
        assert!(refused("http://[::ffff:127.0.0.1]:8080/").contains("loopback"));
        assert!(refused("http://169.254.169.254/latest").contains("link-local"));
        // Other spellings of an IPv4 address are IP literals too.
        for url in [
            "http://127.0.0.1./",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://127.1/",
        ] {
            assert!(
                refused(url).starts_with("127.0.0.1 is a loopback address"),
                "{url}"
            );
        }
        assert_eq!(
            refused("http://example.com:8080/a.png"),
            "port 8080 is not fetched from: only ports 80 and 443 are"
        );
        assert!(refused("https://example.com:22/").starts_with("port 22 "));
        let one_port = FetchPolicy {
            allowed_ports: vec![443],
            ..FetchPolicy::default()
        };
        let url = reqwest::Url::parse("http://example.com/").unwrap();
        assert_eq!(
            check_url(&url, &one_port),
            Err(FetchError::Refused(
                "port 80 is not fetched from: only port 443 is".into()
            ))
        );
    }

    #[tokio::test]
    async fn names_with_a_trailing_dot_are_checked_like_any_other() {
        let policy = FetchPolicy {
            static_hosts: vec![
                ("internal.example".into(), "10.0.0.5".parse().unwrap()),
                ("rooted.example.".into(), "127.0.0.1".parse().unwrap()),
                (
                    "images.example.com".into(),
                    "93.184.216.34".parse().unwrap(),
                ),
            ],
            ..FetchPolicy::default()
        };
        let refusal = |host: &'static str| {
            let policy = policy.clone();
            async move {
                match resolve_checked(host, &policy).await {
                    Ok(_) => panic!("{host} resolved"),
                    Err(e) => e.to_string(),
                }
            }
        };
        for host in ["internal.example", "internal.example."] {
            assert_eq!(
                refusal(host).await,
                format!(
                    "{host} resolves to 10.0.0.5, which is a private address (10.0.0.0/8, \
                     RFC 1918)"
                )
            );
        }
        for host in ["rooted.example", "rooted.example."] {
            assert!(
                refusal(host).await.contains("is a loopback address"),
                "{host}"
            );
        }
        let found: Vec<_> = resolve_checked("images.example.com.", &policy)
            .await
            .unwrap()
            .collect();
        assert_eq!(found, vec!["93.184.216.34:0".parse().unwrap()]);
        // Through the system resolver: `localhost.` is refused, or not found at all.
        if let Err(e) = resolve_checked("localhost.", &FetchPolicy::default()).await {
            if let Some(FetchError::Refused(why)) = e.downcast_ref::<FetchError>() {
                assert!(why.contains("loopback"), "{why}");
            }
        } else {
            panic!("localhost. resolved to an allowed address");
        }
    }
}
