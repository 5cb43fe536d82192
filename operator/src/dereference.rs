//! The dereference step: the broker Secret an RpcService names (or the operator's default one), and the shared
//! [`Broker`] for the endpoint it holds. Credentials stay in memory; they are never logged or written.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use warren_client::endpoint::{SECRET_MANAGEMENT_URI_KEY, SECRET_URI_KEY};

use crate::broker::{Broker, BrokerEndpoint, BrokerError};
use crate::context::Context;
use crate::crd::RpcService;
use crate::error::KUBERNETES_ERROR;

#[derive(Debug, thiserror::Error)]
pub enum DereferenceError {
    #[error("no broker Secret: spec.broker.secretRef is empty and the operator has no --default-broker-secret")]
    NoBrokerSecret,

    #[error("failed to read broker Secret {namespace}/{name}: it does not exist")]
    SecretNotFound { namespace: String, name: String },

    #[error("failed to read broker Secret {namespace}/{name}: {source}")]
    ReadSecret { namespace: String, name: String, source: kube::Error },

    #[error("broker Secret {name} is invalid: {reason}")]
    InvalidBrokerSecret { name: String, reason: String },

    #[error(transparent)]
    Broker(BrokerError),
}

impl DereferenceError {
    /// The condition reason and metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoBrokerSecret | Self::SecretNotFound { .. } => "SecretNotFound",
            Self::ReadSecret { .. } => KUBERNETES_ERROR,
            Self::InvalidBrokerSecret { .. } => "InvalidBrokerSecret",
            Self::Broker(e) => e.reason(),
        }
    }

    /// A Secret that is missing or wrong waits for the user to change it; a failed read is retried soon.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::NoBrokerSecret | Self::SecretNotFound { .. } | Self::InvalidBrokerSecret { .. } => true,
            Self::ReadSecret { .. } => false,
            Self::Broker(e) => e.is_permanent(),
        }
    }
}

/// What an RpcService refers to, resolved.
pub struct Dereferenced {
    /// The broker Secret's name (workers read the AMQP URI from it through `secretKeyRef`).
    pub secret_name: String,
    pub broker: Arc<Broker>,
}

/// Reads the broker Secret and returns the shared broker for the endpoint it names. A service whose Secret is
/// gone or invalid no longer holds the broker it used before (a failed read keeps it: it is retried soon).
pub async fn broker(svc: &RpcService, ctx: &Context) -> Result<Dereferenced, DereferenceError> {
    let user = ObjectRef::from_obj(svc);
    let found = read_and_share(svc, &user, ctx).await;
    if let Err(error) = &found
        && error.is_permanent()
    {
        ctx.brokers.release(&user);
    }
    found
}

async fn read_and_share(
    svc: &RpcService,
    user: &ObjectRef<RpcService>,
    ctx: &Context,
) -> Result<Dereferenced, DereferenceError> {
    let namespace = svc.namespace().unwrap_or_default();
    let name = match (&svc.spec.broker.secret_ref, &ctx.config.default_broker_secret) {
        (Some(r), _) => r.name.clone(),
        (None, Some(default)) => default.clone(),
        (None, None) => return Err(DereferenceError::NoBrokerSecret),
    };
    let endpoint = match ctx.known_endpoint(&namespace, &name) {
        Some(endpoint) => endpoint,
        None => {
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
            ctx.metrics.kubernetes_request("get", "secrets");
            let secret = match secrets.get_opt(&name).await {
                Ok(Some(secret)) => secret,
                Ok(None) => return Err(DereferenceError::SecretNotFound { namespace, name }),
                Err(source) => return Err(DereferenceError::ReadSecret { namespace, name, source }),
            };
            let endpoint = endpoint(&secret)
                .map_err(|reason| DereferenceError::InvalidBrokerSecret { name: name.clone(), reason })?;
            ctx.remember_endpoint(&secret, &endpoint);
            endpoint
        }
    };
    let broker = ctx.brokers.get(user, &endpoint).map_err(|e| match e {
        BrokerError::InvalidUri(reason) => DereferenceError::InvalidBrokerSecret { name: name.clone(), reason },
        other => DereferenceError::Broker(other),
    })?;
    Ok(Dereferenced { secret_name: name, broker })
}

/// The broker endpoint a Secret holds, or why it holds none.
fn endpoint(secret: &Secret) -> Result<BrokerEndpoint, String> {
    let key = |k: &str| -> Result<String, String> {
        let data = secret.data.as_ref().and_then(|d| d.get(k)).map(|b| b.0.clone());
        let value = data.or_else(|| secret.string_data.as_ref().and_then(|d| d.get(k)).map(|s| s.clone().into_bytes()));
        let value = value.ok_or_else(|| format!("key {k} is missing"))?;
        String::from_utf8(value).map(|s| s.trim().to_owned()).map_err(|_| format!("key {k} is not UTF-8"))
    };
    Ok(BrokerEndpoint { amqp_uri: key(SECRET_URI_KEY)?, management_uri: key(SECRET_MANAGEMENT_URI_KEY)? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    #[test]
    fn the_endpoint_comes_from_data_or_string_data_and_names_a_missing_key() {
        let secret = Secret {
            data: Some([("uri".to_owned(), ByteString(b"amqp://h/ \n".to_vec()))].into()),
            string_data: Some([("managementUri".to_owned(), "http://h:15672".to_owned())].into()),
            ..Secret::default()
        };
        let endpoint = endpoint(&secret).unwrap();
        assert_eq!((endpoint.amqp_uri.as_str(), endpoint.management_uri.as_str()), ("amqp://h/", "http://h:15672"));
        let partial = Secret { string_data: None, ..secret };
        assert_eq!(super::endpoint(&partial).unwrap_err(), "key managementUri is missing");
    }
}
