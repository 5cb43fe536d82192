//! warren-operator: reconciles `RpcService` objects into RabbitMQ queues and an autoscaled worker Deployment.
//!
//! Two loops share a [`context::Context`]:
//! - the reconcile pipeline ([`reconcile`]): [`dereference`] (the broker Secret) → [`build`] (queue options and
//!   the Deployment, pure) → apply (queues through [`broker`], the Deployment by server-side apply) → [`status`]
//!   (the next status, pure) → one status patch and the events;
//! - the [`observer`]: observe (queue figures from the management API) → decide (the policy of the
//!   `warren-autoscale` crate, which holds no Kubernetes types) → act
//!   (trigger the reconcile that applies the decision).
//!
//! [`controller`] wires the pipeline to the API server's watches; `main.rs` only wires the controller, the
//! observer, the HTTP server ([`http`]), leader election ([`leader`]) and signals.

pub mod broker;
pub mod build;
pub mod context;
pub mod controller;
pub mod crd;
pub mod dereference;
pub mod error;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod observer;
pub mod ownership;
pub mod reconcile;
pub mod status;

pub use crd::{RpcService, RpcServiceSpec, RpcServiceStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// The RpcService CRD, with its descriptions reflowed: doc comments wrap at 120 columns, `kubectl explain` wraps
/// by itself, so line breaks inside a paragraph only break its sentences.
pub fn crd() -> CustomResourceDefinition {
    use kube::CustomResourceExt;
    let mut value = serde_json::to_value(RpcService::crd()).expect("the CRD always serializes");
    reflow_descriptions(&mut value);
    serde_json::from_value(value).expect("reflowing keeps the CRD valid")
}

/// The CRD as YAML, exactly what `warren-operator crd` prints and `crds/rpcservice.yaml` holds.
pub fn crd_yaml() -> String {
    serde_yaml::to_string(&crd()).expect("the CRD always serializes")
}

fn reflow_descriptions(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    serde_json::Value::String(text) if key == "description" => *text = reflow(text),
                    _ => reflow_descriptions(v),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(reflow_descriptions),
        _ => {}
    }
}

/// Joins the wrapped lines of each paragraph; blank lines, indented lines and list items keep their breaks.
fn reflow(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut previous: Option<&str> = None;
    for line in text.lines() {
        if let Some(prev) = previous {
            let wrapped = !prev.is_empty() && !line.is_empty() && !line.starts_with([' ', '\t', '-', '*', '`']);
            out.push(if wrapped { ' ' } else { '\n' });
        }
        out.push_str(line);
        previous = Some(line);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn reflow_joins_wrapped_lines_and_keeps_paragraphs_and_lists() {
        assert_eq!(super::reflow("one\ntwo\n\nthree\n- a\n- b"), "one two\n\nthree\n- a\n- b");
        assert_eq!(super::reflow("single line"), "single line");
    }

    #[test]
    fn crd_descriptions_have_no_wrapped_lines() {
        let crd = serde_json::to_value(super::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        // Both wrap over several lines in crd.rs.
        for description in
            [&spec["description"], &spec["properties"]["queue"]["properties"]["deliveryLimit"]["description"]]
        {
            let text = description.as_str().expect("a description");
            assert!(text.len() > 80 && !text.contains('\n'), "{text:?}");
        }
    }
}
