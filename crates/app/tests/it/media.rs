//! The images routes of api.md, over HTTP on both backends: uploads of PNG, JPEG and
//! WebP made here with the `image` crate, exact variant sizes, corrupt files and
//! decompression bombs failing the image (never the server), ETag/304 and caching
//! headers, the SSRF-safe fetcher (a local test server reached through the injected
//! resolver; redirects, sizes, types and time refused), an SSRF table refused at the
//! POST without connecting anywhere, and S3 storage against moto's server.
//!
//! Every wait is bounded; all traffic goes to 127.0.0.1.

use std::io::Cursor;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb, Rgba};
use reqwest::Response;

use scaleshop_contracts::{Contract, ImageProcessed};
use scaleshop_media::HostOverrides;
use serde_json::{Value, json};

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(60);
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

// ---- helpers -------------------------------------------------------------------

/// An image of `width` x `height` in `format` (a gradient, with alpha if asked).
fn picture(width: u32, height: u32, format: ImageFormat, alpha: bool) -> Vec<u8> {
    let image = if alpha {
        DynamicImage::ImageRgba8(ImageBuffer::from_fn(width, height, |x, y| {
            Rgba([(x % 251) as u8, (y % 241) as u8, ((x + y) % 239) as u8, 180])
        }))
    } else {
        DynamicImage::ImageRgb8(ImageBuffer::from_fn(width, height, |x, y| {
            Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 239) as u8])
        }))
    };
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// An image of random pixels (does not compress): about `3 * width * height` bytes.
fn noisy_png(width: u32, height: u32) -> Vec<u8> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let image = DynamicImage::ImageRgb8(ImageBuffer::from_fn(width, height, |_, _| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let [a, b, c, ..] = state.to_le_bytes();
        Rgb([a, b, c])
    }));
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

use scaleshop_testkit::images::bomb_png;

async fn body(response: Response, status: u16) -> Value {
    let got = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert_eq!(got, status, "body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn text(value: &Value, key: &str) -> String {
    value[key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {value}"))
        .to_owned()
}

/// A new product (asserts 201); returns its id.
async fn product(app: &TestApp, admin: &str) -> String {
    let sku = format!("img-{}", uuid::Uuid::now_v7().simple());
    let response = app
        .post("/v1/products")
        .bearer_auth(admin)
        .json(&json!({
            "sku": sku, "name": "Pictured", "price_cents": 1000, "currency": "EUR",
            "initial_stock": 1,
        }))
        .send()
        .await
        .unwrap();
    text(&body(response, 201).await, "id")
}

async fn upload(
    app: &TestApp,
    admin: &str,
    product_id: &str,
    content_type: &str,
    bytes: Vec<u8>,
) -> Response {
    app.post(&format!("/v1/products/{product_id}/images"))
        .bearer_auth(admin)
        .header("content-type", content_type)
        .body(bytes)
        .send()
        .await
        .unwrap()
}

/// Uploads (asserts 202 and the Image shape); returns the image id.
async fn accepted(response: Response, product_id: &str) -> String {
    let location = header(&response, "location");
    assert!(header(&response, "x-consistency-token").is_some());
    let image = body(response, 202).await;
    let id = text(&image, "id");
    assert_eq!(
        image,
        json!({"id": id, "product_id": product_id, "status": "processing", "variants": [], "error": null})
    );
    assert_eq!(
        location.as_deref(),
        Some(format!("/v1/images/{id}").as_str())
    );
    id
}

async fn from_url(app: &TestApp, admin: &str, product_id: &str, url: &str) -> Response {
    app.post(&format!("/v1/products/{product_id}/images"))
        .bearer_auth(admin)
        .json(&json!({ "source_url": url }))
        .send()
        .await
        .unwrap()
}

async fn image(app: &TestApp, id: &str) -> Value {
    body(
        app.get(&format!("/v1/images/{id}")).send().await.unwrap(),
        200,
    )
    .await
}

/// Waits until the image leaves `processing`; returns it.
async fn settled(app: &TestApp, id: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let image = image(app, id).await;
        if image["status"] != "processing" {
            return image;
        }
        assert!(Instant::now() < deadline, "image {id} still processing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (name, width, height, content type) of each variant, and checks each URL.
fn variants(image: &Value) -> Vec<(String, u64, u64, String)> {
    let id = text(image, "id");
    image["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let name = text(v, "name");
            assert_eq!(text(v, "url"), format!("/v1/images/{id}/{name}"));
            (
                name,
                v["width"].as_u64().unwrap(),
                v["height"].as_u64().unwrap(),
                text(v, "content_type"),
            )
        })
        .collect()
}

fn variant(name: &str, width: u64, height: u64, content_type: &str) -> (String, u64, u64, String) {
    (name.to_owned(), width, height, content_type.to_owned())
}

/// Downloads a variant and decodes it; returns (content type, width, height, bytes).
async fn download(app: &TestApp, id: &str, name: &str) -> (String, u32, u32, Vec<u8>) {
    let response = app
        .get(&format!("/v1/images/{id}/{name}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "variant {name}");
    let content_type = header(&response, "content-type").unwrap();
    let bytes = response.bytes().await.unwrap().to_vec();
    let decoded = image::load_from_memory(&bytes).unwrap();
    (content_type, decoded.width(), decoded.height(), bytes)
}

async fn events_of(app: &TestApp, admin: &str, kind: &str) -> Vec<Value> {
    let mut found = Vec::new();
    let mut path = "/v1/events?limit=100".to_owned();
    loop {
        let page = body(app.get(&path).bearer_auth(admin).send().await.unwrap(), 200).await;
        for event in page["items"].as_array().unwrap() {
            if event["type"] == kind {
                found.push(event.clone());
            }
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/events?limit=100&cursor={cursor}"),
            None => return found,
        }
    }
}

// ---- uploads -------------------------------------------------------------------

both!(
    formats_and_exact_sizes,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let product_id = product(&app, &admin).await;
        let cases = [
            (ImageFormat::Png, "image/png", 2000, 1000, true, "image/png"),
            (
                ImageFormat::Jpeg,
                "image/jpeg",
                2000,
                1000,
                false,
                "image/jpeg",
            ),
            (
                ImageFormat::WebP,
                "image/webp",
                1000,
                2000,
                false,
                "image/jpeg",
            ),
            (
                ImageFormat::WebP,
                "image/webp",
                2000,
                1000,
                true,
                "image/png",
            ),
            (ImageFormat::Png, "image/png", 100, 50, false, "image/png"),
        ];
        let mut ids = Vec::new();
        for (format, content_type, width, height, alpha, _) in cases {
            let bytes = picture(width, height, format, alpha);
            let response = upload(&app, &admin, &product_id, content_type, bytes).await;
            ids.push(accepted(response, &product_id).await);
        }
        for (id, (format, _, width, height, _, out)) in ids.iter().zip(cases) {
            let image = settled(&app, id).await;
            assert_eq!(image["status"], "ready", "{format:?}: {image}");
            assert_eq!(image["error"], Value::Null);
            let (thumb, medium) = match (width, height) {
                (2000, 1000) => ((128, 64), (512, 256)),
                (1000, 2000) => ((64, 128), (256, 512)),
                // Smaller than both: never scaled up.
                _ => ((100, 50), (100, 50)),
            };
            assert_eq!(
                variants(&image),
                [
                    variant("thumb", thumb.0, thumb.1, out),
                    variant("medium", medium.0, medium.1, out)
                ],
                "{format:?} {width}x{height}"
            );
            for (name, (w, h)) in [("thumb", thumb), ("medium", medium)] {
                let (content_type, dw, dh, _) = download(&app, id, name).await;
                assert_eq!(content_type, out);
                assert_eq!((u64::from(dw), u64::from(dh)), (w, h), "{name}");
            }
        }
        // The product lists its images, in the order they were added.
        let product = body(
            app.get(&format!("/v1/products/{product_id}"))
                .send()
                .await
                .unwrap(),
            200,
        )
        .await;
        let listed: Vec<String> = product["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| text(i, "id"))
            .collect();
        assert_eq!(listed, ids);
        assert_eq!(product["images"][0], image(&app, &ids[0]).await);
        // One image.processed per image, with the outcome.
        let events = events_of(&app, &admin, ImageProcessed::NAME).await;
        for id in &ids {
            let mine: Vec<_> = events.iter().filter(|e| e["aggregate_id"] == *id).collect();
            assert_eq!(mine.len(), 1, "{id}");
            assert_eq!(mine[0]["data"]["status"], "ready");
            assert_eq!(mine[0]["data"]["product_id"], product_id.as_str());
            assert_eq!(mine[0]["data"]["variants"].as_array().unwrap().len(), 2);
        }
    }
);

both!(
    corrupt_files_and_bombs_fail_the_image,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let product_id = product(&app, &admin).await;
        let mut truncated = picture(300, 200, ImageFormat::Png, false);
        truncated.truncate(truncated.len() / 2);
        let cases: [(&str, Vec<u8>, &str); 5] = [
            (
                "image/png",
                b"this is not an image".to_vec(),
                "not a PNG, JPEG or WebP",
            ),
            (
                "image/jpeg",
                vec![0xFF, 0xD8, 0xFF, 0xE0, 0, 0, 1, 2, 3],
                "decoded",
            ),
            ("image/png", truncated, "decoded"),
            ("image/png", bomb_png(100_000, 100_000), "over the limit"),
            ("image/png", bomb_png(11_000, 11_000), "over the limit"),
        ];
        for (content_type, bytes, reason) in cases {
            let id = accepted(
                upload(&app, &admin, &product_id, content_type, bytes).await,
                &product_id,
            )
            .await;
            let image = settled(&app, &id).await;
            assert_eq!(image["status"], "failed", "{image}");
            assert_eq!(image["variants"], json!([]));
            let error = text(&image, "error");
            assert!(error.contains(reason), "{reason:?} not in {error:?}");
            let response = app
                .get(&format!("/v1/images/{id}/thumb"))
                .send()
                .await
                .unwrap();
            problem(response, 404).await;
            let events = events_of(&app, &admin, ImageProcessed::NAME).await;
            let event = events
                .iter()
                .find(|e| e["aggregate_id"] == id.as_str())
                .unwrap();
            assert_eq!(event["data"]["status"], "failed");
            assert_eq!(event["data"]["error"], error.as_str());
        }
        // The server is healthy and still processes good images.
        let response = app.get("/healthz").send().await.unwrap();
        assert_eq!(response.status(), 200);
        let id = accepted(
            upload(
                &app,
                &admin,
                &product_id,
                "image/jpeg",
                picture(640, 480, ImageFormat::Jpeg, false),
            )
            .await,
            &product_id,
        )
        .await;
        assert_eq!(settled(&app, &id).await["status"], "ready");
    }
);

both!(
    variants_are_cacheable,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let product_id = product(&app, &admin).await;
        let id = accepted(
            upload(
                &app,
                &admin,
                &product_id,
                "image/png",
                picture(600, 400, ImageFormat::Png, false),
            )
            .await,
            &product_id,
        )
        .await;
        assert_eq!(settled(&app, &id).await["status"], "ready");
        let path = format!("/v1/images/{id}/medium");
        let response = app.get(&path).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "content-type").as_deref(),
            Some("image/png")
        );
        assert_eq!(
            header(&response, "cache-control").as_deref(),
            Some(IMMUTABLE)
        );
        let etag = header(&response, "etag").unwrap();
        assert!(
            etag.starts_with('"') && etag.ends_with('"') && etag.len() > 20,
            "strong: {etag}"
        );
        let bytes = response.bytes().await.unwrap();
        // A strong ETag is a content hash: the same bytes, the same tag, every time.
        let again = app.get(&path).send().await.unwrap();
        assert_eq!(header(&again, "etag").as_deref(), Some(etag.as_str()));
        assert_eq!(again.bytes().await.unwrap(), bytes);
        for (if_none_match, status) in [
            (etag.clone(), 304),
            (format!("W/{etag}"), 304),
            (format!("\"nope\", {etag}"), 304),
            ("*".to_owned(), 304),
            ("\"nope\"".to_owned(), 200),
        ] {
            let response = app
                .get(&path)
                .header("if-none-match", &if_none_match)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), status, "{if_none_match}");
            assert_eq!(header(&response, "etag").as_deref(), Some(etag.as_str()));
            assert_eq!(
                header(&response, "cache-control").as_deref(),
                Some(IMMUTABLE)
            );
            if status == 304 {
                assert!(response.bytes().await.unwrap().is_empty());
            }
        }
        let thumb = app
            .get(&format!("/v1/images/{id}/thumb"))
            .send()
            .await
            .unwrap();
        assert_ne!(header(&thumb, "etag").as_deref(), Some(etag.as_str()));
        for missing in [
            format!("/v1/images/{id}/original"),
            format!("/v1/images/{id}/large"),
            format!("/v1/images/{}/thumb", uuid::Uuid::now_v7()),
            "/v1/images/not-a-uuid/thumb".to_owned(),
            "/v1/images/not-a-uuid".to_owned(),
            format!("/v1/images/{}", uuid::Uuid::now_v7()),
        ] {
            problem(app.get(&missing).send().await.unwrap(), 404).await;
        }
    }
);

both!(
    upload_rules,
    [sqlite, postgres, split],
    |app: TestApp| async move {
        let admin = app.admin_token().await;
        let product_id = product(&app, &admin).await;
        let path = format!("/v1/products/{product_id}/images");
        let png = picture(64, 64, ImageFormat::Png, false);
        // Who may add images.
        let response = app
            .post(&path)
            .header("content-type", "image/png")
            .body(png.clone())
            .send()
            .await
            .unwrap();
        problem(response, 401).await;
        let (_, customer) = app
            .customer(&format!("c{}@example.com", uuid::Uuid::now_v7().simple()))
            .await;
        problem(
            upload(&app, &customer, &product_id, "image/png", png.clone()).await,
            403,
        )
        .await;
        // Which product.
        let unknown = uuid::Uuid::now_v7().to_string();
        problem(
            upload(&app, &admin, &unknown, "image/png", png.clone()).await,
            404,
        )
        .await;
        problem(
            upload(&app, &admin, "not-a-uuid", "image/png", png.clone()).await,
            404,
        )
        .await;
        problem(
            from_url(&app, &admin, &unknown, "https://example.com/a.png").await,
            404,
        )
        .await;
        // What body.
        problem(
            upload(&app, &admin, &product_id, "image/gif", png.clone()).await,
            415,
        )
        .await;
        problem(
            upload(&app, &admin, &product_id, "text/plain", png.clone()).await,
            415,
        )
        .await;
        let p = problem(
            upload(&app, &admin, &product_id, "image/png", Vec::new()).await,
            422,
        )
        .await;
        assert_eq!(error_fields(&p), ["body"]);
        let p = problem(
            upload(
                &app,
                &admin,
                &product_id,
                "application/json",
                b"{}".to_vec(),
            )
            .await,
            422,
        )
        .await;
        assert_eq!(error_fields(&p), ["source_url"]);
        let p = problem(
            upload(
                &app,
                &admin,
                &product_id,
                "application/json",
                br#"{"source_url": "https://example.com/a.png", "status": "ready"}"#.to_vec(),
            )
            .await,
            422,
        )
        .await;
        assert_eq!(error_fields(&p), ["status"]);
        let p = problem(
            upload(
                &app,
                &admin,
                &product_id,
                "application/json",
                br#"{"source_url": 5}"#.to_vec(),
            )
            .await,
            422,
        )
        .await;
        assert_eq!(error_fields(&p), ["source_url"]);
        let too_long = json!({"source_url": format!("https://example.com/{}", "a".repeat(2100))});
        let p = problem(
            upload(
                &app,
                &admin,
                &product_id,
                "application/json",
                too_long.to_string().into_bytes(),
            )
            .await,
            422,
        )
        .await;
        assert_eq!(error_fields(&p), ["source_url"]);
        problem(
            upload(
                &app,
                &admin,
                &product_id,
                "application/json",
                b"{not json".to_vec(),
            )
            .await,
            400,
        )
        .await;
        // 10 MiB on this route (over the 1 MiB of the rest of the API) ...
        let mut big = noisy_png(800, 800);
        assert!(big.len() > 1024 * 1024, "{}", big.len());
        let id = accepted(
            upload(&app, &admin, &product_id, "image/png", big.clone()).await,
            &product_id,
        )
        .await;
        assert_eq!(settled(&app, &id).await["status"], "ready");
        big.resize(10 * 1024 * 1024 + 1, 0);
        let p = problem(
            upload(&app, &admin, &product_id, "image/png", big).await,
            413,
        )
        .await;
        assert_eq!(p["type"], "/problems/payload-too-large");
        // ... for files: JSON keeps 1 MiB, here as on the rest of the API.
        let long_url = format!(
            "{{\"source_url\": \"https://example.com/{}\"}}",
            "x".repeat(2 * 1024 * 1024)
        );
        let response = upload(
            &app,
            &admin,
            &product_id,
            "application/json",
            long_url.into_bytes(),
        )
        .await;
        problem(response, 413).await;
        // ... and the rest keeps 1 MiB.
        let response = app
            .post("/v1/products")
            .bearer_auth(&admin)
            .header("content-type", "application/json")
            .body(format!("{{\"sku\": \"{}\"}}", "x".repeat(2 * 1024 * 1024)))
            .send()
            .await
            .unwrap();
        problem(response, 413).await;
    }
);

// ---- fetching --------------------------------------------------------------------

/// A server on 127.0.0.1 standing in for the internet.
struct Origin {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn origin() -> Origin {
    use axum::Router;
    use axum::body::Body;
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::get;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let png = picture(800, 600, ImageFormat::Png, false);
    let jpeg = picture(1024, 768, ImageFormat::Jpeg, false);
    fn redirect(to: String) -> axum::response::Response {
        (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
    }
    let app = Router::new()
        .route(
            "/ok.png",
            get(
                move || async move { ([(header::CONTENT_TYPE, "image/png")], png).into_response() },
            ),
        )
        .route(
            "/ok.jpg",
            get(move || async move {
                ([(header::CONTENT_TYPE, "image/jpeg; charset=binary")], jpeg).into_response()
            }),
        )
        .route(
            "/hop",
            get(move || async move { redirect("/ok.png".to_owned()) }),
        )
        .route(
            "/hop3",
            get(move || async move { redirect("/hop2".to_owned()) }),
        )
        .route(
            "/hop2",
            get(move || async move { redirect("/hop1".to_owned()) }),
        )
        .route(
            "/hop1",
            get(move || async move { redirect("/ok.jpg".to_owned()) }),
        )
        .route(
            "/hop4",
            get(move || async move { redirect("/hop3".to_owned()) }),
        )
        .route(
            "/to-loopback",
            get(move || async move { redirect(format!("http://127.0.0.1:{port}/ok.png")) }),
        )
        .route(
            "/to-mapped",
            get(
                move || async move { redirect(format!("http://[::ffff:127.0.0.1]:{port}/ok.png")) },
            ),
        )
        .route(
            "/to-localhost",
            get(move || async move { redirect(format!("http://localhost:{port}/ok.png")) }),
        )
        .route(
            "/to-metadata",
            get(|| async { redirect("http://169.254.169.254/latest/meta-data/".to_owned()) }),
        )
        .route(
            "/to-file",
            get(|| async { redirect("file:///etc/passwd".to_owned()) }),
        )
        .route(
            "/big-declared",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "image/png")],
                    vec![0u8; 11 * 1024 * 1024],
                )
                    .into_response()
            }),
        )
        .route(
            "/big-streamed",
            get(|| async {
                let chunks = (0..12).map(|_| {
                    Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(vec![
                        0u8;
                        1024 * 1024
                    ]))
                });
                (
                    [(header::CONTENT_TYPE, "image/png")],
                    Body::from_stream(futures::stream::iter(chunks)),
                )
                    .into_response()
            }),
        )
        .route(
            "/page.html",
            get(|| async {
                ([(header::CONTENT_TYPE, "text/html")], "<html></html>").into_response()
            }),
        )
        .route(
            "/untyped",
            get(|| async { vec![1u8, 2, 3].into_response() }),
        )
        .route(
            "/missing.png",
            get(|| async { StatusCode::NOT_FOUND.into_response() }),
        )
        .route(
            "/fake.png",
            get(|| async {
                ([(header::CONTENT_TYPE, "image/png")], "not really a png").into_response()
            }),
        )
        .route(
            "/slow.png",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(20)).await;
                ([(header::CONTENT_TYPE, "image/png")], "late").into_response()
            }),
        );
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Origin { port, task }
}

/// The app with `images.test` resolving to 127.0.0.1 (the test seam).
async fn app_with_origin(backend: Backend) -> TestApp {
    fixture_with(backend, |c| {
        c.image_fetch_test_hosts =
            HostOverrides::for_tests([("images.test", IpAddr::V4(Ipv4Addr::LOCALHOST))]).unwrap();
    })
    .await
}

mod fetching {
    use super::*;

    /// The medium variant's (width, height, content type), or a part of the reason.
    type Outcome = Result<(u64, u64, &'static str), &'static str>;

    async fn run(backend: Backend) {
        let app = app_with_origin(backend).await;
        let origin = origin().await;
        let base = format!("http://images.test:{}", origin.port);
        let admin = app.admin_token().await;
        let product_id = product(&app, &admin).await;
        let cases: [(&str, Outcome); 15] = [
            ("/ok.png", Ok((512, 384, "image/png"))),
            ("/ok.jpg", Ok((512, 384, "image/jpeg"))),
            ("/hop", Ok((512, 384, "image/png"))),
            ("/hop3", Ok((512, 384, "image/jpeg"))),
            ("/hop4", Err("redirected more than 3 times")),
            ("/to-loopback", Err("a redirect names a loopback address")),
            ("/to-mapped", Err("a redirect names a loopback address")),
            (
                "/to-localhost",
                Err("a redirect names a host that resolves to a loopback address"),
            ),
            (
                "/to-metadata",
                Err("a redirect names a cloud metadata address"),
            ),
            ("/to-file", Err("a redirect must be an http or https URL")),
            ("/big-declared", Err("larger than 10485760 bytes")),
            ("/big-streamed", Err("larger than 10485760 bytes")),
            (
                "/page.html",
                Err("Content-Type is not image/png, image/jpeg or image/webp"),
            ),
            ("/untyped", Err("Content-Type is not")),
            ("/missing.png", Err("answered HTTP 404")),
        ];
        let mut ids = Vec::new();
        for (path, _) in &cases {
            let response = from_url(&app, &admin, &product_id, &format!("{base}{path}")).await;
            ids.push(accepted(response, &product_id).await);
        }
        for (id, (path, want)) in ids.iter().zip(cases) {
            let image = settled(&app, id).await;
            match want {
                Ok((w, h, content_type)) => {
                    assert_eq!(image["status"], "ready", "{path}: {image}");
                    let thumb_h = (h * 128 + w / 2) / w;
                    assert_eq!(
                        variants(&image),
                        [
                            variant("thumb", 128, thumb_h, content_type),
                            variant("medium", w, h, content_type)
                        ],
                        "{path}"
                    );
                    let (_, dw, dh, _) = download(&app, id, "medium").await;
                    assert_eq!((u64::from(dw), u64::from(dh)), (w, h));
                }
                Err(reason) => {
                    assert_eq!(image["status"], "failed", "{path}: {image}");
                    let error = text(&image, "error");
                    assert!(
                        error.contains(reason),
                        "{path}: {reason:?} not in {error:?}"
                    );
                    assert!(!error.contains("127.0.0.1"), "{error}");
                }
            }
        }
        // Bytes that claim to be PNG but are not: the decoder's turn.
        let id = accepted(
            from_url(&app, &admin, &product_id, &format!("{base}/fake.png")).await,
            &product_id,
        )
        .await;
        let image = settled(&app, &id).await;
        assert_eq!(image["status"], "failed");
        assert!(
            text(&image, "error").contains("not a PNG, JPEG or WebP"),
            "{image}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        run(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        run(Backend::Postgres).await;
    }
}

/// A source that does not answer within 10 s fails the image; until then the image
/// is `processing` and its variants are 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sources_time_out() {
    let app = app_with_origin(Backend::Sqlite).await;
    let origin = origin().await;
    let admin = app.admin_token().await;
    let product_id = product(&app, &admin).await;
    let started = Instant::now();
    let url = format!("http://images.test:{}/slow.png", origin.port);
    let id = accepted(from_url(&app, &admin, &product_id, &url).await, &product_id).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pending = image(&app, &id).await;
    assert_eq!(pending["status"], "processing");
    assert_eq!(pending["variants"], json!([]));
    problem(
        app.get(&format!("/v1/images/{id}/thumb"))
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    let image = settled(&app, &id).await;
    assert_eq!(image["status"], "failed");
    assert!(
        text(&image, "error").contains("longer than 10 s"),
        "{image}"
    );
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(19), "gave up after {waited:?}");
}

/// Forms that must be refused at the POST with a 422, before any connection: the
/// checks are static (scheme, literal address in every form the URL parser
/// accepts) or a DNS answer (`localhost`). Nothing is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssrf_forms_are_refused_at_once() {
    let app = app_with_origin(Backend::Sqlite).await;
    let admin = app.admin_token().await;
    let product_id = product(&app, &admin).await;
    let table = [
        ("http://127.1/x.png", "loopback"),
        ("http://127.0.0.1:8080/x.png", "loopback"),
        ("http://[::1]/x.png", "loopback"),
        ("http://0x7f000001/x.png", "loopback"),
        ("http://2130706433/x.png", "loopback"),
        ("http://0177.0.0.1/x.png", "loopback"),
        ("http://169.254.169.254/latest/meta-data", "cloud metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data", "cloud metadata"),
        ("http://[::ffff:127.0.0.1]/x.png", "loopback"),
        ("http://[::ffff:7f00:1]/x.png", "loopback"),
        ("http://[::ffff:169.254.169.254]/", "cloud metadata"),
        ("http://[64:ff9b::a00:1]/x.png", "private"),
        ("http://10.0.0.1/x.png", "private"),
        ("http://192.168.1.1/x.png", "private"),
        ("http://172.16.0.1/x.png", "private"),
        ("http://100.64.0.1/x.png", "shared"),
        ("http://[fc00::1]/x.png", "unique-local"),
        ("http://[fe80::1]/x.png", "link-local"),
        ("http://0.0.0.0/x.png", "unspecified"),
        ("http://[::]/x.png", "unspecified"),
        ("http://224.0.0.1/x.png", "multicast"),
        ("http://255.255.255.255/x.png", "broadcast"),
        ("http://localhost/x.png", "resolves to a loopback"),
        ("http://LOCALHOST.:9/x.png", "resolves to a loopback"),
        ("http://x.localhost/x.png", "resolves to a loopback"),
        ("file:///etc/passwd", "http or https"),
        ("gopher://x", "http or https"),
        ("ftp://x/x.png", "http or https"),
        ("dict://127.0.0.1:11211/", "http or https"),
        (
            "http://user:secret@images.test/x.png",
            "user name or password",
        ),
        ("not a url", "not a valid URL"),
        ("http://", "not a valid URL"),
    ];
    for (url, why) in table {
        let response = from_url(&app, &admin, &product_id, url).await;
        let p = problem(response, 422).await;
        assert_eq!(error_fields(&p), ["source_url"], "{url}");
        let message = p["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(why), "{url}: {why:?} not in {message:?}");
    }
    let product = body(
        app.get(&format!("/v1/products/{product_id}"))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(product["images"], json!([]));
    let jobs = body(
        app.get("/v1/jobs?queue=images")
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(jobs["items"], json!([]));
}

// ---- S3 --------------------------------------------------------------------------

/// moto's S3 server on a free port of 127.0.0.1, stopped (by its pid) on drop.
struct Moto {
    endpoint: String,
    child: std::process::Child,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python() -> String {
    std::env::var("SCALESHOP_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

async fn moto() -> Moto {
    let python = python();
    let probe = std::process::Command::new(&python)
        .args(["-c", "import moto.server, flask, werkzeug"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        probe.status.success(),
        "moto's S3 server is not installed for {python}: run `{python} -m pip install \"moto[server]\"` \
         (or set SCALESHOP_TEST_PYTHON to a Python that has it). {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let port = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().port()
    };
    let child = std::process::Command::new(&python)
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start moto: {e}"));
    let moto = Moto {
        endpoint: format!("http://127.0.0.1:{port}"),
        child,
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if client.get(&moto.endpoint).send().await.is_ok() {
            return moto;
        }
        assert!(
            Instant::now() < deadline,
            "moto did not start on port {port} in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

mod s3 {
    use super::*;

    async fn run(backend: Backend) {
        let moto = moto().await;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let bucket = "scaleshop-images";
        let created = client
            .put(format!("{}/{bucket}", moto.endpoint))
            .send()
            .await
            .unwrap();
        assert!(
            created.status().is_success(),
            "create bucket: {}",
            created.status()
        );
        let endpoint = moto.endpoint.clone();
        let app = fixture_with(backend, |c| {
            c.s3_bucket = Some(bucket.to_owned());
            c.s3_endpoint = Some(endpoint);
            c.s3_allow_http = true;
            c.s3_access_key_id = Some("testing".to_owned());
            c.s3_secret_access_key = Some(scaleshop_app::config::Secret::new("testing"));
        })
        .await;
        let admin = app.admin_token().await;
        let product_id = product(&app, &admin).await;
        let id = accepted(
            upload(
                &app,
                &admin,
                &product_id,
                "image/jpeg",
                picture(1600, 1200, ImageFormat::Jpeg, false),
            )
            .await,
            &product_id,
        )
        .await;
        let image = settled(&app, &id).await;
        assert_eq!(image["status"], "ready", "{image}");
        assert_eq!(
            variants(&image),
            [
                variant("thumb", 128, 96, "image/jpeg"),
                variant("medium", 512, 384, "image/jpeg")
            ]
        );
        let (content_type, w, h, bytes) = download(&app, &id, "medium").await;
        assert_eq!((content_type.as_str(), w, h), ("image/jpeg", 512, 384));
        // The bytes are in the bucket (read back from moto with the same settings),
        // not in the data folder.
        let bucket_store =
            scaleshop_media::Storage::open(&app.config.image_storage(), Duration::from_secs(10))
                .unwrap();
        let stored = bucket_store.get(&format!("{id}/medium.jpg")).await.unwrap();
        assert_eq!(stored.map(|b| b.to_vec()), Some(bytes));
        let original = bucket_store.get(&format!("{id}/original")).await.unwrap();
        assert!(original.is_some_and(|b| b.len() > 1000));
        assert!(!app.data_dir().join("images").exists());
        let response = app
            .get(&format!("/v1/images/{id}/thumb"))
            .send()
            .await
            .unwrap();
        let etag = header(&response, "etag").unwrap();
        let response = app
            .get(&format!("/v1/images/{id}/thumb"))
            .header("if-none-match", etag)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 304);
        drop(app);
        drop(moto);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        run(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        run(Backend::Postgres).await;
    }
}

/// With S3 configured but unreachable, an upload answers 503 (the original could
/// not be stored) and nothing is recorded; the server stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_down_is_a_503() {
    let port = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().port()
    };
    let app = fixture_with(Backend::Sqlite, |c| {
        c.s3_bucket = Some("nowhere".to_owned());
        c.s3_endpoint = Some(format!("http://127.0.0.1:{port}"));
        c.s3_allow_http = true;
        c.s3_access_key_id = Some("testing".to_owned());
        c.s3_secret_access_key = Some(scaleshop_app::config::Secret::new("testing"));
        c.image_storage_timeout_ms = 2000;
    })
    .await;
    let admin = app.admin_token().await;
    let product_id = product(&app, &admin).await;
    let response = upload(
        &app,
        &admin,
        &product_id,
        "image/png",
        picture(32, 32, ImageFormat::Png, false),
    )
    .await;
    assert!(header(&response, "retry-after").is_some());
    problem(response, 503).await;
    let product = body(
        app.get(&format!("/v1/products/{product_id}"))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(product["images"], json!([]));
    assert_eq!(app.get("/healthz").send().await.unwrap().status(), 200);
}

both!(
    a_search_lists_each_product_with_its_own_images,
    [sqlite, postgres],
    |app: TestApp| async move {
        // The images of a page of products are read in one batch: each product
        // must still get exactly its own, in the order they were added.
        let admin = app.admin_token().await;
        let products = [
            product(&app, &admin).await,
            product(&app, &admin).await,
            product(&app, &admin).await,
        ];
        let png = || picture(40, 30, ImageFormat::Png, false);
        let mut expected: Vec<Vec<String>> = vec![Vec::new(), Vec::new(), Vec::new()];
        let mut token = String::new();
        for (index, count) in [(0, 2), (1, 1)] {
            for _ in 0..count {
                let response = upload(&app, &admin, &products[index], "image/png", png()).await;
                token = header(&response, "x-consistency-token").unwrap();
                expected[index].push(accepted(response, &products[index]).await);
            }
        }
        let page = body(
            app.get("/v1/products?q=Pictured&limit=100")
                .header("x-consistency-token", &token)
                .send()
                .await
                .unwrap(),
            200,
        )
        .await;
        let items = page["items"].as_array().unwrap();
        assert_eq!(items.len(), 3, "{page}");
        for (id, want) in products.iter().zip(&expected) {
            let item = items.iter().find(|p| p["id"] == id.as_str()).unwrap();
            let got: Vec<String> = item["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| text(i, "id"))
                .collect();
            assert_eq!(&got, want, "product {id}");
            assert_eq!(item["available"], 1, "{item}");
        }
    }
);
