//! NATS JetStream as the transport of the log between processes.
//!
//! The `events` table stays the outbox and the source of truth; JetStream only
//! carries it:
//!
//! - **Relay.** One process per database (a lease in `event_relays` fences the
//!   others) reads the outbox after its position and publishes each event to the
//!   stream [`STREAM`] on the subject `scaleshop.events.<type>`, with
//!   `Nats-Msg-Id` set to the event id (the broker drops a duplicate within its
//!   duplicate window) and the stream's expected last sequence (so a publish that
//!   failed in the middle of a pipelined batch can never let a later event in
//!   before it). The relay's position moves only after every PubAck of the batch.
//!   After any error it reconciles with the stream: the event in the stream's last
//!   message is the last one relayed, whatever the saved position says.
//! - **Consumers.** Each [`Consumer`](crate::Consumer) is a durable pull consumer
//!   with explicit ack, `AckWait`, and one unacknowledged message at a time, so the
//!   stream's order (the log's order) is the delivery order. Delivery runs through
//!   the same code as the in-database dispatcher: the inbox row, the handler and
//!   the position move are one transaction fenced by the consumer's lease, so an
//!   event is handled exactly once whatever the broker redelivers. A failure is
//!   negatively acknowledged with the backoff delay; after the last attempt the
//!   event is parked in `event_dead` (it shows in `GET /v1/events/dead` and can be
//!   redelivered from the outbox as before) and a copy goes to the dead-letter
//!   stream [`DEAD_STREAM`].
//! - **Lag.** `relay_backlog` counts the outbox events not yet published;
//!   `event_consumer_lag{consumer}` is the consumer's pending plus unacknowledged
//!   count from its info plus that backlog: the events behind the head of the
//!   log, as without NATS.
//!
//! If the broker loses its store (a new server, a deleted stream), the relay
//! starts again from the slowest consumer's position: consumers skip what their
//! position and inbox say they have handled, so nothing is lost or applied twice.

use scaleshop_telemetry::trace::TRACEPARENT;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, Context, consumer, message::PublishMessage, stream};
use futures::StreamExt;
use scaleshop_db::clock::{after, now};
use scaleshop_db::sqlx;
use scaleshop_db::{Database, StoreError, Topic, with_pool};
use scaleshop_telemetry::names;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::dispatch::{Delivery, DispatcherSettings, Runner};
use crate::{Event, EventLog};

/// The stream that carries the log.
pub const STREAM: &str = "SCALESHOP_EVENTS";
/// Its subjects: `scaleshop.events.<event type>`.
pub const SUBJECTS: &str = "scaleshop.events.>";
/// The dead-letter stream: a copy of each event a consumer gave up on, on
/// `scaleshop.dead.<consumer>`.
pub const DEAD_STREAM: &str = "SCALESHOP_DEAD";
/// The name of the relay's row in `event_relays`.
pub const RELAY: &str = "jetstream";

/// How each NATS request is bounded, and the stream's settings.
#[derive(Clone)]
pub struct NatsSettings {
    /// `nats://host:port` (may carry credentials: never logged).
    pub url: String,
    /// Bound on each request to the broker (publish acknowledgement, info, ack).
    pub timeout: Duration,
    /// Copies of each stream on a NATS cluster (1 on a single server).
    pub replicas: usize,
    /// How long the broker waits for an ack before it redelivers.
    pub ack_wait: Duration,
    /// The window within which the broker drops a message whose `Nats-Msg-Id`
    /// it has seen.
    pub duplicate_window: Duration,
    /// How long the stream keeps a message (the outbox keeps every event).
    pub max_age: Duration,
    /// Events a relay publishes before it waits for their acknowledgements.
    pub relay_batch: i64,
    context: Arc<OnceLock<Context>>,
}

impl NatsSettings {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            timeout: Duration::from_secs(5),
            replicas: 1,
            ack_wait: Duration::from_secs(30),
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::from_secs(7 * 24 * 3600),
            relay_batch: 256,
            context: Arc::new(OnceLock::new()),
        }
    }
}

impl std::fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSettings")
            .field("url", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("replicas", &self.replicas)
            .field("ack_wait", &self.ack_wait)
            .field("duplicate_window", &self.duplicate_window)
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

/// A failure talking to the broker.
#[derive(Debug, thiserror::Error)]
#[error("NATS: {0}")]
pub struct TransportError(String);

impl TransportError {
    fn of(what: &str, error: impl std::fmt::Display) -> Self {
        Self(format!("{what}: {error}"))
    }
}

impl From<TransportError> for StoreError {
    fn from(error: TransportError) -> Self {
        StoreError::Other(error.to_string())
    }
}

/// The subject an event of this type is published on.
pub fn subject(event_type: &str) -> String {
    format!("scaleshop.events.{event_type}")
}

/// A durable consumer's name for a consumer (names may not hold dots).
pub fn durable_name(consumer: &str) -> String {
    consumer.replace(['.', ' ', '*', '>'], "_")
}

/// The log's stream: on disk, kept by age (every consumer reads it all).
pub fn stream_config(settings: &NatsSettings) -> stream::Config {
    stream::Config {
        name: STREAM.to_owned(),
        description: Some("scaleshop's event log, relayed from the outbox".to_owned()),
        subjects: vec![SUBJECTS.to_owned()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        num_replicas: settings.replicas,
        duplicate_window: settings.duplicate_window,
        max_age: settings.max_age,
        allow_direct: true,
        ..Default::default()
    }
}

/// The dead-letter stream.
pub fn dead_stream_config(settings: &NatsSettings) -> stream::Config {
    stream::Config {
        name: DEAD_STREAM.to_owned(),
        description: Some("events a consumer gave up on (also in event_dead)".to_owned()),
        subjects: vec!["scaleshop.dead.>".to_owned()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        num_replicas: settings.replicas,
        max_age: settings.max_age,
        ..Default::default()
    }
}

/// A consumer's durable pull consumer: the whole log in order, one message in
/// flight, explicit ack; retries are paced by our own backoff (NAK with delay).
pub fn consumer_config(settings: &NatsSettings, consumer: &str) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(durable_name(consumer)),
        description: Some(format!("scaleshop consumer {consumer}")),
        deliver_policy: consumer::DeliverPolicy::All,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        max_ack_pending: 1,
        num_replicas: settings.replicas,
        ..Default::default()
    }
}

/// The JetStream context of these settings, connected once and shared by every
/// clone. The client reconnects by itself for as long as the process lives.
pub async fn connect(settings: &NatsSettings) -> Result<Context, TransportError> {
    if let Some(context) = settings.context.get() {
        return Ok(context.clone());
    }
    let client = async_nats::ConnectOptions::new()
        .name("scaleshop")
        .connection_timeout(settings.timeout)
        .request_timeout(Some(settings.timeout))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(settings.url.as_str())
        .await
        .map_err(|e| TransportError::of("connect", e))?;
    let context = jetstream::ContextBuilder::new()
        .timeout(settings.timeout)
        .build(client);
    Ok(settings.context.get_or_init(|| context).clone())
}

/// Creates the streams, or brings their settings to ours.
pub async fn ensure_streams(
    context: &Context,
    settings: &NatsSettings,
) -> Result<(), TransportError> {
    for config in [stream_config(settings), dead_stream_config(settings)] {
        context
            .create_or_update_stream(config)
            .await
            .map_err(|e| TransportError::of("create stream", e))?;
    }
    Ok(())
}

async fn bounded<T, E: std::fmt::Display>(
    what: &str,
    within: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, TransportError> {
    match tokio::time::timeout(within, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(TransportError::of(what, e)),
        Err(_) => Err(TransportError::of(what, "timed out")),
    }
}

/// Registers the relay and starts it and one pull loop per consumer.
pub(crate) async fn start(
    db: &Database,
    settings: &NatsSettings,
    owner: &str,
    dispatch: &DispatcherSettings,
    runners: Vec<Runner>,
    shutdown: &watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, StoreError> {
    const REGISTER: &str =
        "INSERT INTO event_relays (name) VALUES ($1) ON CONFLICT (name) DO NOTHING";
    with_pool!(db, pool => {
        sqlx::query(REGISTER).bind(RELAY).execute(pool).await?;
    });
    let context = connect(settings).await?;
    let mut tasks = Vec::new();
    let relay = Relay {
        db: db.clone(),
        context: context.clone(),
        settings: settings.clone(),
        dispatch: dispatch.clone(),
        owner: owner.to_owned(),
    };
    tasks.push(tokio::spawn(relay.run(shutdown.clone())));
    for runner in runners {
        let pull = Pull {
            runner,
            context: context.clone(),
            settings: settings.clone(),
        };
        tasks.push(tokio::spawn(pull.run(shutdown.clone())));
    }
    Ok(tasks)
}

/// Waits `wait`, or less when a commit wakes us or shutdown begins.
async fn pause(db: &Database, wait: Duration, shutdown: &mut watch::Receiver<bool>) {
    let signal = db.commit_signal(Topic::Events);
    tokio::select! {
        () = signal.notified() => {}
        () = tokio::time::sleep(wait) => {}
        _ = shutdown.changed() => {}
    }
}

struct Relay {
    db: Database,
    context: Context,
    settings: NatsSettings,
    dispatch: DispatcherSettings,
    owner: String,
}

/// Where the relay stands: the last event relayed, and the stream's last
/// sequence (the expected last sequence of the next publish).
#[derive(Debug, Clone, Copy)]
struct Cursor {
    position: i64,
    stream_last: u64,
}

impl Relay {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut cursor: Option<Cursor> = None;
        let mut held = false;
        while !*shutdown.borrow() {
            let signal = self.db.commit_signal(Topic::Events);
            let notified = signal.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait = match self.step(&mut cursor, &mut held).await {
                Ok(true) => continue,
                // Idle: come back before the lease runs out, to keep it.
                Ok(false) if held => self
                    .dispatch
                    .poll
                    .min(self.dispatch.renew.min(self.dispatch.lease / 2)),
                // Another relay holds it: take over when its lease runs out.
                Ok(false) => self.lease_wait().await,
                Err(e) => {
                    tracing::warn!(error = %e, "event relay step failed");
                    cursor = None;
                    Duration::from_millis(500)
                }
            };
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
        if held {
            const RELEASE: &str = "UPDATE event_relays SET lease_owner = NULL, lease_until = NULL \
                                   WHERE name = $1 AND lease_owner = $2";
            let released = with_pool!(self.db, pool => {
                sqlx::query(RELEASE).bind(RELAY).bind(&self.owner).execute(pool).await.map(|_| ())
            });
            if let Err(e) = released {
                tracing::debug!(error = %e, "relay lease not released");
            } else if let Err(e) = self.db.announce(Topic::Events).await {
                tracing::debug!(error = %e, "relay lease release not announced");
            }
        }
    }

    /// How long until the other relay's lease runs out (at most the poll).
    async fn lease_wait(&self) -> Duration {
        const Q: &str = "SELECT lease_until FROM event_relays WHERE name = $1";
        let until = async {
            Ok(with_pool!(self.db, pool => {
                sqlx::query_scalar(Q).bind(RELAY).fetch_optional(pool).await?
            }))
        };
        crate::dispatch::until_lease_ends(until.await, self.dispatch.poll)
    }

    async fn acquire(&self) -> Result<bool, StoreError> {
        const Q: &str = "UPDATE event_relays SET lease_owner = $2, lease_until = $3 \
                         WHERE name = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < $4)";
        let done = with_pool!(self.db, pool => {
            sqlx::query(Q).bind(RELAY).bind(&self.owner).bind(after(self.dispatch.lease)).bind(now())
                .execute(pool).await?.rows_affected()
        });
        Ok(done == 1)
    }

    /// Saves the position, fenced by the lease; false when the lease was lost.
    async fn save(&self, position: i64) -> Result<bool, StoreError> {
        const Q: &str =
            "UPDATE event_relays SET position = $3 WHERE name = $1 AND lease_owner = $2";
        let done = with_pool!(self.db, pool => {
            sqlx::query(Q).bind(RELAY).bind(&self.owner).bind(position)
                .execute(pool).await?.rows_affected()
        });
        Ok(done == 1)
    }

    /// One round: publishes a batch. True when it did (more may follow at once).
    async fn step(&self, cursor: &mut Option<Cursor>, held: &mut bool) -> Result<bool, StoreError> {
        *held = self.acquire().await?;
        if !*held {
            *cursor = None;
            return Ok(false);
        }
        let at = match *cursor {
            Some(at) => at,
            None => {
                let at = self.reconcile().await?;
                if !self.save(at.position).await? {
                    return Ok(false);
                }
                *cursor = Some(at);
                at
            }
        };
        let events = EventLog::new(self.db.clone())
            .list(at.position, self.settings.relay_batch)
            .await?;
        let Some(last) = events.last().map(|e| e.sequence) else {
            return Ok(false);
        };
        let stream_last = self.publish(&events, at.stream_last).await?;
        let next = Cursor {
            position: last,
            stream_last,
        };
        if !self.save(next.position).await? {
            *cursor = None;
            return Ok(false);
        }
        *cursor = Some(next);
        metrics::counter!(names::EVENTS_RELAYED).increment(events.len() as u64);
        Ok(true)
    }

    /// Publishes the events in order, pipelined, then waits for every PubAck.
    /// Returns the stream's last sequence after them.
    async fn publish(&self, events: &[Event], mut stream_last: u64) -> Result<u64, TransportError> {
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let payload =
                serde_json::to_vec(event).map_err(|e| TransportError::of("encode event", e))?;
            let mut message = PublishMessage::build()
                .payload(payload.into())
                .message_id(event.id.to_string())
                .expected_last_sequence(stream_last);
            if let Some(traceparent) = &event.traceparent {
                message = message.header(TRACEPARENT, traceparent.as_str());
            }
            let ack = bounded(
                "publish",
                self.settings.timeout,
                self.context.send_publish(subject(&event.kind), message),
            )
            .await?;
            acks.push(ack);
            stream_last += 1;
        }
        let mut last = stream_last;
        for ack in acks {
            let ack = bounded(
                "publish acknowledgement",
                self.settings.timeout,
                ack.into_future(),
            )
            .await?;
            last = ack.sequence;
        }
        if last != stream_last {
            return Err(TransportError(format!(
                "the stream's last sequence is {last}, expected {stream_last}"
            )));
        }
        Ok(last)
    }

    /// Where the stream stands: the event in its last message is the last one
    /// relayed. An empty stream with a saved position means the broker lost its
    /// store: start again from the slowest consumer.
    async fn reconcile(&self) -> Result<Cursor, StoreError> {
        const SAVED: &str = "SELECT position FROM event_relays WHERE name = $1";
        // A rebuild's new copy of a read model (`crate::projection::REBUILD_SUFFIX`)
        // reads the table, never the stream.
        const SLOWEST: &str = "SELECT COALESCE(MIN(position), 0) FROM event_consumers \
                               WHERE name NOT LIKE '%.rebuild'";
        ensure_streams(&self.context, &self.settings).await?;
        let stream = bounded(
            "get stream",
            self.settings.timeout,
            self.context.get_stream(STREAM),
        )
        .await?;
        let info = bounded("stream info", self.settings.timeout, stream.get_info()).await?;
        let saved: i64 = with_pool!(self.db, pool => {
            sqlx::query_scalar(SAVED).bind(RELAY).fetch_one(pool).await?
        });
        let stream_last = info.state.last_sequence;
        if stream_last == 0 {
            if saved > 0 {
                let slowest: i64 = with_pool!(self.db, pool => {
                    sqlx::query_scalar(SLOWEST).fetch_one(pool).await?
                });
                tracing::warn!(
                    saved,
                    from = slowest,
                    "the event stream is empty: relaying again from the slowest consumer"
                );
                return Ok(Cursor {
                    position: slowest.min(saved),
                    stream_last: 0,
                });
            }
            return Ok(Cursor {
                position: 0,
                stream_last: 0,
            });
        }
        let position = match stream.get_raw_message(stream_last).await {
            Ok(message) => {
                let event = serde_json::from_slice::<Event>(&message.payload)
                    .map_err(|e| TransportError::of("read the stream's last event", e))?;
                // The stream must carry this database's log: relaying after an
                // event of another log would skip or mix events.
                let ours = EventLog::new(self.db.clone()).get(event.id).await?;
                if ours.is_none_or(|ours| ours.sequence != event.sequence) {
                    return Err(StoreError::Other(format!(
                        "the stream {STREAM} ends with event {} (sequence {}), which is not in this \
                         database's log: it carries another deployment's events. Point nats_url at \
                         this deployment's NATS, or delete the stream if it is stale",
                        event.id, event.sequence
                    )));
                }
                event.sequence
            }
            // Expired or removed: nothing newer was published since, so the
            // saved position is right.
            Err(e) => {
                tracing::debug!(error = %e, "the stream's last message is gone; keeping the saved position");
                saved
            }
        };
        if position != saved {
            tracing::info!(saved, position, "relay position reconciled with the stream");
        }
        Ok(Cursor {
            position,
            stream_last,
        })
    }
}

/// One consumer's pull loop.
struct Pull {
    runner: Runner,
    context: Context,
    settings: NatsSettings,
}

/// Why a pull session ended.
enum Ended {
    Shutdown,
    LostLease,
    Failed(String),
}

impl Pull {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let db = self.runner.db.clone();
        while !*shutdown.borrow() {
            let wait = match self.runner.acquire_lease().await {
                Ok(true) => match self.session(&mut shutdown).await {
                    Ended::Shutdown => break,
                    Ended::LostLease => self.runner.lease_wait().await,
                    Ended::Failed(error) => {
                        tracing::warn!(consumer = self.runner.name(), error, "event pull failed");
                        Duration::from_millis(500)
                    }
                },
                Ok(false) => self.runner.lease_wait().await,
                Err(e) => {
                    tracing::warn!(consumer = self.runner.name(), error = %e, "consumer lease check failed");
                    Duration::from_secs(1)
                }
            };
            self.runner.heartbeat.beat();
            pause(&db, wait, &mut shutdown).await;
        }
        self.runner.release_lease().await;
    }

    async fn consumer(&self) -> Result<consumer::Consumer<consumer::pull::Config>, TransportError> {
        ensure_streams(&self.context, &self.settings).await?;
        let stream = bounded(
            "get stream",
            self.settings.timeout,
            self.context.get_stream_no_info(STREAM),
        )
        .await?;
        // Create-or-update: an existing durable consumer keeps its state and
        // takes our settings.
        let consumer = bounded(
            "create consumer",
            self.settings.timeout,
            stream.create_consumer(consumer_config(&self.settings, self.runner.name())),
        )
        .await?;
        // A message still out with the holder before us (a process that died,
        // or lost the lease) would come back only after AckWait. We hold the
        // lease now, so that holder can no longer commit anything: take the
        // consumer back to its ack floor at once (nats-server 2.14 and later;
        // an older server redelivers after AckWait).
        let info = bounded("consumer info", self.settings.timeout, consumer.get_info()).await?;
        if info.num_ack_pending > 0 {
            let name = durable_name(self.runner.name());
            match bounded(
                "reset consumer",
                self.settings.timeout,
                stream.reset_consumer(&name, None),
            )
            .await
            {
                Ok(_) => tracing::info!(
                    consumer = self.runner.name(),
                    "took back the messages out with the previous holder"
                ),
                Err(e) => tracing::info!(
                    consumer = self.runner.name(),
                    error = %e,
                    "messages out with the previous holder come back after AckWait"
                ),
            }
        }
        Ok(consumer)
    }

    /// Holds the consumer: serves redelivery requests and pulls the stream until
    /// shutdown, the lease is lost or the broker fails.
    async fn session(&self, shutdown: &mut watch::Receiver<bool>) -> Ended {
        let runner = &self.runner;
        let consumer = match self.consumer().await {
            Ok(consumer) => consumer,
            Err(e) => return Ended::Failed(e.to_string()),
        };
        let mut position = match runner.state().await {
            Ok(state) => state.position,
            Err(e) => return Ended::Failed(e.to_string()),
        };
        let heartbeat = (self.settings.timeout / 2).max(Duration::from_millis(500));
        let messages = consumer
            .stream()
            .max_messages_per_batch(runner.settings.batch.clamp(1, 1000) as usize)
            .heartbeat(heartbeat)
            .expires(heartbeat * 4)
            .messages()
            .await;
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(e) => return Ended::Failed(format!("pull: {e}")),
        };
        let renew = runner.settings.renew.min(runner.settings.lease / 3);
        let mut tick = tokio::time::interval(renew);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Events passed over, whose position is saved in one write.
        let mut passed: Option<i64> = None;
        let mut unsaved = 0usize;
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    self.save_passed(&mut passed, &mut unsaved).await;
                    return Ended::Shutdown;
                }
                _ = tick.tick() => {
                    self.save_passed(&mut passed, &mut unsaved).await;
                    match runner.acquire_lease().await {
                        Ok(true) => {}
                        Ok(false) => return Ended::LostLease,
                        Err(e) => return Ended::Failed(e.to_string()),
                    }
                    loop {
                        match runner.redeliver_one().await {
                            Ok(true) => continue,
                            Ok(false) => break,
                            Err(e) => return Ended::Failed(e.to_string()),
                        }
                    }
                    runner.heartbeat.beat();
                }
                next = messages.next() => {
                    let message = match next {
                        Some(Ok(message)) => message,
                        Some(Err(e)) => return Ended::Failed(format!("pull: {e}")),
                        None => return Ended::Failed("the pull stream ended".to_owned()),
                    };
                    match self.handle(&message, &mut position, &mut passed).await {
                        Ok(None) => {
                            unsaved += 1;
                            if unsaved >= 256 {
                                self.save_passed(&mut passed, &mut unsaved).await;
                            }
                        }
                        Ok(Some(ended)) => return ended,
                        Err(e) => {
                            self.ack(&message, AckKind::Nak(Some(Duration::from_secs(1)))).await;
                            return Ended::Failed(e.to_string());
                        }
                    }
                }
            }
        }
    }

    async fn save_passed(&self, passed: &mut Option<i64>, unsaved: &mut usize) {
        if let Some(to) = passed.take()
            && let Err(e) = self.runner.advance(to).await
        {
            tracing::debug!(consumer = self.runner.name(), error = %e, "position not saved");
        }
        *unsaved = 0;
    }

    async fn ack(&self, message: &jetstream::Message, kind: AckKind) {
        let acked = bounded("ack", self.settings.timeout, message.ack_with(kind)).await;
        if let Err(e) = acked {
            // The broker redelivers after AckWait; the inbox makes that harmless.
            tracing::debug!(consumer = self.runner.name(), error = %e, "ack not sent");
        }
    }

    /// Handles one message. `None` to go on with the next.
    async fn handle(
        &self,
        message: &jetstream::Message,
        position: &mut i64,
        passed: &mut Option<i64>,
    ) -> Result<Option<Ended>, StoreError> {
        let runner = &self.runner;
        let event = match serde_json::from_slice::<Event>(&message.payload) {
            Ok(mut event) => {
                event.traceparent = message
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get(TRACEPARENT))
                    .map(|value| value.as_str().to_owned());
                event
            }
            Err(e) => {
                tracing::error!(consumer = runner.name(), subject = %message.subject, error = %e,
                    "not an event: dropped from the consumer");
                self.ack(message, AckKind::Term).await;
                return Ok(None);
            }
        };
        if event.sequence <= *position {
            self.ack(message, AckKind::Ack).await;
            return Ok(None);
        }
        if !runner.consumer.wants(&event.kind) {
            *position = event.sequence;
            *passed = Some(event.sequence);
            self.ack(message, AckKind::Ack).await;
            return Ok(None);
        }
        // The first delivery starts a fresh count; a redelivery continues the
        // count kept with the consumer's position.
        let redelivered = message
            .info()
            .map(|info| info.delivered > 1)
            .unwrap_or(true);
        let attempts = if redelivered {
            runner.state().await?.attempts
        } else {
            0
        };
        *passed = None;
        match runner.deliver(&event, attempts).await? {
            Delivery::Done => {
                *position = event.sequence;
                self.ack(message, AckKind::Ack).await;
                runner.heartbeat.beat();
                Ok(None)
            }
            Delivery::Parked { attempts, error } => {
                *position = event.sequence;
                self.dead_letter(message, runner.name(), attempts, &error)
                    .await;
                self.ack(message, AckKind::Ack).await;
                Ok(None)
            }
            Delivery::Retry(at) => {
                let delay = (at - now()).to_std().unwrap_or_default();
                self.ack(message, AckKind::Nak(Some(delay))).await;
                Ok(None)
            }
            Delivery::LostLease => {
                self.ack(message, AckKind::Nak(None)).await;
                Ok(Some(Ended::LostLease))
            }
        }
    }

    /// A copy of the event a consumer gave up on, on the dead-letter stream. The
    /// record that counts is the `event_dead` row, written before: a copy that
    /// cannot be published is logged, not retried.
    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        consumer: &str,
        attempts: i32,
        error: &str,
    ) {
        let mut headers = HeaderMap::new();
        headers.insert("Scaleshop-Consumer", consumer);
        headers.insert("Scaleshop-Attempts", attempts.to_string().as_str());
        headers.insert("Scaleshop-Error", error.replace(['\r', '\n'], " ").as_str());
        let published = async {
            let ack = bounded(
                "dead-letter publish",
                self.settings.timeout,
                self.context.publish_with_headers(
                    format!("scaleshop.dead.{}", durable_name(consumer)),
                    headers,
                    message.payload.clone(),
                ),
            )
            .await?;
            bounded(
                "dead-letter acknowledgement",
                self.settings.timeout,
                ack.into_future(),
            )
            .await
        };
        if let Err(e) = published.await {
            tracing::warn!(consumer, error = %e, "dead-letter copy not published");
        }
    }
}

/// `relay_backlog` from the outbox, and `event_consumer_lag{consumer}` from each
/// durable consumer's info (pending plus unacknowledged) plus that backlog (read
/// first: the relay saves its position only after the PubAcks, so an event is
/// counted in the backlog or in the stream, never in neither). Each broker call is
/// bounded so that a scrape never hangs on a dead broker.
pub(crate) async fn report(db: &Database, settings: &NatsSettings, consumers: &[&'static str]) {
    const BACKLOG: &str = "SELECT COUNT(*) FROM events \
                           WHERE sequence > COALESCE((SELECT position FROM event_relays WHERE name = $1), 0)";
    let backlog: Result<i64, StoreError> = async {
        Ok(with_pool!(db, pool => {
            sqlx::query_scalar(BACKLOG).bind(RELAY).fetch_one(pool).await?
        }))
    }
    .await;
    // The events not yet in the stream are behind every consumer too: the lag
    // counts from the head of the log, not from the head of the stream, so a
    // lag of 0 means caught up with every committed event. Without the backlog
    // the lag is not reported (never under-reported).
    let unrelayed = match backlog {
        Ok(backlog) => {
            metrics::gauge!(names::RELAY_BACKLOG).set(backlog as f64);
            u64::try_from(backlog).unwrap_or(0)
        }
        Err(e) => {
            tracing::warn!(error = %e, "relay backlog unavailable");
            return;
        }
    };
    let within = settings.timeout.min(Duration::from_secs(1));
    let lags = async {
        let context = connect(settings).await?;
        let stream = bounded("get stream", within, context.get_stream_no_info(STREAM)).await?;
        for name in consumers {
            let info = bounded(
                "consumer info",
                within,
                stream.consumer_info(durable_name(name)),
            )
            .await?;
            let lag = info.num_pending + info.num_ack_pending as u64 + unrelayed;
            metrics::gauge!(names::EVENT_CONSUMER_LAG, "consumer" => *name).set(lag as f64);
        }
        Ok::<(), TransportError>(())
    };
    if let Err(e) = lags.await {
        tracing::warn!(error = %e, "consumer lag from NATS unavailable");
    }
}
