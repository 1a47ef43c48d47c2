//! The `images` queue's handler, which the media service registers.

use async_trait::async_trait;
use scaleshop_db::{StoreError, Tx};
use scaleshop_jobs::{Job, JobError, JobHandler};
use serde::Deserialize;
use uuid::Uuid;

use crate::service::{Media, fail_in};

/// The queue that processes images.
pub const IMAGES_QUEUE: &str = "images";

/// The `images` queue's handler.
#[derive(Debug, Clone)]
pub struct ImageJob {
    media: Media,
}

impl ImageJob {
    pub fn new(media: Media) -> Self {
        Self { media }
    }
}

#[derive(Debug, Deserialize)]
struct ImagePayload {
    image_id: Uuid,
}

fn payload(job: &Job) -> Result<ImagePayload, JobError> {
    serde_json::from_value(job.payload.0.clone())
        .map_err(|e| JobError::permanent(format!("bad image job payload: {e}")))
}

#[async_trait]
impl JobHandler for ImageJob {
    async fn run(&self, job: &Job) -> Result<(), JobError> {
        self.media.process(payload(job)?.image_id).await
    }

    /// Out of attempts (storage or the database kept failing): the image fails.
    async fn on_dead(&self, job: &Job, tx: &mut Tx) -> Result<(), StoreError> {
        if let Ok(payload) = payload(job) {
            fail_in(
                tx,
                payload.image_id,
                "processing kept failing (storage or database unavailable); add the image again later",
            )
            .await?;
        }
        Ok(())
    }
}
