//! Broker URIs, the one place that parses and redacts them. A URI names one broker node or several nodes of a
//! cluster, with one set of credentials:
//!
//! ```text
//! amqp://user:password@rabbit-0:5672,rabbit-1:5672,rabbit-2:5672/%2f?heartbeat=30
//! http://user:password@rabbit-0:15672,rabbit-1:15672
//! ```
//!
//! The credentials end at the URI's last `@`, so a password may hold `,`, `/`, `@`, `?` or `#` as it is; the host
//! list after it ends at the first `/`, `?` or `#` and is split at commas. Each host gets the URI's path and query.
//! A comma-separated list of whole URIs (`amqp://u:p@rabbit-0/%2f,amqp://u:p@rabbit-1/%2f`, the Python SDK's first
//! form) is accepted too: a comma followed by `scheme://` starts the next URI.
//!
//! Parse errors never repeat the input, and every form shown in logs or errors ([`redact`], [`Redacted`],
//! [`BrokerAddresses`]'s `Display`) leaves the password out.

use std::fmt;

use lapin::uri::AMQPUri;

/// Why a broker URI could not be parsed. Its text never contains the URI (which may hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid broker URI: {reason} (expected amqp[s]://user:password@host:port[,host:port...]/vhost)")]
pub struct InvalidBrokerUri {
    reason: String,
}

impl InvalidBrokerUri {
    fn new(reason: impl Into<String>) -> Self {
        Self { reason: reason.into() }
    }

    /// Why, without the expected form (for messages that name the URI's kind themselves).
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// A URI cut at its credentials and its host list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriParts<'a> {
    pub scheme: &'a str,
    /// Everything before the last `@` (`user:password`), if there is an `@`.
    pub userinfo: Option<&'a str>,
    /// The hosts (`host[:port]`) in the order given; one empty entry when the URI names no host.
    pub hosts: Vec<&'a str>,
    /// The path, query and fragment, shared by every host (may be empty).
    pub tail: &'a str,
}

impl<'a> UriParts<'a> {
    /// Splits `scheme://[userinfo@]host[:port][,host[:port]...][/path][?query]`. A URI without `//` after its
    /// scheme is refused: parsers read `amqp:/user:pass@host` as the path `user:pass@host` on localhost, and the
    /// password ends up wherever the path is shown.
    pub fn split(uri: &'a str) -> Result<Self, InvalidBrokerUri> {
        let (scheme, rest) = uri.split_once(':').ok_or_else(|| InvalidBrokerUri::new("no scheme"))?;
        if !is_scheme(scheme) {
            return Err(InvalidBrokerUri::new("no scheme"));
        }
        let rest = rest.strip_prefix("//").ok_or_else(|| InvalidBrokerUri::new("no `//` after the scheme"))?;
        let (userinfo, after) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let hosts_end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let hosts: Vec<&str> = after[..hosts_end].split(',').collect();
        if hosts.len() > 1 && hosts.iter().any(|h| h.trim().is_empty()) {
            return Err(InvalidBrokerUri::new("an empty entry in the host list"));
        }
        Ok(Self { scheme, userinfo, hosts, tail: &after[hosts_end..] })
    }

    /// The single-host URI of host `index`, its credentials escaped so that any parser reads them whole.
    pub fn single(&self, index: usize) -> String {
        let credentials = self.userinfo.map(|u| format!("{}@", escape_userinfo(u))).unwrap_or_default();
        format!("{}://{credentials}{}{}", self.scheme, self.hosts[index].trim(), self.tail)
    }

    /// The user name (before the first `:`), never the password.
    pub fn user(&self) -> Option<&'a str> {
        self.userinfo.map(|u| u.split_once(':').map_or(u, |(user, _)| user))
    }

    /// The password, if the credentials have one.
    pub fn password(&self) -> Option<&'a str> {
        self.userinfo.and_then(|u| u.split_once(':')).map(|(_, password)| password)
    }
}

impl fmt::Display for UriParts<'_> {
    /// The URI without its password (the query too is left out: some clients put TLS key passwords there).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme)?;
        if let Some(user) = self.user() {
            write!(f, "{user}@")?;
        }
        for (i, host) in self.hosts.iter().enumerate() {
            let separator = if i == 0 { "" } else { "," };
            write!(f, "{separator}{}", redact_host(host.trim()))?;
        }
        let path = &self.tail[..self.tail.find(['?', '#']).unwrap_or(self.tail.len())];
        let query = if path.len() < self.tail.len() { "?***" } else { "" };
        write!(f, "{path}{query}")
    }
}

/// The URIs a comma-separated list of whole URIs holds (a comma followed by `scheme://` starts the next one); any
/// other URI, including one of several hosts, is a list of one.
pub fn uri_list(uri: &str) -> Vec<&str> {
    let mut list = Vec::new();
    let mut start = 0;
    for (comma, _) in uri.match_indices(',') {
        let next = uri[comma + 1..].trim_start();
        if next.split_once("://").is_some_and(|(scheme, _)| is_scheme(scheme)) {
            list.push(uri[start..comma].trim());
            start = comma + 1;
        }
    }
    list.push(uri[start..].trim());
    list
}

/// Any broker URI (AMQP or management, one host or several, well-formed or not) as logs, errors and status may
/// show it: scheme, user, hosts and path; never the password.
pub fn redact(uri: &str) -> String {
    uri_list(uri).into_iter().map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(uri: &str) -> String {
    match UriParts::split(uri) {
        Ok(parts) => parts.to_string(),
        // Malformed: nothing after the scheme can be told apart from a password.
        Err(_) => match uri.split_once(':') {
            Some((scheme, _)) if is_scheme(scheme) => format!("{scheme}:<malformed>"),
            _ => "<malformed URI>".to_owned(),
        },
    }
}

/// A host entry for display: a port that is not a number is someone's password typed in the wrong place.
fn redact_host(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((name, port)) if !host.ends_with(']') && !port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{name}:***")
        }
        _ => host.to_owned(),
    }
}

fn is_scheme(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Escapes the characters that would end the credentials early for a URL parser (they are decoded again).
fn escape_userinfo(userinfo: &str) -> String {
    let mut escaped = String::with_capacity(userinfo.len());
    for c in userinfo.chars() {
        match c {
            '/' => escaped.push_str("%2F"),
            '?' => escaped.push_str("%3F"),
            '#' => escaped.push_str("%23"),
            '@' => escaped.push_str("%40"),
            '[' => escaped.push_str("%5B"),
            ']' => escaped.push_str("%5D"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// The AMQP addresses of a broker: one node, or several nodes of a cluster that clients fail over between.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerAddresses {
    nodes: Vec<AMQPUri>,
}

impl BrokerAddresses {
    /// Parses an `amqp://` or `amqps://` URI of one or several hosts (or a comma-separated list of such URIs, all
    /// naming the same vhost).
    pub fn parse(uri: &str) -> Result<Self, InvalidBrokerUri> {
        let mut nodes = Vec::new();
        for listed in uri_list(uri) {
            let parts = UriParts::split(listed)?;
            if !matches!(parts.scheme, "amqp" | "amqps") {
                return Err(InvalidBrokerUri::new("the scheme is not amqp or amqps"));
            }
            for i in 0..parts.hosts.len() {
                let single = parts.single(i);
                let node = single
                    .parse::<AMQPUri>()
                    .map_err(|reason| InvalidBrokerUri::new(scrub(&scrub(&scrub(&reason, &single), listed), uri)))?;
                nodes.push(node);
            }
        }
        if nodes.iter().any(|n| n.vhost != nodes[0].vhost) {
            return Err(InvalidBrokerUri::new("the listed URIs name different vhosts"));
        }
        Ok(Self { nodes })
    }

    /// One address per node, in the order given (at least one).
    pub fn nodes(&self) -> &[AMQPUri] {
        &self.nodes
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The address of node `index` modulo the count, so a rotating counter can index it.
    pub fn node(&self, index: usize) -> &AMQPUri {
        &self.nodes[index % self.nodes.len()]
    }

    /// The virtual host (the same on every node).
    pub fn vhost(&self) -> &str {
        &self.nodes[0].vhost
    }

    /// Changes every node's address alike (e.g. a default `frame_max`).
    pub fn for_each_node(&mut self, mut change: impl FnMut(&mut AMQPUri)) {
        self.nodes.iter_mut().for_each(&mut change);
    }
}

impl fmt::Display for BrokerAddresses {
    /// `amqp://user@host:port,host:port/vhost` (a list of URIs when the nodes' users differ), never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first = &self.nodes[0];
        let alike = |n: &AMQPUri| {
            n.scheme == first.scheme && n.authority.userinfo.username == first.authority.userinfo.username
        };
        if !self.nodes.iter().all(alike) {
            let listed: Vec<String> = self.nodes.iter().map(|n| Redacted(n).to_string()).collect();
            return f.write_str(&listed.join(","));
        }
        write!(f, "{}://{}@", first.scheme, first.authority.userinfo.username)?;
        for (i, node) in self.nodes.iter().enumerate() {
            let separator = if i == 0 { "" } else { "," };
            write!(f, "{separator}{}:{}", node.authority.host, node.authority.port)?;
        }
        write!(f, "/{}", first.vhost.replace('/', "%2f"))
    }
}

impl fmt::Debug for BrokerAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Parses an AMQP URI of one host. Unlike `AMQPUri::from_str`, the error does not repeat the URI, and a URI
/// without `//` after its scheme is refused. A URI of several hosts is refused: use [`BrokerAddresses::parse`].
pub fn parse(uri: &str) -> Result<AMQPUri, InvalidBrokerUri> {
    let mut addresses = BrokerAddresses::parse(uri)?;
    if addresses.len() > 1 {
        return Err(InvalidBrokerUri::new("several hosts where one is expected"));
    }
    Ok(addresses.nodes.remove(0))
}

/// The parser's reason with every trace of the input removed: the input itself, and anything from the input
/// after its first `:` (a password in a malformed URI) that the reason may quote.
fn scrub(reason: &str, uri: &str) -> String {
    if uri.is_empty() {
        return reason.to_owned();
    }
    let mut scrubbed = reason.replace(uri, "<uri>");
    if let Some((_, after_scheme)) = uri.split_once(':') {
        for part in after_scheme.split(['@', '/', ':', '?', '#', ',']).filter(|p| p.len() >= 3) {
            scrubbed = scrubbed.replace(part, "***");
        }
    }
    scrubbed
}

/// One node's address for logs: scheme, user, host, port and vhost; never the password.
pub struct Redacted<'a>(pub &'a AMQPUri);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let uri = self.0;
        let auth = &uri.authority;
        let vhost = uri.vhost.replace('/', "%2f");
        write!(f, "{}://{}@{}:{}/{vhost}", uri.scheme, auth.userinfo.username, auth.host, auth.port)
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

    /// URIs as users get them wrong, each with the password `s3cret` somewhere.
    const MALFORMED: &[&str] = &[
        "amqp:user:s3cret@host",
        "amqp:/user:s3cret@host:5672",
        "http://user:s3cret@host/",
        "amqp://user:s3cret@host:notaport/%2f",
        "amqp://user:s3cret@host/%2f?frame_max=abc",
        "amqps://user:s3cret@[::1:5671/%2f",
        "user:s3cret@host",
        "amqp://user:s3cret@h1:5672,,h2:5672/%2f",
        "amqp://user:s3cret@h1:5672,h2:x/%2f",
        "amqp://user:s3cret",
        "amqp://user:s3cret@",
        "amqp:user:s3cret",
        "s3cret",
        "amqp://user:s3cret@h1,h2:s3cret/%2f",
    ];

    #[test]
    fn errors_never_repeat_the_uri_or_its_password() {
        for uri in MALFORMED {
            let Err(error) = BrokerAddresses::parse(uri) else { continue };
            let error = error.to_string();
            assert!(!error.contains("s3cret"), "{uri}: {error}");
            assert!(error.starts_with("invalid broker URI: "), "{error}");
        }
        for uri in ["amqp:user:s3cret@host", "http://user:s3cret@host/", "amqp://user:s3cret@host:notaport/%2f"] {
            assert!(parse(uri).is_err(), "{uri}");
        }
    }

    #[test]
    fn redaction_never_shows_the_password_whatever_the_input() {
        let well_formed = [
            "amqp://user:s3cret@rabbit:5672/%2f",
            "amqp://user:s3cret@rabbit-0:5672,rabbit-1:5672,rabbit-2:5672/%2f",
            "amqp://user:pa,s3cret@rabbit-0,rabbit-1/%2f",
            "amqp://user:pa@s3cret@rabbit-0,rabbit-1/%2f",
            "amqp://user:pa/s3cret@rabbit-0,rabbit-1/%2f",
            "http://user:s3cret@h1:15672,h2:15672",
            "amqps://user:s3cret@rabbit/%2f?password=s3cret&heartbeat=10",
        ];
        for uri in MALFORMED.iter().chain(&well_formed) {
            let shown = redact(uri);
            assert!(!shown.contains("s3cret"), "{uri}: {shown}");
        }
        for uri in &well_formed[..5] {
            let addresses = BrokerAddresses::parse(uri).unwrap();
            for shown in [addresses.to_string(), format!("{addresses:?}")] {
                assert!(!shown.contains("s3cret"), "{uri}: {shown}");
            }
            for node in addresses.nodes() {
                assert!(!Redacted(node).to_string().contains("s3cret"));
            }
        }
        assert_eq!(redact("amqp:user:s3cret@host"), "amqp:<malformed>");
        assert_eq!(redact("s3cret"), "<malformed URI>");
        assert_eq!(redact("amqp://user:s3cret@h1:5672,h2/%2f"), "amqp://user@h1:5672,h2/%2f");
        assert_eq!(redact("http://rabbit:15672"), "http://rabbit:15672");
        assert_eq!(redact("amqp://user:s3cret"), "amqp://user:***");
        assert_eq!(redact("amqp://u:p@h/v?heartbeat=1"), "amqp://u@h/v?***");
    }

    #[test]
    fn one_host_parses_as_before() {
        let uri = "amqp://app:s3cret@rabbit.example:5673/prod?heartbeat=7";
        let addresses = BrokerAddresses::parse(uri).unwrap();
        assert_eq!(addresses.nodes(), &[uri.parse::<AMQPUri>().unwrap()]);
        assert_eq!(parse(uri).unwrap(), uri.parse::<AMQPUri>().unwrap());
        assert_eq!(addresses.to_string(), "amqp://app@rabbit.example:5673/prod");
    }

    #[test]
    fn several_hosts_share_credentials_vhost_and_query() {
        let addresses =
            BrokerAddresses::parse("amqp://app:p,w@d@rabbit-0:5672,rabbit-1,rabbit-2:5673/prod?heartbeat=7").unwrap();
        let hosts: Vec<(&str, u16)> =
            addresses.nodes().iter().map(|n| (n.authority.host.as_str(), n.authority.port)).collect();
        assert_eq!(hosts, [("rabbit-0", 5672), ("rabbit-1", 5672), ("rabbit-2", 5673)]);
        for node in addresses.nodes() {
            assert_eq!(node.authority.userinfo.username, "app");
            assert_eq!(node.authority.userinfo.password, "p,w@d");
            assert_eq!(node.vhost, "prod");
            assert_eq!(node.query.heartbeat, Some(7));
        }
        assert_eq!(addresses.to_string(), "amqp://app@rabbit-0:5672,rabbit-1:5672,rabbit-2:5673/prod");
        assert_eq!(addresses.node(4).authority.host, "rabbit-1");
        assert!(parse("amqp://u:p@a,b/").is_err());
        let slash = BrokerAddresses::parse("amqps://u:a/b?c#d@h1,h2").unwrap();
        assert_eq!(slash.node(1).authority.userinfo.password, "a/b?c#d");
        assert_eq!(slash.vhost(), "/");
    }

    #[test]
    fn a_list_of_whole_uris_is_accepted_too() {
        let uri = "amqp://a:s3cret@rabbit-0:5672/prod, amqp://b:s3cret@rabbit-1,rabbit-2/prod";
        let addresses = BrokerAddresses::parse(uri).unwrap();
        let users: Vec<&str> = addresses.nodes().iter().map(|n| n.authority.userinfo.username.as_str()).collect();
        assert_eq!(users, ["a", "b", "b"]);
        assert_eq!(
            addresses.to_string(),
            "amqp://a@rabbit-0:5672/prod,amqp://b@rabbit-1:5672/prod,amqp://b@rabbit-2:5672/prod"
        );
        assert_eq!(redact(uri), "amqp://a@rabbit-0:5672/prod,amqp://b@rabbit-1,rabbit-2/prod");
        assert_eq!(uri_list("amqp://u:p,w@h1,h2/%2f"), ["amqp://u:p,w@h1,h2/%2f"]);
        let error = BrokerAddresses::parse("amqp://u:s3cret@h1/a,amqp://u:s3cret@h2/b").unwrap_err().to_string();
        assert!(error.contains("different vhosts") && !error.contains("s3cret"), "{error}");
    }

    #[test]
    fn redacted_keeps_user_and_host_only() {
        let uri = parse("amqp://app:s3cret@rabbit.example:5673/prod").unwrap();
        assert_eq!(Redacted(&uri).to_string(), "amqp://app@rabbit.example:5673/prod");
        let default = parse("amqps://rabbit").unwrap();
        assert_eq!(Redacted(&default).to_string(), "amqps://guest@rabbit:5671/%2f");
    }
}
