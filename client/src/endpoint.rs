//! Where a broker is: its AMQP URI and its management API URI, and the names that carry them between the
//! operator, the worker, the `warren` CLI and the tests — environment variables and the broker Secret's keys.

use std::fmt;

use crate::broker_uri::redact;

/// The environment variable holding the AMQP URI (the worker, the CLI, `scripts/env up`, the tests). Like every
/// broker URI here it may name several nodes: `amqp://user:pass@rabbit-0:5672,rabbit-1:5672/%2f`
/// ([`crate::broker_uri`]).
pub const BROKER_URI_ENV: &str = "WARREN_BROKER_URI";
/// The environment variable holding the management API URI (`scripts/env up`, the tests).
pub const MANAGEMENT_URI_ENV: &str = "WARREN_MANAGEMENT_URI";
/// The broker Secret's key of the AMQP URI (amqp:// or amqps://, with credentials and vhost; one host or several).
pub const SECRET_URI_KEY: &str = "uri";
/// The broker Secret's key of the management API URI (http:// or https://, with credentials; one host or several).
pub const SECRET_MANAGEMENT_URI_KEY: &str = "managementUri";
/// A broker on this machine with RabbitMQ's default user, what `scripts/env up` starts.
pub const LOCAL_BROKER_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The management API of [`LOCAL_BROKER_URI`]'s broker.
pub const LOCAL_MANAGEMENT_URI: &str = "http://guest:guest@127.0.0.1:15672";

/// A broker's two URIs. `Debug` never prints credentials.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BrokerEndpoint {
    pub amqp_uri: String,
    pub management_uri: String,
}

impl BrokerEndpoint {
    /// From [`BROKER_URI_ENV`] and [`MANAGEMENT_URI_ENV`], each defaulting to the local broker.
    pub fn from_env() -> Self {
        let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
        Self {
            amqp_uri: var(BROKER_URI_ENV, LOCAL_BROKER_URI),
            management_uri: var(MANAGEMENT_URI_ENV, LOCAL_MANAGEMENT_URI),
        }
    }
}

impl fmt::Debug for BrokerEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerEndpoint")
            .field("amqp", &redact(&self.amqp_uri))
            .field("management", &redact(&self.management_uri))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_credentials() {
        let e =
            BrokerEndpoint { amqp_uri: "amqp://u:s3cret@h/".into(), management_uri: "http://u:s3cret@h:15672".into() };
        assert!(!format!("{e:?}").contains("s3cret"));
        let malformed = BrokerEndpoint { amqp_uri: "amqp:u:s3cret@h".into(), management_uri: "u:s3cret@h".into() };
        assert!(!format!("{malformed:?}").contains("s3cret"));
    }
}
