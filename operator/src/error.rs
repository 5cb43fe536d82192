//! The reconciler's errors: each maps to a condition reason, a metric label, and a retry policy.

use crate::broker::BrokerError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read broker Secret {namespace}/{name}: it does not exist")]
    SecretNotFound { namespace: String, name: String },

    #[error("broker Secret {name} is invalid: {reason}")]
    InvalidBrokerSecret { name: String, reason: String },

    #[error("no broker Secret: spec.broker.secretRef is empty and the operator has no --default-broker-secret")]
    NoBrokerSecret,

    #[error(transparent)]
    Broker(BrokerError),

    #[error("failed to call the Kubernetes API: {0}")]
    Kube(#[source] kube::Error),

    #[error("failed to update the finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The condition reason and metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::SecretNotFound { .. } | Self::NoBrokerSecret => "SecretNotFound",
            Self::InvalidBrokerSecret { .. } => "InvalidBrokerSecret",
            Self::Broker(BrokerError::QueueConflict { .. }) => "QueueConflict",
            Self::Broker(BrokerError::InvalidUri(_)) => "InvalidBrokerSecret",
            Self::Broker(BrokerError::Refused(_)) => "BrokerRefused",
            Self::Broker(_) => "BrokerUnavailable",
            Self::Kube(_) => "KubernetesError",
            Self::Finalizer(_) => "FinalizerError",
        }
    }

    /// Permanent errors wait for the user (or a watched object) to change something; transient ones retry soon.
    pub fn is_permanent(&self) -> bool {
        matches!(self.reason(), "SecretNotFound" | "InvalidBrokerSecret" | "QueueConflict" | "BrokerRefused")
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Self::Kube(e)
    }
}

impl From<BrokerError> for Error {
    fn from(e: BrokerError) -> Self {
        Self::Broker(e)
    }
}
