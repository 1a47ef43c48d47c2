//! Properties of the parsers of untrusted input in the images service: image
//! headers and decoding limits, and the SSRF rules of `source_url`. Each runs a
//! bounded number of generated cases (proptest).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::io::Cursor;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb};
use proptest::prelude::*;
use scaleshop_media::fetch::{GuardedResolver, HostOverrides, Refusal, check_static, forbidden};
use scaleshop_media::process::{MAX_PIXELS, MAX_SIDE, check_dimensions, decode, sniff};
use scaleshop_testkit::images::png_declaring;
use url::{Host, Url};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---- image headers ---------------------------------------------------------------

fn sample(format: ImageFormat) -> Vec<u8> {
    let image = DynamicImage::ImageRgb8(ImageBuffer::from_fn(16, 12, |x, y| {
        Rgb([(x * 16) as u8, (y * 20) as u8, 90])
    }));
    let mut out = Cursor::new(Vec::new());
    image
        .write_to(&mut out, format)
        .expect("a small image encodes");
    out.into_inner()
}

const SIGNATURES: [&[u8]; 4] = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
];

/// A decoded image is within the limits and of the sniffed type.
fn assert_decoded_within_limits(bytes: &[u8]) -> Result<(), TestCaseError> {
    match decode(bytes) {
        Ok((media_type, image)) => {
            prop_assert_eq!(sniff(bytes), Some(media_type));
            prop_assert!(image.width() >= 1 && image.height() >= 1);
            prop_assert!(image.width() <= MAX_SIDE && image.height() <= MAX_SIDE);
            prop_assert!(u64::from(image.width()) * u64::from(image.height()) <= MAX_PIXELS);
        }
        Err(e) => prop_assert!(!e.0.is_empty(), "a failure has a reason"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    /// Arbitrary bytes, behind a known signature or not: sniffing and decoding
    /// never panic, and anything not sniffed as PNG, JPEG or WebP is refused.
    #[test]
    fn arbitrary_bytes_never_panic(signature in prop::sample::select(SIGNATURES.to_vec()), tail in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = signature.to_vec();
        bytes.extend_from_slice(&tail);
        if sniff(&bytes).is_none() {
            prop_assert!(decode(&bytes).is_err());
        }
        assert_decoded_within_limits(&bytes)?;
    }

    /// Whatever size a PNG header declares, one over the limits (or empty) is
    /// refused from the header, before any pixel buffer is allocated.
    #[test]
    fn declared_sizes_over_the_limits_are_refused(
        width in prop_oneof![0u32..64, MAX_SIDE - 2..MAX_SIDE + 2, any::<u32>()],
        height in prop_oneof![0u32..64, MAX_SIDE - 2..MAX_SIDE + 2, any::<u32>()],
        color in prop::sample::select(vec![0u8, 2, 3, 4, 6, 1, 7]),
        depth in prop::sample::select(vec![1u8, 2, 4, 8, 16, 3]),
    ) {
        let result = decode(&png_declaring(width, height, color, depth));
        if check_dimensions(width, height).is_err() {
            let e = result.expect_err("over the limits");
            prop_assert!(
                e.0.contains("limit") || e.0.contains("empty") || e.0.contains("decoded"),
                "{}", e.0
            );
        }
        // Within the limits the stream is too short: refused too, never a panic.
        prop_assert!(decode(&png_declaring(width, height, color, depth)).is_err());
    }

    /// Valid PNG, JPEG and WebP files with bytes changed, removed or cut:
    /// decoding never panics and never yields an image over the limits.
    #[test]
    fn corrupted_images_never_panic(
        format in prop::sample::select(vec![ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP]),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..4), 1..8),
    ) {
        let mut bytes = sample(format);
        for (at, byte, kind) in edits {
            let len = bytes.len();
            if len == 0 {
                break;
            }
            match kind {
                0 => bytes[at % len] = byte,
                1 => { bytes.remove(at % len); }
                2 => bytes.insert(at % len, byte),
                _ => bytes.truncate(at % len),
            }
        }
        assert_decoded_within_limits(&bytes)?;
    }
}

// ---- fetch URLs --------------------------------------------------------------------

/// Address blocks that must never be fetched from: (first address, prefix length).
const FORBIDDEN_V4: [([u8; 4], u32); 16] = [
    ([0, 0, 0, 0], 8),
    ([10, 0, 0, 0], 8),
    ([100, 64, 0, 0], 10),
    ([127, 0, 0, 0], 8),
    ([169, 254, 0, 0], 16),
    ([172, 16, 0, 0], 12),
    ([192, 0, 0, 0], 24),
    ([192, 0, 2, 0], 24),
    ([192, 88, 99, 0], 24),
    ([192, 168, 0, 0], 16),
    ([198, 18, 0, 0], 15),
    ([198, 51, 100, 0], 24),
    ([203, 0, 113, 0], 24),
    ([224, 0, 0, 0], 4),
    ([240, 0, 0, 0], 4),
    ([169, 254, 169, 254], 32),
];

fn forbidden_v4() -> impl Strategy<Value = Ipv4Addr> {
    (prop::sample::select(FORBIDDEN_V4.to_vec()), any::<u32>()).prop_map(|((base, len), bits)| {
        let base = u32::from_be_bytes(base);
        let host = if len == 32 {
            0
        } else {
            bits & (u32::MAX >> len)
        };
        Ipv4Addr::from(base | host)
    })
}

/// One number in one of the bases the URL parser takes for IPv4 parts.
fn number(n: u32, base: u8, upper: bool) -> String {
    match base {
        0 => n.to_string(),
        1 if upper => format!("0X{n:X}"),
        1 => format!("0x{n:x}"),
        _ => format!("0{n:o}"),
    }
}

/// How an IPv4 address can be spelled in a URL host.
#[derive(Debug, Clone)]
struct Spelling {
    parts: u8,
    bases: [u8; 4],
    upper: bool,
    trailing_dot: bool,
    /// 0: an IPv4 host; else one of the IPv6 forms that embed it.
    v6_form: u8,
    v6_noise: u16,
}

fn spelling() -> impl Strategy<Value = Spelling> {
    (
        1u8..=4,
        [0u8..3, 0u8..3, 0u8..3, 0u8..3],
        any::<bool>(),
        any::<bool>(),
        0u8..8,
        any::<u16>(),
    )
        .prop_map(
            |(parts, bases, upper, trailing_dot, v6_form, v6_noise)| Spelling {
                parts,
                bases,
                upper,
                trailing_dot,
                v6_form,
                v6_noise,
            },
        )
}

fn spell(ip: Ipv4Addr, s: &Spelling) -> String {
    let [a, b, c, d] = ip.octets().map(u32::from);
    let n = u32::from(ip);
    let v4 = {
        let values: Vec<u32> = match s.parts {
            1 => vec![n],
            2 => vec![a, n & 0x00ff_ffff],
            3 => vec![a, b, n & 0xffff],
            _ => vec![a, b, c, d],
        };
        let mut text = values
            .iter()
            .zip(s.bases)
            .map(|(v, base)| number(*v, base, s.upper))
            .collect::<Vec<_>>()
            .join(".");
        if s.trailing_dot {
            text.push('.');
        }
        text
    };
    let hi = n >> 16;
    let lo = n & 0xffff;
    let hex = |text: String| if s.upper { text.to_uppercase() } else { text };
    match s.v6_form {
        0 => v4,
        1 => format!("[::ffff:{a}.{b}.{c}.{d}]"),
        2 => hex(format!("[::ffff:{hi:x}:{lo:x}]")),
        3 => hex(format!("[0:0:0:0:0:ffff:{hi:04x}:{lo:04x}]")),
        4 => hex(format!("[::ffff:0:{hi:x}:{lo:x}]")),
        5 => hex(format!("[64:ff9b::{hi:x}:{lo:x}]")),
        6 => hex(format!("[2002:{hi:x}:{lo:x}:{:x}::1]", s.v6_noise)),
        _ => format!("[64:ff9b::{a}.{b}.{c}.{d}]"),
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// A loopback, private, link-local, metadata or otherwise reserved IPv4
    /// address is refused in every spelling the URL parser accepts: dotted,
    /// shortened, one number, hex, octal, a trailing dot, and embedded in IPv6
    /// (mapped, translated, NAT64, 6to4).
    #[test]
    fn forbidden_addresses_are_refused_in_any_spelling(ip in forbidden_v4(), s in spelling(), port in prop::option::of(1u16..), path in "(/[a-z.]{0,8}){0,2}") {
        let host = spell(ip, &s);
        let port = port.map(|p| format!(":{p}")).unwrap_or_default();
        for scheme in ["http", "https", "HTTP"] {
            let raw = format!("{scheme}://{host}{port}{path}");
            let url = Url::parse(&raw).map_err(|e| TestCaseError::fail(format!("{raw}: {e}")))?;
            prop_assert!(matches!(check_static(&url), Err(Refusal::Address(_))), "{raw} -> {:?}", check_static(&url));
        }
    }

    /// Any IPv4 address, in any spelling, is judged as that address.
    #[test]
    fn every_spelling_is_judged_as_the_address(n in any::<u32>(), s in spelling()) {
        let ip = Ipv4Addr::from(n);
        let raw = format!("http://{}/x.png", spell(ip, &s));
        let url = Url::parse(&raw).map_err(|e| TestCaseError::fail(format!("{raw}: {e}")))?;
        if s.v6_form == 0 {
            prop_assert_eq!(url.host(), Some(Host::Ipv4(ip)));
        }
        let expected = forbidden(IpAddr::V4(ip));
        match check_static(&url) {
            Ok(None) => prop_assert_eq!(expected, None, "{} allowed", raw),
            Err(Refusal::Address(why)) => prop_assert_eq!(Some(why), expected, "{}", raw),
            other => prop_assert!(false, "{raw} -> {other:?}"),
        }
    }

    /// The standard library's own classification agrees: what it calls
    /// loopback, private, link-local, unspecified, multicast, broadcast or
    /// documentation is refused; an IPv4-mapped IPv6 address is judged as the
    /// IPv4 it carries.
    #[test]
    fn the_standard_library_classification_agrees(n in any::<u32>(), m in any::<u128>()) {
        let v4 = Ipv4Addr::from(n);
        if v4.is_loopback() || v4.is_private() || v4.is_link_local() || v4.is_unspecified()
            || v4.is_multicast() || v4.is_broadcast() || v4.is_documentation()
        {
            prop_assert!(forbidden(IpAddr::V4(v4)).is_some(), "{v4}");
        }
        prop_assert_eq!(forbidden(IpAddr::V6(v4.to_ipv6_mapped())), forbidden(IpAddr::V4(v4)));
        let v6 = Ipv6Addr::from(m);
        if v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || v6.is_unique_local()
            || v6.is_unicast_link_local()
        {
            prop_assert!(forbidden(IpAddr::V6(v6)).is_some(), "{v6}");
        }
        if let Some(inner) = v6.to_ipv4_mapped() {
            prop_assert_eq!(forbidden(IpAddr::V6(v6)), forbidden(IpAddr::V4(inner)));
        }
        // Outside global unicast (2000::/3), only an embedded public IPv4 may pass.
        if m >> 125 != 1 && forbidden(IpAddr::V6(v6)).is_none() {
            prop_assert!(v6.to_ipv4_mapped().is_some() || (m >> 32) == 0xffff_0000 || (m >> 96) == 0x0064_ff9b || (m >> 32) == 0, "{v6}");
        }
    }

    /// Arbitrary URL text: the checks never panic; what passes is http(s), has no
    /// credentials, and names a host that is a public address or a name.
    #[test]
    fn arbitrary_urls_never_panic(raw in prop_oneof![".{0,60}", "(https?|ftp|file)://[^/]{0,30}(/.{0,10})?"]) {
        if let Ok(url) = Url::parse(&raw) {
            match check_static(&url) {
                Ok(None) => match url.host() {
                    Some(Host::Ipv4(ip)) => prop_assert!(forbidden(IpAddr::V4(ip)).is_none()),
                    Some(Host::Ipv6(ip)) => prop_assert!(forbidden(IpAddr::V6(ip)).is_none()),
                    other => prop_assert!(false, "{raw}: {other:?}"),
                },
                Ok(Some(name)) => {
                    prop_assert!(matches!(url.scheme(), "http" | "https"));
                    prop_assert!(url.username().is_empty() && url.password().is_none());
                    prop_assert!(!name.is_empty());
                    prop_assert!(name.parse::<IpAddr>().is_err());
                }
                Err(_) => {}
            }
        }
    }

    /// `localhost` and every name under it are refused without asking DNS, in any
    /// letter case, with or without the root's trailing dot; a literal address
    /// given as a name is judged like the literal.
    #[test]
    fn localhost_names_are_refused(labels in prop::collection::vec("[a-zA-Z0-9-]{1,10}", 0..3), case in prop::collection::vec(any::<bool>(), 9), dot in any::<bool>(), n in any::<u32>()) {
        let local: String = "localhost"
            .chars()
            .zip(case)
            .map(|(c, up)| if up { c.to_ascii_uppercase() } else { c })
            .collect();
        let mut name = labels.iter().map(|l| format!("{l}.")).collect::<String>() + &local;
        if dot {
            name.push('.');
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let resolver = GuardedResolver::new(HostOverrides::default());
        prop_assert_eq!(runtime.block_on(resolver.resolve_checked(&name)), Err(Refusal::Resolves("loopback")));
        let ip = Ipv4Addr::from(n);
        let expected = match forbidden(IpAddr::V4(ip)) {
            Some(why) => Err(Refusal::Address(why)),
            None => Ok(vec![IpAddr::V4(ip)]),
        };
        prop_assert_eq!(runtime.block_on(resolver.resolve_checked(&ip.to_string())), expected);
    }
}
