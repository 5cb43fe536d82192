//! warren-operator: reconciles `RpcService` objects into RabbitMQ queues and an autoscaled worker Deployment.
//!
//! The reconcile is a pipeline, one module a step: [`reconcile`] reads the broker Secret, [`build`] turns the
//! spec into queue options and a Deployment (pure), [`broker`] declares the queues and reads queue figures,
//! [`scaling`] runs the [`autoscale`] policy on those figures, and [`status`] merges the conditions.

pub mod autoscale;
pub mod broker;
pub mod build;
pub mod context;
pub mod controller;
pub mod crd;
pub mod error;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod scaling;
pub mod simulate;
pub mod status;

pub use crd::{RpcService, RpcServiceSpec, RpcServiceStatus};

/// The CRD as YAML, exactly what `warren-operator crd` prints and `crds/rpcservice.yaml` holds.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&RpcService::crd()).expect("the CRD always serializes")
}
