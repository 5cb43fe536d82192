//! Broker URIs without leaking their password: parsing whose errors never echo the input, and a redacted form for
//! logs. Shared by the caller, the CLI and the worker.

use std::fmt;

use lapin::uri::AMQPUri;

/// Why a broker URI could not be parsed. Its text never contains the URI (which may hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid broker URI: {reason} (expected amqp[s]://user:password@host:port/vhost)")]
pub struct InvalidBrokerUri {
    reason: String,
}

/// Parses an AMQP URI. Unlike `AMQPUri::from_str`, the error does not repeat the URI, and a URI without `//`
/// after its scheme is refused: the parser would take `amqp:/user:pass@host` for the vhost `user:pass@host` on
/// localhost, and the password would end up wherever the vhost is shown.
pub fn parse(uri: &str) -> Result<AMQPUri, InvalidBrokerUri> {
    let has_authority = uri.split_once(':').is_some_and(|(_, rest)| rest.starts_with("//"));
    if !has_authority {
        return Err(InvalidBrokerUri { reason: "no `//` after the scheme".into() });
    }
    uri.parse::<AMQPUri>().map_err(|reason| InvalidBrokerUri { reason: scrub(&reason, uri) })
}

/// The parser's reason with every trace of the input removed: the input itself, and anything from the input
/// after its first `:` (a password in a malformed URI) that the reason may quote.
fn scrub(reason: &str, uri: &str) -> String {
    if uri.is_empty() {
        return reason.to_owned();
    }
    let mut scrubbed = reason.replace(uri, "<uri>");
    if let Some((_, after_scheme)) = uri.split_once(':') {
        for part in after_scheme.split(['@', '/', ':', '?', '#']).filter(|p| p.len() >= 3) {
            scrubbed = scrubbed.replace(part, "***");
        }
    }
    scrubbed
}

/// A URI for logs: scheme, user, host, port and vhost; never the password.
pub struct Redacted<'a>(pub &'a AMQPUri);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let uri = self.0;
        let scheme = match uri.scheme {
            lapin::uri::AMQPScheme::AMQP => "amqp",
            lapin::uri::AMQPScheme::AMQPS => "amqps",
        };
        let auth = &uri.authority;
        let vhost = uri.vhost.replace('/', "%2f");
        write!(f, "{scheme}://{}@{}:{}/{vhost}", auth.userinfo.username, auth.host, auth.port)
    }
}

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_never_repeat_the_uri_or_its_password() {
        for uri in [
            "amqp:user:s3cret@host",
            "amqp:/user:s3cret@host:5672",
            "http://user:s3cret@host/",
            "amqp://user:s3cret@host:notaport/%2f",
            "amqp://user:s3cret@host/%2f?frame_max=abc",
            "amqps://user:s3cret@[::1:5671/%2f",
            "user:s3cret@host",
        ] {
            let error = parse(uri).expect_err(uri).to_string();
            assert!(!error.contains("s3cret"), "{uri}: {error}");
            assert!(error.starts_with("invalid broker URI: "), "{error}");
        }
    }

    #[test]
    fn redacted_keeps_user_and_host_only() {
        let uri = parse("amqp://app:s3cret@rabbit.example:5673/prod").unwrap();
        assert_eq!(Redacted(&uri).to_string(), "amqp://app@rabbit.example:5673/prod");
        let default = parse("amqps://rabbit").unwrap();
        assert_eq!(Redacted(&default).to_string(), "amqps://guest@rabbit:5671/%2f");
    }
}
