//! Which RpcService owns a queue. Two services can name the same queue on one broker: one's `spec.queue.name`
//! equal to another's default `<namespace>.<name>` or to another's explicit name. The oldest claimant owns the
//! queue (and its `.dead` queue); the others neither declare, run workers on, nor delete it, so `deletionPolicy:
//! Delete` never removes a queue another service relies on.

use std::sync::Arc;

use kube::ResourceExt;
use warren_client::topology;

use crate::broker::Broker;
use crate::crd::RpcService;

/// Another service's claim on a queue name: the service and the broker it was last reconciled against (none
/// before its first pass reached a broker).
pub struct Claim {
    pub svc: Arc<RpcService>,
    pub broker: Option<Arc<Broker>>,
}

/// The service that owns the queue `svc` uses on `broker`, when that is another service: the oldest of those that
/// use the same queue name on the same broker. A claimant whose broker is not known yet counts as on the same
/// broker: refusing a service for a while is better than deleting another's queue.
pub fn owner(svc: &RpcService, broker: &Broker, claims: &[Claim]) -> Option<Arc<RpcService>> {
    let mine = queue_names(svc);
    claims
        .iter()
        .filter(|c| !(c.svc.namespace() == svc.namespace() && c.svc.name_any() == svc.name_any()))
        .filter(|c| queue_names(&c.svc).iter().any(|name| mine.contains(name)))
        .filter(|c| c.broker.as_deref().is_none_or(|b| same_broker(b, broker)))
        .map(|c| c.svc.clone())
        .filter(|other| age_key(other) < age_key(svc))
        .min_by_key(|other| age_key(other))
}

/// The queues a service uses: its request queue and its dead-letter queue.
fn queue_names(svc: &RpcService) -> [String; 2] {
    let queue = svc.queue_name();
    [topology::dead_letter_queue_name(&queue), queue]
}

/// Brokers are shared per endpoint; two endpoints (e.g. other credentials) may still be one broker and vhost.
fn same_broker(a: &Broker, b: &Broker) -> bool {
    std::ptr::eq(a, b) || (a.display_name() == b.display_name() && a.vhost() == b.vhost())
}

/// Oldest first; the same second is decided by namespace and name, so every pass agrees.
fn age_key(svc: &RpcService) -> (Option<i64>, String, String) {
    let created = svc.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second());
    (created, svc.namespace().unwrap_or_default(), svc.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{BrokerEndpoint, BrokerPool};
    use crate::crd::RpcServiceSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn service(ns: &str, name: &str, queue: Option<&str>, created: i64) -> Arc<RpcService> {
        let mut spec = RpcServiceSpec::default();
        spec.queue.name = queue.map(str::to_owned);
        let mut svc = RpcService::new(name, spec);
        svc.metadata.namespace = Some(ns.into());
        svc.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        Arc::new(svc)
    }

    fn broker(pool: &BrokerPool, host: &str) -> Arc<Broker> {
        let endpoint = BrokerEndpoint {
            amqp_uri: format!("amqp://u:p@{host}/%2f"),
            management_uri: format!("http://u:p@{host}:15672"),
        };
        // One user per broker, so the pool keeps each.
        pool.get(&kube::runtime::reflector::ObjectRef::new(host), &endpoint).unwrap()
    }

    #[test]
    fn the_oldest_claimant_owns_a_queue_name_on_one_broker() {
        let pool = BrokerPool::default();
        let rabbit = broker(&pool, "rabbit");
        let older = service("shop", "orders", None, 100);
        let younger = service("other", "thief", Some("shop.orders"), 200);
        let claims = |svcs: &[&Arc<RpcService>], b: Option<Arc<Broker>>| -> Vec<Claim> {
            svcs.iter().map(|s| Claim { svc: (*s).clone(), broker: b.clone() }).collect()
        };
        let all = claims(&[&older, &younger], Some(rabbit.clone()));
        assert_eq!(owner(&younger, &rabbit, &all).map(|s| s.name_any()), Some("orders".to_owned()));
        assert!(owner(&older, &rabbit, &all).is_none(), "the older service keeps its queue");

        // Another broker: no conflict; a broker not known yet: assumed the same.
        let elsewhere = broker(&pool, "elsewhere");
        assert!(owner(&younger, &elsewhere, &claims(&[&older, &younger], Some(rabbit.clone()))).is_none());
        assert!(owner(&younger, &elsewhere, &claims(&[&older, &younger], None)).is_some());

        // One's dead-letter queue is the other's request queue (a service named `dead`): a conflict too.
        let dead = service("shop", "dead", None, 50);
        let named_shop = service("other", "x", Some("shop"), 60);
        let pair = claims(&[&dead, &named_shop], Some(rabbit.clone()));
        assert_eq!(owner(&named_shop, &rabbit, &pair).map(|s| s.name_any()), Some("dead".to_owned()));

        // Another queue name: no conflict.
        let unrelated = service("other", "mine", Some("other.mine"), 300);
        assert!(owner(&unrelated, &rabbit, &claims(&[&older, &younger, &unrelated], Some(rabbit.clone()))).is_none());
    }
}
