//! The broker side of the `bridge` scenario's source phases: filling a Kafka topic or a
//! JetStream stream with the messages Herald will consume, and the broker's own consumer
//! rate over the same messages — a bare consumer settling the way Herald's source does
//! (Kafka: offsets stored per message and committed by librdkafka every second; JetStream:
//! a durable pull consumer, every message acknowledged, batches of the same size) but
//! publishing nothing.
//!
//! Messages are keyed (Kafka record key, the subject's second token for NATS) by
//! `c<i mod channels>`, so Herald's mapping sends them to `bench:c<k>`.
//!
//! Owns: the producers and consumers it makes. May touch: the brokers it is pointed at (its
//! own topic, stream and consumer groups).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// The body of message `i`: a small JSON object, like a typical event.
pub fn body(i: u64) -> Vec<u8> {
    format!("{{\"n\":{i},\"kind\":\"bench\",\"value\":{}}}", i % 977).into_bytes()
}

/// Messages per second over `count` messages that took `elapsed`.
pub fn per_sec(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

// --- Kafka -------------------------------------------------------------------------------

/// Creates `topic` with `partitions` and produces `messages` records (acks=all); returns the
/// producer's rate.
pub async fn kafka_fill(
    brokers: &str,
    topic: &str,
    partitions: i32,
    messages: u64,
    channels: u64,
) -> anyhow::Result<f64> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("Kafka admin client")?;
    let created = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .context("creating the topic")?;
    for result in created {
        if let Err((name, code)) = result {
            bail!("creating topic {name}: {code}");
        }
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "60000")
        .create()
        .context("Kafka producer")?;
    let start = Instant::now();
    let chunk = 20_000u64;
    let mut i = 0;
    while i < messages {
        let end = (i + chunk).min(messages);
        let sends = (i..end).map(|n| {
            let key = format!("c{}", n % channels);
            let value = body(n);
            let producer = &producer;
            async move {
                producer
                    .send(
                        FutureRecord::to(topic).key(&key).payload(&value),
                        Duration::from_secs(30),
                    )
                    .await
                    .map(drop)
                    .map_err(|(e, _)| e)
            }
        });
        for result in futures::future::join_all(sends).await {
            result.context("producing to Kafka")?;
        }
        i = end;
    }
    Ok(per_sec(messages, start.elapsed()))
}

/// Reads `messages` records of `topic` in a fresh consumer group, storing each offset after
/// it is handled (committed every second), as Herald's source does; returns the rate from the
/// first record to the last.
pub async fn kafka_bare(
    brokers: &str,
    topic: &str,
    group: &str,
    messages: u64,
) -> anyhow::Result<f64> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .create()
        .context("Kafka consumer")?;
    consumer.subscribe(&[topic]).context("subscribing")?;
    let mut first = None;
    let mut seen = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen < messages {
        if Instant::now() > deadline {
            bail!("the bare Kafka consumer read {seen} of {messages} records");
        }
        let message = match tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
            Ok(message) => message.context("consuming")?,
            Err(_) => continue,
        };
        first.get_or_insert_with(Instant::now);
        consumer
            .store_offset_from_message(&message)
            .context("storing an offset")?;
        seen += 1;
    }
    let elapsed = first.map_or(Duration::ZERO, |at| at.elapsed());
    Ok(per_sec(messages.saturating_sub(1), elapsed))
}

// --- NATS JetStream ----------------------------------------------------------------------

/// Creates stream `stream` on subjects `<prefix>.>` and publishes `messages` to
/// `<prefix>.c<k>` (each acknowledged by the server); returns the publisher's rate.
pub async fn nats_fill(
    url: &str,
    stream: &str,
    prefix: &str,
    messages: u64,
    channels: u64,
) -> anyhow::Result<f64> {
    let client = async_nats::connect(url)
        .await
        .context("connecting to NATS")?;
    let jetstream = async_nats::jetstream::new(client);
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: stream.to_owned(),
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        })
        .await
        .context("creating the stream")?;
    let start = Instant::now();
    let chunk = 5_000u64;
    let mut i = 0;
    while i < messages {
        let end = (i + chunk).min(messages);
        let mut acks = Vec::with_capacity((end - i) as usize);
        for n in i..end {
            let subject = format!("{prefix}.c{}", n % channels);
            acks.push(
                jetstream
                    .publish(subject, body(n).into())
                    .await
                    .context("publishing to JetStream")?,
            );
        }
        for ack in futures::future::join_all(acks.into_iter().map(|a| a.into_future())).await {
            ack.context("JetStream did not acknowledge a message")?;
        }
        i = end;
    }
    Ok(per_sec(messages, start.elapsed()))
}

/// Reads `messages` of `stream` through a new durable pull consumer, `batch` at a time,
/// acknowledging each, as Herald's source does; returns the rate from the first to the last.
pub async fn nats_bare(
    url: &str,
    stream: &str,
    consumer: &str,
    messages: u64,
    batch: usize,
) -> anyhow::Result<f64> {
    use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
    let client = async_nats::connect(url)
        .await
        .context("connecting to NATS")?;
    let jetstream = async_nats::jetstream::new(client.clone());
    let stream = jetstream.get_stream(stream).await.context("the stream")?;
    let pull_consumer: PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(consumer.to_owned()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: i64::try_from(batch * 2).unwrap_or(i64::MAX),
            ..Default::default()
        })
        .await
        .context("creating the consumer")?;
    let mut first = None;
    let mut seen = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen < messages {
        if Instant::now() > deadline {
            bail!("the bare JetStream consumer read {seen} of {messages} messages");
        }
        let mut pulled = pull_consumer
            .batch()
            .max_messages(batch)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .context("pulling")?;
        let mut ackers = Vec::new();
        while let Some(message) = pulled.next().await {
            let message = message.map_err(|e| anyhow::anyhow!("pulling: {e}"))?;
            first.get_or_insert_with(Instant::now);
            ackers.push(message.split().1);
        }
        seen += ackers.len() as u64;
        for acker in ackers {
            acker
                .ack()
                .await
                .map_err(|e| anyhow::anyhow!("acknowledging: {e}"))?;
        }
        client.flush().await.context("flushing acknowledgements")?;
    }
    let elapsed = first.map_or(Duration::ZERO, |at| at.elapsed());
    Ok(per_sec(messages.saturating_sub(1), elapsed))
}

/// Removes the bench's stream.
pub async fn nats_cleanup(url: &str, stream: &str) {
    if let Ok(client) = async_nats::connect(url).await {
        let _ = async_nats::jetstream::new(client)
            .delete_stream(stream)
            .await;
    }
}
