//! The queues behind a service: one builder of their declaration arguments, shared by the operator and by
//! `warren-worker --declare`, so both declare exactly the same queue (RabbitMQ refuses a re-declaration whose
//! arguments differ).

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// The suffix of a request queue's dead-letter queue.
pub const DEAD_LETTER_SUFFIX: &str = ".dead";
/// The longest queue name RabbitMQ accepts, in bytes (an AMQP short string).
pub const MAX_QUEUE_NAME_BYTES: usize = 255;

/// RabbitMQ queue type: the one mapping to `x-queue-type` (the CRD's `queue.type` and the worker's
/// `--queue-type` both map here).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum QueueKind {
    #[default]
    Quorum,
    Classic,
}

impl QueueKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quorum => "quorum",
            Self::Classic => "classic",
        }
    }
}

/// What a request queue is declared with.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueOptions {
    pub kind: QueueKind,
    /// Deliveries before a request is dead-lettered (quorum queues only).
    pub delivery_limit: Option<i64>,
    /// The most requests the queue holds; past it new publishes are rejected.
    pub max_length: Option<i64>,
    /// How long a request may wait, in milliseconds.
    pub message_ttl_ms: Option<i64>,
}

impl QueueOptions {
    /// The options as a service states them (the CRD's `queue`, the worker's `--declare` flags): the TTL in seconds.
    pub fn new(
        kind: QueueKind,
        delivery_limit: i64,
        max_length: Option<i64>,
        message_ttl_seconds: Option<i64>,
    ) -> Self {
        Self {
            kind,
            delivery_limit: Some(delivery_limit),
            max_length,
            message_ttl_ms: message_ttl_seconds.map(|s| s.saturating_mul(1000)),
        }
    }
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self { kind: QueueKind::Quorum, delivery_limit: Some(5), max_length: None, message_ttl_ms: None }
    }
}

/// One queue argument's value, kept as plain data so it can become an AMQP field table or be compared with what
/// the management API reports.
#[derive(Clone, Debug, PartialEq)]
pub enum ArgValue {
    Str(String),
    Int(i64),
}

/// The dead-letter queue of `queue`.
pub fn dead_letter_queue_name(queue: &str) -> String {
    format!("{queue}{DEAD_LETTER_SUFFIX}")
}

/// The request queue's arguments, in a stable order.
pub fn request_queue_arguments(queue: &str, options: &QueueOptions) -> Vec<(&'static str, ArgValue)> {
    let mut args = vec![
        ("x-queue-type", ArgValue::Str(options.kind.as_str().into())),
        // Dead-letter through the default exchange straight into `<queue>.dead`.
        ("x-dead-letter-exchange", ArgValue::Str(String::new())),
        ("x-dead-letter-routing-key", ArgValue::Str(dead_letter_queue_name(queue))),
    ];
    if options.kind == QueueKind::Quorum
        && let Some(limit) = options.delivery_limit
    {
        args.push(("x-delivery-limit", ArgValue::Int(limit)));
    }
    if let Some(max) = options.max_length {
        args.push(("x-max-length", ArgValue::Int(max)));
        // Refuse new requests instead of silently dropping the oldest waiting ones.
        args.push(("x-overflow", ArgValue::Str("reject-publish".into())));
    }
    if let Some(ttl) = options.message_ttl_ms {
        args.push(("x-message-ttl", ArgValue::Int(ttl)));
    }
    args
}

/// The dead-letter queue's arguments: same type, nothing else (it only holds what an operator inspects).
pub fn dead_letter_queue_arguments(options: &QueueOptions) -> Vec<(&'static str, ArgValue)> {
    vec![("x-queue-type", ArgValue::Str(options.kind.as_str().into()))]
}

/// Arguments as the AMQP field table `queue.declare` takes.
pub fn field_table(args: &[(&'static str, ArgValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in args {
        let value = match value {
            ArgValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
            ArgValue::Int(i) => AMQPValue::LongLongInt(*i),
        };
        table.insert(ShortString::from(*name), value);
    }
    table
}

/// Declares the request queue and its dead-letter queue (durable), the dead-letter queue first so nothing
/// dead-lettered in between is dropped.
pub async fn declare_service_queues(
    channel: &lapin::Channel,
    queue: &str,
    options: &QueueOptions,
) -> lapin::Result<()> {
    let durable = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
    channel
        .queue_declare(
            dead_letter_queue_name(queue).as_str().into(),
            durable,
            field_table(&dead_letter_queue_arguments(options)),
        )
        .await?;
    channel.queue_declare(queue.into(), durable, field_table(&request_queue_arguments(queue, options))).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_defaults_dead_letter_into_dot_dead_with_a_delivery_limit() {
        let args = request_queue_arguments("default.calc", &QueueOptions::default());
        assert_eq!(
            args,
            vec![
                ("x-queue-type", ArgValue::Str("quorum".into())),
                ("x-dead-letter-exchange", ArgValue::Str(String::new())),
                ("x-dead-letter-routing-key", ArgValue::Str("default.calc.dead".into())),
                ("x-delivery-limit", ArgValue::Int(5)),
            ]
        );
    }

    #[test]
    fn classic_queues_get_no_delivery_limit_and_max_length_rejects_publishes() {
        let options = QueueOptions {
            kind: QueueKind::Classic,
            delivery_limit: Some(3),
            max_length: Some(10),
            message_ttl_ms: Some(30_000),
        };
        let args = request_queue_arguments("q", &options);
        assert!(!args.iter().any(|(k, _)| *k == "x-delivery-limit"));
        assert!(args.contains(&("x-max-length", ArgValue::Int(10))));
        assert!(args.contains(&("x-overflow", ArgValue::Str("reject-publish".into()))));
        assert!(args.contains(&("x-message-ttl", ArgValue::Int(30_000))));
    }

    #[test]
    fn options_take_the_ttl_in_seconds() {
        let options = QueueOptions::new(QueueKind::Classic, 3, Some(10), Some(30));
        assert_eq!(options.message_ttl_ms, Some(30_000));
        assert_eq!(QueueOptions::new(QueueKind::Quorum, 5, None, None), QueueOptions::default());
    }

    #[test]
    fn field_table_keeps_every_argument() {
        let table = field_table(&request_queue_arguments("q", &QueueOptions::default()));
        assert_eq!(table.inner().len(), 4);
    }
}
