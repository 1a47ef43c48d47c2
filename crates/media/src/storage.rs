//! Where image bytes live: object_store, on a folder under the data folder by
//! default, or on an S3-compatible service when configured. Every call is bounded
//! by a timeout.
//!
//! S3 requests are signed by object_store (with ring) and sent by our own reqwest
//! client (the [`ReqwestConnector`] below), so the process has one HTTP and TLS
//! stack (rustls with ring, Mozilla's roots).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::BodyExt;
use object_store::aws::AmazonS3Builder;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService,
};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};

/// An S3-compatible store.
#[derive(Clone)]
pub struct S3Settings {
    pub bucket: String,
    /// `None` = AWS itself; else the service's URL (such as `http://127.0.0.1:9000`),
    /// addressed path-style.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Allow a plain-http endpoint (a local service).
    pub allow_http: bool,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "***"),
            )
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

/// Which store.
#[derive(Debug, Clone)]
pub enum StorageSettings {
    /// Files under this folder (created if missing).
    Local(PathBuf),
    S3(S3Settings),
}

/// A store that failed or did not answer in time.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("object storage did not answer within {0:?}")]
    Timeout(Duration),
    #[error("object storage: {0}")]
    Failed(String),
}

/// The object store, every call bounded by `timeout`.
#[derive(Debug, Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    timeout: Duration,
}

impl Storage {
    /// Opens the configured store (no I/O beyond creating the local folder).
    pub fn open(settings: &StorageSettings, timeout: Duration) -> Result<Self, StorageError> {
        let store: Arc<dyn ObjectStore> = match settings {
            StorageSettings::Local(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StorageError::Failed(format!("image folder {}: {e}", dir.display()))
                })?;
                Arc::new(
                    LocalFileSystem::new_with_prefix(dir)
                        .map_err(|e| StorageError::Failed(e.to_string()))?,
                )
            }
            StorageSettings::S3(s3) => Arc::new(s3_store(s3, timeout)?),
        };
        Ok(Self { store, timeout })
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, StorageError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(|e| StorageError::Failed(e.to_string())),
            Err(_) => Err(StorageError::Timeout(self.timeout)),
        }
    }

    /// Writes `bytes` at `key` (atomically: readers see the old or the new object).
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        let path = Path::from(key);
        self.bounded(self.store.put(&path, PutPayload::from_bytes(bytes)))
            .await
            .map(|_| ())
    }

    /// The bytes at `key`, or `None` if there is no such object.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        let path = Path::from(key);
        let read = async {
            match self.store.get(&path).await {
                Ok(found) => found.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        };
        self.bounded(read).await
    }
}

fn s3_store(
    s3: &S3Settings,
    timeout: Duration,
) -> Result<object_store::aws::AmazonS3, StorageError> {
    let retry = RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 2,
        retry_timeout: timeout,
    };
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(&s3.bucket)
        .with_region(&s3.region)
        .with_allow_http(s3.allow_http)
        .with_retry(retry)
        .with_client_options(
            ClientOptions::new()
                .with_timeout(timeout)
                .with_connect_timeout(timeout.min(Duration::from_secs(5)))
                .with_allow_http(s3.allow_http),
        )
        .with_http_connector(ReqwestConnector {
            timeout,
            allow_http: s3.allow_http,
        });
    if let Some(endpoint) = &s3.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(key) = &s3.access_key_id {
        builder = builder.with_access_key_id(key);
    }
    if let Some(secret) = &s3.secret_access_key {
        builder = builder.with_secret_access_key(secret);
    }
    builder
        .build()
        .map_err(|e| StorageError::Failed(format!("S3 settings: {e}")))
}

/// object_store's HTTP client, made of our reqwest client.
#[derive(Debug)]
struct ReqwestConnector {
    timeout: Duration,
    allow_http: bool,
}

impl HttpConnector for ReqwestConnector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        let client = reqwest::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(self.timeout.min(Duration::from_secs(5)))
            .https_only(!self.allow_http)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?;
        Ok(HttpClient::new(ReqwestService { client }))
    }
}

#[derive(Debug)]
struct ReqwestService {
    client: reqwest::Client,
}

fn http_error(error: reqwest::Error) -> HttpError {
    let kind = if error.is_timeout() {
        HttpErrorKind::Timeout
    } else if error.is_connect() {
        HttpErrorKind::Connect
    } else if error.is_body() || error.is_decode() {
        HttpErrorKind::Interrupted
    } else {
        HttpErrorKind::Request
    };
    HttpError::new(kind, error.without_url())
}

#[async_trait]
impl HttpService for ReqwestService {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await?.to_bytes();
        let response = self
            .client
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await
            .map_err(http_error)?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(http_error)?;
        let mut answer = HttpResponse::new(HttpResponseBody::from(bytes));
        *answer.status_mut() = status;
        *answer.headers_mut() = headers;
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    #[tokio::test]
    async fn local_round_trip() {
        let dir = std::env::temp_dir().join(format!("scaleshop-media-{}", uuid::Uuid::now_v7()));
        let storage =
            Storage::open(&StorageSettings::Local(dir.clone()), Duration::from_secs(5)).unwrap();
        assert_eq!(storage.get("a/b.png").await.unwrap(), None);
        storage
            .put("a/b.png", Bytes::from_static(b"bytes"))
            .await
            .unwrap();
        assert_eq!(
            storage.get("a/b.png").await.unwrap(),
            Some(Bytes::from_static(b"bytes"))
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn settings_hide_the_secret() {
        let s = S3Settings {
            bucket: "b".into(),
            endpoint: None,
            region: "us-east-1".into(),
            access_key_id: Some("AKIA".into()),
            secret_access_key: Some("very-secret".into()),
            allow_http: false,
        };
        assert!(!format!("{s:?}").contains("very-secret"));
    }
}
