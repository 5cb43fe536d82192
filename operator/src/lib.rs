//! warren-operator: reconciles `RpcService` objects into RabbitMQ queues and an autoscaled worker Deployment.

pub mod crd;

pub use crd::{RpcService, RpcServiceSpec, RpcServiceStatus};

/// The CRD as YAML, exactly what `warren-operator crd` prints and `crds/rpcservice.yaml` holds.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&RpcService::crd()).expect("the CRD always serializes")
}
