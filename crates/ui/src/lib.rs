//! The storefront (`/`) and the operations console (`/console`).
//!
//! Both are static documents with a style sheet and a few ES modules, embedded in
//! the binary at build time (`include_bytes!`): no build chain, nothing fetched from
//! elsewhere at run time, so they work offline and in every process of a split
//! deployment. The scripts are clients of the public API (`/v1/...`, `/metrics`,
//! `/readyz`) like any other: they sign in with `POST /v1/sessions`, send the
//! bearer token, and send back the `X-Consistency-Token` of their last write. This
//! crate knows no domain crate and no database; it only serves bytes.
//!
//! Every page is served under a strict Content Security Policy (scripts, styles,
//! images and connections from this origin only; no inline script), so a product
//! name can never become a script; the scripts also build the page with DOM calls
//! (`textContent`), never by parsing HTML built from data.

use std::sync::LazyLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use scaleshop_web::ApiError;
use sha2::{Digest, Sha256};

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $type:literal) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!("../assets/", $name)),
        }
    };
}

/// Served under `/assets/{name}`.
const ASSETS: &[Asset] = &[
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("api.js", "text/javascript; charset=utf-8"),
    asset!("shop.js", "text/javascript; charset=utf-8"),
    asset!("console.js", "text/javascript; charset=utf-8"),
    asset!("icon.svg", "image/svg+xml"),
];

/// The storefront's document: every storefront path serves it, and its script
/// renders the page the path names.
const SHOP: Asset = asset!("shop.html", "text/html; charset=utf-8");
/// The operations console's document.
const CONSOLE: Asset = asset!("console.html", "text/html; charset=utf-8");

/// What a page may load: its own origin only; no inline script or style
/// attribute, no framing, no plugins; forms post nowhere else.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; \
                   form-action 'self'; frame-ancestors 'none'";

/// The storefront's paths (the script's routes).
pub const SHOP_PATHS: &[&str] = &[
    "/",
    "/products/{id}",
    "/cart",
    "/signin",
    "/signup",
    "/orders",
    "/orders/{id}",
];

/// The routes of both user interfaces. They are not part of the API document.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new();
    for path in SHOP_PATHS {
        router = router.route(path, get(shop));
    }
    router
        .route("/console", get(console))
        // Asked for by browsers on their own (an API answer has no icon link).
        .route("/favicon.ico", get(icon))
        .route("/assets/{name}", get(asset))
}

async fn shop(headers: HeaderMap) -> Response {
    serve(&SHOP, &headers, true)
}

async fn console(headers: HeaderMap) -> Response {
    serve(&CONSOLE, &headers, true)
}

async fn icon(headers: HeaderMap) -> Response {
    named("icon.svg", &headers)
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    named(&name, &headers)
}

/// The embedded file `name`, or a 404 problem document.
fn named(name: &str, headers: &HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(found) => serve(found, headers, false),
        None => ApiError::not_found()
            .detail("no such asset")
            .into_response(),
    }
}

/// The strong validator of an asset: a digest of its bytes, fixed for the build.
fn etag(asset: &Asset) -> HeaderValue {
    static TAGS: LazyLock<Vec<(&'static str, HeaderValue)>> = LazyLock::new(|| {
        ASSETS
            .iter()
            .chain([&SHOP, &CONSOLE])
            .map(|a| {
                let digest = Sha256::digest(a.body);
                let tag = format!("\"{}\"", hex::encode(&digest[..12]));
                (
                    a.name,
                    HeaderValue::from_str(&tag).unwrap_or(HeaderValue::from_static("\"0\"")),
                )
            })
            .collect()
    });
    TAGS.iter()
        .find(|(name, _)| *name == asset.name)
        .map(|(_, tag)| tag.clone())
        .unwrap_or(HeaderValue::from_static("\"0\""))
}

/// The asset, or 304 when the client's copy is current. Revalidated on every use
/// (`no-cache`): a new build's files are seen at once, an unchanged one costs a 304.
fn serve(asset: &Asset, request: &HeaderMap, document: bool) -> Response {
    let tag = etag(asset);
    let fresh = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim() == "*" || v.trim().trim_start_matches("W/") == tag);
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, tag);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if document {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("same-origin"),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(path: &str, etag: Option<&HeaderValue>) -> Response {
        let mut request = Request::get(path);
        if let Some(tag) = etag {
            request = request.header(header::IF_NONE_MATCH, tag);
        }
        router::<()>()
            .oneshot(request.body(Body::empty()).expect("request"))
            .await
            .expect("infallible")
    }

    #[tokio::test]
    async fn every_storefront_path_serves_the_document_under_the_policy() {
        for path in [
            "/",
            "/cart",
            "/signin",
            "/signup",
            "/orders",
            "/products/x",
            "/orders/y",
        ] {
            let r = get(path, None).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(
                r.headers()[header::CONTENT_TYPE],
                "text/html; charset=utf-8"
            );
            let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .expect("ascii");
            assert!(
                csp.contains("script-src 'self'") && !csp.contains("unsafe"),
                "{csp}"
            );
        }
        let r = get("/console", None).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers().contains_key(header::CONTENT_SECURITY_POLICY));
    }

    #[tokio::test]
    async fn an_asset_is_revalidated_by_its_etag() {
        let first = get("/assets/shop.js", None).await;
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(
            first.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        let tag = first.headers()[header::ETAG].clone();
        let again = get("/assets/shop.js", Some(&tag)).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(again.headers()[header::ETAG], tag);
        let icon = get("/favicon.ico", None).await;
        assert_eq!(icon.status(), StatusCode::OK);
        assert_eq!(icon.headers()[header::CONTENT_TYPE], "image/svg+xml");
        let other = get("/assets/style.css", Some(&tag)).await;
        assert_eq!(
            other.status(),
            StatusCode::OK,
            "another file's tag is not a match"
        );
    }

    #[tokio::test]
    async fn an_unknown_asset_is_a_problem_document() {
        let r = get("/assets/nope.js", None).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }

    /// Every file a document or a script names is embedded (a missing one would
    /// be a 404 and a console error in the browser).
    #[test]
    fn every_referenced_asset_is_embedded() {
        for doc in ASSETS.iter().chain([&SHOP, &CONSOLE]) {
            let text = std::str::from_utf8(doc.body).expect("utf-8");
            for (i, _) in text.match_indices("/assets/") {
                let rest = &text[i + "/assets/".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
                    .collect();
                assert!(
                    ASSETS.iter().any(|a| a.name == name),
                    "{} names /assets/{name}, which is not embedded",
                    doc.name
                );
            }
        }
    }
}
