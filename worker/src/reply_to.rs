//! Which `reply_to` addresses a worker publishes replies to.
//!
//! A reply is published with the worker's own broker identity, so a `reply_to` naming another service's request
//! queue would let any caller inject messages where it may not publish itself (a confused deputy). By default only
//! reply addresses are accepted: RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to.…`) and server-named queues
//! (`amq.gen-…`, what a RabbitMQ-tutorial caller declares). Names in the `amq.` namespace cannot be declared by
//! clients, so neither can be another service's queue. Other reply queues must be allowed explicitly.

use std::fmt;

/// Direct reply-to addresses as the worker sees them (RabbitMQ rewrites the pseudo-queue's name per channel).
pub const DIRECT_REPLY_TO_PREFIX: &str = "amq.rabbitmq.reply-to";
/// Queues the broker named (declared with an empty name).
pub const SERVER_NAMED_PREFIX: &str = "amq.gen-";

/// The accepted `reply_to` values: the reply addresses above, plus an allow-list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplyToPolicy {
    allow: Vec<Pattern>,
    /// Never a reply address, whatever the allow-list says: the worker's own request and dead-letter queues.
    own_queues: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid reply_to pattern {pattern:?}: {reason}")]
pub struct InvalidPattern {
    pattern: String,
    reason: &'static str,
}

impl ReplyToPolicy {
    /// The default policy and `patterns`: a queue name, a prefix ending in `*` (`replies.*`), or `*` alone (any
    /// queue: the behaviour before this policy existed, not recommended).
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, InvalidPattern> {
        let allow = patterns
            .iter()
            .map(|p| p.as_ref().trim())
            .filter(|p| !p.is_empty())
            .map(|pattern| {
                let invalid = |reason| InvalidPattern { pattern: pattern.to_owned(), reason };
                match pattern.strip_suffix('*') {
                    Some("") => Ok(Pattern::Any),
                    Some(prefix) if prefix.contains('*') => Err(invalid("`*` may only end the pattern")),
                    Some(prefix) => Ok(Pattern::Prefix(prefix.to_owned())),
                    None if pattern.contains('*') => Err(invalid("`*` may only end the pattern")),
                    None if pattern.len() > 255 => Err(invalid("longer than a queue name can be")),
                    None => Ok(Pattern::Exact(pattern.to_owned())),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { allow, own_queues: Vec::new() })
    }

    /// Refuses `queues` (the worker's own request and dead-letter queues) even when a pattern matches them: a reply
    /// there would be taken for a request.
    pub fn excluding(mut self, queues: impl IntoIterator<Item = String>) -> Self {
        self.own_queues.extend(queues);
        self
    }

    pub fn allows(&self, reply_to: &str) -> bool {
        if reply_to.starts_with(DIRECT_REPLY_TO_PREFIX) || reply_to.starts_with(SERVER_NAMED_PREFIX) {
            return true;
        }
        if self.own_queues.iter().any(|q| q == reply_to) {
            return false;
        }
        self.allow.iter().any(|pattern| match pattern {
            Pattern::Exact(name) => name == reply_to,
            Pattern::Prefix(prefix) => reply_to.starts_with(prefix.as_str()),
            Pattern::Any => true,
        })
    }
}

impl fmt::Display for ReplyToPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{DIRECT_REPLY_TO_PREFIX}.*, {SERVER_NAMED_PREFIX}*")?;
        for pattern in &self.allow {
            match pattern {
                Pattern::Exact(name) => write!(f, ", {name}")?,
                Pattern::Prefix(prefix) => write!(f, ", {prefix}*")?,
                Pattern::Any => write!(f, ", *")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_addresses_are_accepted_by_default_and_nothing_else() {
        let policy = ReplyToPolicy::default();
        assert!(policy.allows("amq.rabbitmq.reply-to.g1h2AA5yZXBseUAyODc1NDQ4OQAAAC4AAAAAYqn+sw=="));
        assert!(policy.allows("amq.gen-JzTY20BRgKO-HjmUJj0wLg"));
        for refused in ["default.calculator", "default.calculator.dead", "", "amq.direct", "replies"] {
            assert!(!policy.allows(refused), "{refused}");
        }
    }

    #[test]
    fn the_allow_list_takes_names_and_prefixes() {
        let policy = ReplyToPolicy::new(&["replies.*", "callback", ""]).unwrap();
        assert!(policy.allows("replies.a1"));
        assert!(policy.allows("callback"));
        assert!(!policy.allows("callback2"));
        assert!(!policy.allows("default.calculator"));
        assert_eq!(policy.to_string(), "amq.rabbitmq.reply-to.*, amq.gen-*, replies.*, callback");
    }

    #[test]
    fn the_own_queues_are_never_reply_addresses() {
        let policy = ReplyToPolicy::new(&["*"]).unwrap().excluding(["q".to_owned(), "q.dead".to_owned()]);
        assert!(policy.allows("elsewhere"));
        assert!(!policy.allows("q") && !policy.allows("q.dead"));
    }

    #[test]
    fn stars_only_end_a_pattern() {
        assert!(ReplyToPolicy::new(&["a*b"]).is_err());
        assert!(ReplyToPolicy::new(&["*a*"]).is_err());
    }
}
