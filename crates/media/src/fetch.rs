//! The SSRF-safe fetcher for `source_url`: a public service must not become a way
//! into the network it runs in.
//!
//! Rules (each URL, and each redirect target):
//! - `http` and `https` only; no credentials in the URL; a host is required.
//! - A literal address (in any form the WHATWG URL parser accepts: `127.1`,
//!   `0x7f000001`, `2130706433`, `[::ffff:127.0.0.1]` all become 127.0.0.1) must be
//!   a public unicast address ([`forbidden`]); names are resolved and **every**
//!   address they resolve to must be public (a name with one private address is
//!   refused); `localhost` and `*.localhost` are refused without asking DNS.
//! - The connection goes to an address that was checked: the HTTP client's only
//!   resolver is [`GuardedResolver`], which resolves, checks, and hands the client
//!   the checked addresses; there is no second resolution. No proxy is used (a
//!   proxy would resolve names itself).
//! - Redirects are followed by hand, at most [`MAX_REDIRECTS`], each target checked
//!   as above before it is requested.
//! - At most [`MAX_BYTES`] are read (a larger `Content-Length` is refused before
//!   reading; a body that grows past it is dropped mid-stream); the whole fetch,
//!   redirects included, is bounded by [`FETCH_TIMEOUT`]; the answer must be 2xx
//!   with `Content-Type` `image/png`, `image/jpeg` or `image/webp`.
//!
//! The test seam: [`HostOverrides`] maps made-up names to addresses that skip the
//! address rules (so tests can reach a server on 127.0.0.1). It accepts only names
//! under `.test` (RFC 6761: never delegated in the public DNS, so an override can
//! never shadow a real host), it cannot be built from configuration files or the
//! environment (the app's `Config` field is `#[serde(skip)]`), literal addresses and
//! every other name still go through every rule, and an empty set (the default)
//! changes nothing.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use url::{Host, Url};

use crate::domain::MediaType;

/// The most bytes fetched.
pub const MAX_BYTES: usize = 10 * 1024 * 1024;
/// The bound of one whole fetch, redirects and body included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Redirects followed at most.
pub const MAX_REDIRECTS: usize = 3;
/// The bound of one DNS resolution.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a URL is refused; the message is safe to show (it never names the
/// addresses a name resolved to).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("is not a valid URL")]
    Malformed,
    #[error("must be an http or https URL")]
    Scheme,
    #[error("must not carry a user name or password")]
    Credentials,
    #[error("must name a host")]
    NoHost,
    #[error("names a {0} address, which is not allowed")]
    Address(&'static str),
    #[error("names a host that resolves to a {0} address, which is not allowed")]
    Resolves(&'static str),
    #[error("names a host that does not resolve")]
    Unresolvable,
    #[error("names a host that could not be resolved in time")]
    ResolveTimeout,
}

/// Why a permitted URL could not be fetched; the message is safe to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("the source URL {0}")]
    Refused(Refusal),
    #[error("a redirect {0}")]
    RedirectRefused(Refusal),
    #[error("the source redirected more than {MAX_REDIRECTS} times")]
    TooManyRedirects,
    #[error("the source answered a redirect without a usable Location")]
    BadRedirect,
    #[error("the source answered HTTP {0}")]
    Status(u16),
    #[error("the source's Content-Type is not image/png, image/jpeg or image/webp")]
    ContentType,
    #[error("the source is larger than {MAX_BYTES} bytes")]
    TooBig,
    #[error("fetching the source took longer than {} s", FETCH_TIMEOUT.as_secs())]
    Timeout,
    #[error("the source could not be reached")]
    Unreachable,
    #[error("reading the source failed")]
    Read,
}

/// Why an address may not be fetched from, or `None` for a public unicast address.
///
/// IPv4: this-network 0/8 (and 0.0.0.0), private 10/8, 172.16/12, 192.168/16,
/// shared (CGNAT) 100.64/10, loopback 127/8, link-local 169.254/16 (the cloud
/// metadata address 169.254.169.254 among them), IETF protocol assignments
/// 192.0.0/24, documentation 192.0.2/24, 198.51.100/24, 203.0.113/24, the 6to4
/// relay 192.88.99/24, benchmarking 198.18/15, multicast 224/4, reserved 240/4 and
/// broadcast. IPv6: only global unicast 2000::/3 is allowed, minus documentation
/// (2001:db8::/32, 3fff::/20), benchmarking (2001:2::/48), ORCHID (2001:10::/28,
/// 2001:20::/28) and Teredo (2001::/32); IPv4 embedded in IPv6 (mapped
/// ::ffff:0:0/96, translated ::ffff:0:0:0/96, compatible ::/96, NAT64
/// 64:ff9b::/96, 6to4 2002::/16) is judged as the IPv4 address it carries.
/// Everything else (loopback ::1, unspecified ::, unique-local fc00::/7 with the
/// metadata address fd00:ec2::254, link-local fe80::/10, site-local fec0::/10,
/// multicast ff00::/8, discard 100::/64, local NAT64 64:ff9b:1::/48) is refused.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    let why = match (a, b, c) {
        _ if ip == Ipv4Addr::new(169, 254, 169, 254) => "cloud metadata",
        _ if ip.is_broadcast() => "broadcast",
        (0, ..) => "unspecified",
        (10, ..) => "private",
        (100, 64..=127, _) => "shared (CGNAT)",
        (127, ..) => "loopback",
        (169, 254, _) => "link-local",
        (172, 16..=31, _) => "private",
        (192, 0, 0) => "IETF protocol",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (192, 88, 99) => "6to4 relay",
        (192, 168, _) => "private",
        (198, 18..=19, _) => "benchmarking",
        (224..=239, ..) => "multicast",
        (240..=255, ..) => "reserved",
        _ => return None,
    };
    Some(why)
}

fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        // ::ffff:a.b.c.d (mapped)
        [0, 0, 0, 0, 0, 0xffff, ..] => Some(low),
        // ::ffff:0:a.b.c.d (translated, RFC 2765)
        [0, 0, 0, 0, 0xffff, 0, ..] => Some(low),
        // ::a.b.c.d (compatible, deprecated); :: and ::1 are judged as IPv6.
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 || lo > 1 => Some(low),
        // 64:ff9b::a.b.c.d (NAT64 well-known prefix)
        [0x64, 0xff9b, 0, 0, 0, 0, ..] => Some(low),
        // 2002:AABB:CCDD::/48 (6to4)
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        )),
        _ => None,
    }
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = embedded_v4(ip) {
        return forbidden_v4(v4);
    }
    let s = ip.segments();
    let why = match s {
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_loopback() => "loopback",
        [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254] => "cloud metadata",
        [first, ..] if first & 0xfe00 == 0xfc00 => "unique-local",
        [first, ..] if first & 0xffc0 == 0xfe80 => "link-local",
        [first, ..] if first & 0xffc0 == 0xfec0 => "site-local",
        [first, ..] if first & 0xff00 == 0xff00 => "multicast",
        [0x2001, 0x0db8, ..] => "documentation",
        [0x3fff, second, ..] if second & 0xf000 == 0 => "documentation",
        [0x2001, 0x0002, 0, ..] => "benchmarking",
        [0x2001, second, ..] if second & 0xfff0 == 0x0010 || second & 0xfff0 == 0x0020 => "ORCHID",
        [0x2001, 0, ..] => "Teredo",
        // Outside global unicast 2000::/3: loopback, discard, local NAT64, reserved.
        [first, ..] if first & 0xe000 != 0x2000 => "reserved",
        _ => return None,
    };
    Some(why)
}

/// Made-up host names mapped to addresses, for tests only (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostOverrides(BTreeMap<String, IpAddr>);

impl HostOverrides {
    /// Maps each `name` (which must end in `.test`) to its address; the address
    /// rules do not apply to these names.
    pub fn for_tests<'a>(
        entries: impl IntoIterator<Item = (&'a str, IpAddr)>,
    ) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for (name, ip) in entries {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if !name.ends_with(".test") || name.len() <= ".test".len() {
                return Err(format!(
                    "host override {name:?}: only names under .test (RFC 6761) may be overridden"
                ));
            }
            map.insert(name, ip);
        }
        Ok(Self(map))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn get(&self, host: &str) -> Option<IpAddr> {
        self.0.get(host).copied()
    }
}

/// The only resolver of the fetcher's HTTP client: resolves, refuses a name with
/// any forbidden address, and returns the addresses it checked.
#[derive(Debug, Clone, Default)]
pub struct GuardedResolver {
    overrides: Arc<HostOverrides>,
}

impl GuardedResolver {
    pub fn new(overrides: HostOverrides) -> Self {
        Self {
            overrides: Arc::new(overrides),
        }
    }

    /// The checked addresses of `host` (a name, not a literal).
    pub async fn resolve_checked(&self, host: &str) -> Result<Vec<IpAddr>, Refusal> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if let Some(ip) = self.overrides.get(&host) {
            return Ok(vec![ip]);
        }
        if host == "localhost" || host.ends_with(".localhost") {
            return Err(Refusal::Resolves("loopback"));
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return match forbidden(ip) {
                Some(why) => Err(Refusal::Address(why)),
                None => Ok(vec![ip]),
            };
        }
        let found = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, 0)))
            .await
            .map_err(|_| Refusal::ResolveTimeout)?
            .map_err(|_| Refusal::Unresolvable)?;
        let mut addresses: Vec<IpAddr> = Vec::new();
        for address in found {
            let ip = address.ip();
            if let Some(why) = forbidden(ip) {
                return Err(Refusal::Resolves(why));
            }
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
        if addresses.is_empty() {
            return Err(Refusal::Unresolvable);
        }
        Ok(addresses)
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let resolver = self.clone();
        Box::pin(async move {
            let addresses = resolver.resolve_checked(name.as_str()).await?;
            let addrs: Addrs = Box::new(addresses.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// The checks a URL passes before anything is resolved: scheme, credentials, host,
/// and a literal address's kind. Returns the host name to resolve, if any.
pub fn check_static(url: &Url) -> Result<Option<String>, Refusal> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Refusal::Scheme);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Refusal::Credentials);
    }
    match url.host() {
        None => Err(Refusal::NoHost),
        Some(Host::Ipv4(ip)) => forbidden_v4(ip).map_or(Ok(None), |why| Err(Refusal::Address(why))),
        Some(Host::Ipv6(ip)) => forbidden_v6(ip).map_or(Ok(None), |why| Err(Refusal::Address(why))),
        Some(Host::Domain("")) => Err(Refusal::NoHost),
        Some(Host::Domain(name)) => Ok(Some(name.to_owned())),
    }
}

/// Bytes fetched from a source.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub bytes: Bytes,
    pub content_type: MediaType,
}

/// A setup failure of the HTTP client (TLS back end).
#[derive(Debug, thiserror::Error)]
#[error("image fetcher: {0}")]
pub struct FetcherSetupError(String);

/// Fetches `source_url`s under the rules of this module.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    resolver: GuardedResolver,
}

impl Fetcher {
    /// The production fetcher: every rule applies.
    pub fn new() -> Result<Self, FetcherSetupError> {
        Self::with_overrides(HostOverrides::default())
    }

    /// A fetcher whose resolver also knows `overrides` (tests: see the module doc).
    pub fn with_overrides(overrides: HostOverrides) -> Result<Self, FetcherSetupError> {
        if !overrides.is_empty() {
            tracing::warn!("image fetcher: test host overrides are in use");
        }
        let resolver = GuardedResolver::new(overrides);
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(resolver.clone()))
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .referer(false)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(FETCH_TIMEOUT)
            .user_agent(concat!("scaleshop-images/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FetcherSetupError(e.to_string()))?;
        Ok(Self { client, resolver })
    }

    /// Parses and checks a URL the way the POST does: the static rules, then the
    /// addresses its host resolves to. Connects to nothing.
    pub async fn check(&self, raw: &str) -> Result<Url, Refusal> {
        let url = Url::parse(raw.trim()).map_err(|_| Refusal::Malformed)?;
        if let Some(host) = check_static(&url)? {
            self.resolver.resolve_checked(&host).await?;
        }
        Ok(url)
    }

    /// Fetches `url` under every rule, bounded by [`FETCH_TIMEOUT`] in all.
    pub async fn fetch(&self, url: &Url) -> Result<Fetched, FetchError> {
        tokio::time::timeout(FETCH_TIMEOUT, self.fetch_unbounded(url))
            .await
            .map_err(|_| FetchError::Timeout)?
    }

    async fn fetch_unbounded(&self, url: &Url) -> Result<Fetched, FetchError> {
        let mut url = url.clone();
        let mut redirects = 0;
        loop {
            let refused = |r: Refusal| {
                if redirects == 0 {
                    FetchError::Refused(r)
                } else {
                    FetchError::RedirectRefused(r)
                }
            };
            check_static(&url).map_err(refused)?;
            let response = self
                .client
                .get(url.clone())
                .send()
                .await
                .map_err(|e| classify(&e, redirects))?;
            let status = response.status();
            if status.is_redirection() {
                if redirects == MAX_REDIRECTS {
                    return Err(FetchError::TooManyRedirects);
                }
                let next = response
                    .headers()
                    .get(LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|location| url.join(location).ok())
                    .ok_or(FetchError::BadRedirect)?;
                url = next;
                redirects += 1;
                continue;
            }
            if !status.is_success() {
                return Err(FetchError::Status(status.as_u16()));
            }
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .and_then(MediaType::parse)
                .ok_or(FetchError::ContentType)?;
            let declared = response
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            if declared.is_some_and(|n| n > MAX_BYTES as u64) {
                return Err(FetchError::TooBig);
            }
            let bytes = read_capped(response).await?;
            return Ok(Fetched {
                bytes,
                content_type,
            });
        }
    }
}

/// Reads the body chunk by chunk, giving up as soon as it passes [`MAX_BYTES`].
async fn read_capped(mut response: reqwest::Response) -> Result<Bytes, FetchError> {
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| {
        if e.is_timeout() {
            FetchError::Timeout
        } else {
            FetchError::Read
        }
    })? {
        if body.len() + chunk.len() > MAX_BYTES {
            return Err(FetchError::TooBig);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// A transport error: our resolver's refusal (found in the error's sources), a
/// timeout, or an unreachable source. The raw error is logged, never shown.
fn classify(error: &reqwest::Error, redirects: usize) -> FetchError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(refusal) = e.downcast_ref::<Refusal>() {
            return if redirects == 0 {
                FetchError::Refused(refusal.clone())
            } else {
                FetchError::RedirectRefused(refusal.clone())
            };
        }
        source = e.source();
    }
    tracing::info!(error = %redacted(error), "image source unreachable");
    if error.is_timeout() {
        FetchError::Timeout
    } else {
        FetchError::Unreachable
    }
}

/// The error's message without the URL (whose query the owner may want kept).
fn redacted(error: &reqwest::Error) -> String {
    let text = error.to_string();
    match error.url() {
        Some(url) => text.replace(url.as_str(), "<source>"),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn refusal(raw: &str) -> Option<Refusal> {
        match Url::parse(raw) {
            Err(_) => Some(Refusal::Malformed),
            Ok(url) => check_static(&url).err(),
        }
    }

    #[test]
    fn literal_forms_are_normalized_and_refused() {
        for raw in [
            "http://127.1",
            "http://127.0.0.1",
            "http://0x7f000001",
            "http://2130706433",
            "http://0177.0.0.1",
            "http://127.0.0.1.",
            "http://[::1]",
            "http://[::ffff:127.0.0.1]",
            "http://[::ffff:7f00:1]",
            "http://[::127.0.0.1]",
            "http://[64:ff9b::7f00:1]",
            "http://[2002:7f00:1::]",
            "http://[::ffff:0:7f00:1]",
            "http://169.254.169.254/latest/meta-data",
            "http://[fd00:ec2::254]",
            "http://[::ffff:169.254.169.254]",
            "http://10.0.0.1",
            "http://192.168.1.1",
            "http://172.16.0.1",
            "http://172.31.255.255",
            "http://100.64.0.1",
            "http://[fc00::1]",
            "http://[fe80::1]",
            "http://[fec0::1]",
            "http://0.0.0.0",
            "http://0",
            "http://[::]",
            "http://224.0.0.1",
            "http://[ff02::1]",
            "http://255.255.255.255",
            "http://240.0.0.1",
            "http://192.0.2.1",
            "http://198.18.0.1",
            "http://[2001:db8::1]",
            "http://[3fff:fff::1]",
            "http://[2001:2::1]",
            "http://[2001:20::1]",
            "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]",
            "https://[100::1]",
        ] {
            assert!(
                matches!(refusal(raw), Some(Refusal::Address(_))),
                "{raw}: {:?}",
                refusal(raw)
            );
        }
    }

    #[test]
    fn schemes_credentials_and_hosts() {
        for (raw, want) in [
            ("file:///etc/passwd", Refusal::Scheme),
            ("gopher://x", Refusal::Scheme),
            ("ftp://x", Refusal::Scheme),
            ("dict://x:11211/", Refusal::Scheme),
            ("javascript:alert(1)", Refusal::Scheme),
            ("http://user:pw@example.com/", Refusal::Credentials),
            ("not a url", Refusal::Malformed),
            ("http://", Refusal::Malformed),
        ] {
            assert_eq!(refusal(raw), Some(want), "{raw}");
        }
    }

    #[test]
    fn public_addresses_and_names_pass_the_static_checks() {
        for raw in [
            "http://93.184.215.14/x.png",
            "https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/x.png",
            "http://[::ffff:93.184.215.14]/",
            "https://images.example.com/a.jpg",
        ] {
            assert_eq!(refusal(raw), None, "{raw}");
        }
        assert_eq!(
            check_static(&Url::parse("https://Images.Example.com/a").unwrap()).unwrap(),
            Some("images.example.com".to_owned())
        );
    }

    #[tokio::test]
    async fn names_are_checked_after_resolution() {
        let fetcher = Fetcher::new().unwrap();
        for raw in [
            "http://localhost",
            "http://localhost.:8080/x",
            "http://sub.localhost/",
        ] {
            assert_eq!(
                fetcher.check(raw).await.unwrap_err(),
                Refusal::Resolves("loopback"),
                "{raw}"
            );
        }
    }

    #[tokio::test]
    async fn overrides_only_for_test_names_and_only_for_those_names() {
        assert!(HostOverrides::for_tests([("example.com", IpAddr::from([127, 0, 0, 1]))]).is_err());
        assert!(HostOverrides::for_tests([(".test", IpAddr::from([127, 0, 0, 1]))]).is_err());
        let overrides =
            HostOverrides::for_tests([("Images.Test", IpAddr::from([127, 0, 0, 1]))]).unwrap();
        let fetcher = Fetcher::with_overrides(overrides).unwrap();
        assert!(fetcher.check("http://images.test:9/x.png").await.is_ok());
        assert!(fetcher.check("http://127.0.0.1:9/x.png").await.is_err());
        assert!(fetcher.check("http://localhost:9/x.png").await.is_err());
    }

    #[test]
    fn address_table() {
        let allowed: [IpAddr; 4] = [
            [8, 8, 8, 8].into(),
            [1, 1, 1, 1].into(),
            "2606:4700::1111".parse().unwrap(),
            "::ffff:8.8.8.8".parse().unwrap(),
        ];
        assert_eq!(forbidden("3fff:1000::1".parse().unwrap()), None);
        for ip in allowed {
            assert_eq!(forbidden(ip), None, "{ip}");
        }
        assert_eq!(
            forbidden([169, 254, 169, 254].into()),
            Some("cloud metadata")
        );
        assert_eq!(
            forbidden("fd00:ec2::254".parse().unwrap()),
            Some("cloud metadata")
        );
        assert_eq!(forbidden("::1".parse().unwrap()), Some("loopback"));
        assert_eq!(
            forbidden("::ffff:10.1.2.3".parse().unwrap()),
            Some("private")
        );
    }
}
