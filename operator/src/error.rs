//! The reconciler's errors, one variant per step of the pipeline. Each maps to a condition reason and a metric
//! label ([`Error::reason`]) and to a retry policy ([`Error::is_permanent`]), by its type, never by its text.

use crate::broker::BrokerError;
use crate::dereference::DereferenceError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// dereference: the broker Secret and the broker it names.
    #[error(transparent)]
    Dereference(#[from] DereferenceError),

    /// validate: a queue name RabbitMQ cannot hold (with `.dead`, over 255 bytes).
    #[error("queue name {queue} is too long: with '.dead' it must fit in 255 bytes; set a shorter spec.queue.name")]
    InvalidQueueName { queue: String },

    /// validate: another RpcService, created earlier, uses the same queue on the same broker.
    #[error(
        "queue {queue} (or its .dead queue) is already used by RpcService {owner} on the same broker; this service declares, runs and deletes nothing until it has a queue of its own: recreate it with another spec.queue.name"
    )]
    QueueClaimed { queue: String, owner: String },

    /// apply: the queues on the broker.
    #[error(transparent)]
    DeclareQueues(BrokerError),

    /// apply: the Deployment as it is, the starting point of the replicas.
    #[error("failed to read Deployment {name}: {source}")]
    ReadDeployment { name: String, source: kube::Error },

    /// apply: the Deployment by server-side apply.
    #[error("failed to apply Deployment {name}: {source}")]
    ApplyDeployment { name: String, source: kube::Error },

    /// status: the one status patch of a pass.
    #[error("failed to patch the status: {0}")]
    PatchStatus(#[source] kube::Error),

    /// cleanup: `deletionPolicy: Delete` removes the queues.
    #[error(transparent)]
    DeleteQueues(BrokerError),

    #[error("failed to update the finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The condition reason and metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Dereference(e) => e.reason(),
            Self::DeclareQueues(e) | Self::DeleteQueues(e) => e.reason(),
            Self::ReadDeployment { .. } | Self::ApplyDeployment { .. } | Self::PatchStatus(_) => KUBERNETES_ERROR,
            Self::Finalizer(_) => "FinalizerError",
            Self::InvalidQueueName { .. } => "InvalidQueueName",
            Self::QueueClaimed { .. } => "QueueNameConflict",
        }
    }

    /// Permanent errors wait for the user (or a watched object) to change something; transient ones retry soon.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Dereference(e) => e.is_permanent(),
            Self::InvalidQueueName { .. } | Self::QueueClaimed { .. } => true,
            Self::DeclareQueues(e) | Self::DeleteQueues(e) => e.is_permanent(),
            Self::ReadDeployment { .. } | Self::ApplyDeployment { .. } | Self::PatchStatus(_) | Self::Finalizer(_) => {
                false
            }
        }
    }
}

/// The reason of every failed call to the API server: transient, retried soon.
pub const KUBERNETES_ERROR: &str = "KubernetesError";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_retry_policy_follow_the_error_type() {
        let missing = Error::from(DereferenceError::SecretNotFound { namespace: "ns".into(), name: "later".into() });
        assert_eq!((missing.reason(), missing.is_permanent()), ("SecretNotFound", true));
        assert!(missing.to_string().contains("ns/later"), "{missing}");
        let conflict = Error::DeclareQueues(BrokerError::QueueConflict {
            queue: "q".into(),
            argument: "x-max-length".into(),
            message: "inequivalent arg".into(),
        });
        assert_eq!((conflict.reason(), conflict.is_permanent()), ("QueueConflict", true));
        let refused = Error::DeleteQueues(BrokerError::Refused("HTTP 403".into()));
        assert_eq!((refused.reason(), refused.is_permanent()), ("BrokerRefused", true));
        let down = Error::DeclareQueues(BrokerError::Unavailable("connection refused".into()));
        assert_eq!((down.reason(), down.is_permanent()), ("BrokerUnavailable", false));
        let invalid =
            Error::from(DereferenceError::InvalidBrokerSecret { name: "rabbitmq".into(), reason: "x".into() });
        assert_eq!((invalid.reason(), invalid.is_permanent()), ("InvalidBrokerSecret", true));
        assert!(invalid.to_string().contains("rabbitmq"), "{invalid}");
    }
}
