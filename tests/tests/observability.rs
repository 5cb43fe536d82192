//! What a user sees of the latency model, against the real operator, the real broker and a real worker process:
//! the estimated queueing delay and its target in status and in `kubectl get`, documented by `kubectl explain`; the
//! per-service metrics, removed with the service; and the chart's Grafana dashboard, every metric of which a running
//! operator or worker exports.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use kube::api::{DeleteParams, PostParams};
use serde_json::{Value, json};
use warren_client::Client;
use warren_operator::RpcService;
use warren_tests::cluster::{self, TestNamespace, wait_for};
use warren_tests::operator_process::OperatorProcess;
use warren_tests::worker_process::WorkerCommand;
use warren_tests::{broker, broker_uri};

// Generous: the machine may be busy; nothing here asserts a time.
const WAIT: Duration = Duration::from_secs(120);

async fn setup(prefix: &str) -> anyhow::Result<TestNamespace> {
    let client = cluster::client().await?;
    cluster::install_crd(&client).await?;
    let ns = TestNamespace::create(&client, prefix).await?;
    ns.create_broker_secret("rabbitmq").await?;
    Ok(ns)
}

/// A service sized on a hint of 10 req/s per worker (so its delay can be estimated before anything is measured),
/// with a 2 s target.
async fn create_service(ns: &TestNamespace, name: &str) -> anyhow::Result<RpcService> {
    let svc: RpcService = serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1",
        "kind": "RpcService",
        "metadata": { "name": name },
        "spec": {
            "broker": { "secretRef": { "name": "rabbitmq" } },
            "worker": { "prefetch": 4 },
            "scaling": { "minReplicas": 1, "maxReplicas": 4, "targetQueueDelaySeconds": 2, "perReplicaThroughputHint": 10 },
        },
    }))?;
    Ok(ns.api::<RpcService>().create(&PostParams::default(), &svc).await?)
}

/// Waits until the service's status satisfies `done`; returns its `status.queue` then.
async fn wait_queue_status(
    ns: &TestNamespace,
    name: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let api = ns.api::<RpcService>();
    wait_for(what, WAIT, || async {
        let svc = api.get(name).await?;
        let queue = serde_json::to_value(svc.status.and_then(|s| s.queue))?;
        Ok(done(&queue).then_some(queue))
    })
    .await
}

/// Sends `n` one-way requests to a queue nobody consumes: a backlog.
async fn publish_backlog(queue: &str, n: usize) -> anyhow::Result<()> {
    let client = Client::connect(&broker_uri()).await?;
    for i in 0..n {
        client.notify(queue, Some("echo"), json!([i])).await?;
    }
    client.close().await?;
    Ok(())
}

/// The first row of a `kubectl get` table as (column, cell) pairs; a cell kubectl leaves blank is "".
fn table_row(table: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut lines = table.lines();
    let (header, row) = (lines.next().context("no header")?, lines.next().context("no row")?);
    // Columns are left-aligned: each starts where its header word does.
    let starts: Vec<usize> = header
        .match_indices(|c: char| !c.is_whitespace())
        .map(|(i, _)| i)
        .filter(|i| *i == 0 || header[..*i].ends_with(char::is_whitespace))
        .collect();
    Ok(starts
        .iter()
        .enumerate()
        .map(|(n, &start)| {
            let end = starts.get(n + 1).copied().unwrap_or(usize::MAX);
            let column = header[start..end.min(header.len())].trim().to_owned();
            let cell = row.get(start.min(row.len())..end.min(row.len())).unwrap_or_default().trim().to_owned();
            (column, cell)
        })
        .collect())
}

/// Whether `/metrics` text has a sample of `name` (a series, not only its `# TYPE` line).
fn has_series(text: &str, name: &str) -> bool {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .any(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
}

#[tokio::test]
async fn status_columns_and_metrics_show_the_queueing_delay_against_its_target() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let ns = setup("obs-status").await?;
    let operator = OperatorProcess::start(ns.name(), &[])?;
    create_service(&ns, "calc").await?;
    let queue = format!("{}.calc", ns.name());
    let _cleanup = broker::QueueCleanup::service(&queue);

    // Nothing waits: the delay is 0, beside the 2 s target.
    let idle =
        wait_queue_status(&ns, "calc", "an idle queue's delay", |q| q["queueingDelaySeconds"] == json!(0.0)).await?;
    eprintln!("idle: status.queue = {idle}");
    assert_eq!(idle["targetDelaySeconds"], json!(2.0));
    assert_eq!(idle["ready"], json!(0));

    // 40 wait and no worker is ready to drain them: the delay is unbounded, so it is absent — not 0.
    publish_backlog(&queue, 40).await?;
    let waiting = wait_queue_status(&ns, "calc", "the backlog of 40 in status", |q| q["ready"] == json!(40)).await?;
    eprintln!("40 waiting, no ready worker: status.queue = {waiting}");
    assert!(waiting.get("queueingDelaySeconds").is_none(), "{waiting}");
    let table = cluster::run_kubectl(&["get", "rpcsvc", "-n", ns.name(), "-o", "wide"])?;
    eprintln!("{table}");
    let cells = table_row(&table)?;
    let cell = |column: &str| cells.iter().find(|(h, _)| h == column).map(|(_, v)| v.as_str());
    for column in ["BACKLOG", "DELAY", "TARGET", "PER-REPLICA", "REASON"] {
        ensure!(cell(column).is_some(), "no {column} column: {cells:?}");
    }
    assert_eq!((cell("BACKLOG"), cell("DELAY"), cell("TARGET")), (Some("40"), Some(""), Some("2")), "{cells:?}");
    assert_eq!(cell("PER-REPLICA"), Some("10"), "the hint, until a throughput is measured");

    // The per-service series, labelled by namespace and service; the backlog scaled the pool up, once, for a reason.
    let labels = format!("{{namespace=\"{}\",service=\"calc\"", ns.name());
    let text = wait_for("the backlog on /metrics", WAIT, || async {
        let text = operator.metrics().await.unwrap_or_default();
        Ok(text.contains(&format!("warren_operator_service_backlog{labels}}} 40")).then_some(text))
    })
    .await?;
    let series: Vec<&str> = text.lines().filter(|l| l.contains(&labels)).collect();
    eprintln!("the service's series:\n{}", series.join("\n"));
    for name in ["in_flight", "arrival_rate", "completion_rate", "target_queue_delay_seconds", "desired_replicas"] {
        ensure!(text.contains(&format!("warren_operator_service_{name}{labels}")), "no {name}:\n{text}");
    }
    ensure!(text.contains(&format!("warren_operator_service_ready_replicas{labels}}} 0")), "{text}");
    ensure!(!text.contains(&format!("warren_operator_service_queueing_delay_seconds{labels}")), "{text}");
    ensure!(text.contains(&format!("warren_operator_service_per_replica_throughput{labels},source=\"hint\"}} 10")));
    // Counted by reason: once from a probe's fresh backlog, and maybe again when the poll's arrival rate raised it.
    // The backlog that appeared between two looks is projected over a pod start (40 in a second: 440 by the time new
    // pods serve), which asks for more than maxReplicas: the reason is then MaxReplicas.
    let backlog_decisions: u64 = series
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix("warren_operator_service_scale_decisions_total")?;
            let backlog = rest.contains("reason=\"Backlog\"") || rest.contains("reason=\"MaxReplicas\"");
            backlog.then(|| rest.rsplit(' ').next()?.parse::<u64>().ok()).flatten()
        })
        .sum();
    ensure!(matches!(backlog_decisions, 1..=2), "one or two scale decisions for the backlog:\n{text}");

    // A worker drains the queue: nothing waits, the delay is 0 again.
    let _worker = WorkerCommand::new(&queue).start().await?;
    let drained =
        wait_queue_status(&ns, "calc", "the delay back to 0", |q| q["queueingDelaySeconds"] == json!(0.0)).await?;
    eprintln!("drained: status.queue = {drained}");

    // kubectl explain wraps the description: compare words.
    let explain = |field: &str| -> anyhow::Result<String> {
        let text = cluster::run_kubectl(&["explain", &format!("rpcservices.status.queue.{field}")])?;
        Ok(text.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    let delay = explain("queueingDelaySeconds")?;
    ensure!(delay.contains("the backlog ÷ the rate the ready workers drain it"), "{delay}");
    let target = explain("targetDelaySeconds")?;
    ensure!(target.contains("spec.scaling.targetQueueDelaySeconds"), "{target}");

    // The service goes, and its series with it.
    ns.api::<RpcService>().delete("calc", &DeleteParams::default()).await?;
    let left = wait_for("the service's series to go", WAIT, || async {
        let text = operator.metrics().await.unwrap_or_default();
        Ok((!text.contains(&labels)).then_some(text))
    })
    .await?;
    let remaining = left.lines().filter(|l| l.starts_with("warren_operator_service_")).count();
    eprintln!("after the deletion: {remaining} warren_operator_service_ series left");
    ns.cleanup().await
}

/// The metric names a PromQL expression selects: identifiers outside strings, label matchers and ranges that are
/// not functions, aggregations, keywords or the labels of a grouping clause. Grafana's `$variables` are skipped.
fn metric_names(expr: &str) -> Vec<String> {
    const AGGREGATIONS: [&str; 14] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const KEYWORDS: [&str; 12] = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let skip_to = |mut i: usize, close: char| {
        while i < chars.len() && chars[i] != close {
            i += 1;
        }
        i + 1
    };
    let next_non_space = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        (i, chars.get(i).copied())
    };
    let (mut names, mut i) = (Vec::new(), 0);
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            i = skip_to(i + 1, c);
        } else if c == '{' {
            i = skip_to(i + 1, '}');
        } else if c == '[' {
            i = skip_to(i + 1, ']');
        } else if c == '$' || c.is_ascii_digit() {
            i += 1;
            while i < chars.len() && (chars[i].is_alphanumeric() || "_.{}".contains(chars[i])) {
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let (after, next) = next_non_space(i);
            if ["by", "without", "on", "ignoring", "group_left", "group_right"].contains(&word.as_str())
                && next == Some('(')
            {
                i = skip_to(after + 1, ')'); // the grouping labels
            } else if next != Some('(') && !AGGREGATIONS.contains(&word.as_str()) && !KEYWORDS.contains(&word.as_str())
            {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every metric name the dashboard queries: its panels' PromQL and its template variables' `label_values(...)`.
fn dashboard_metric_names(dashboard: &Value) -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    let panels = dashboard["panels"].as_array().context("the dashboard has no panels")?;
    for panel in panels {
        let targets =
            panel["targets"].as_array().with_context(|| format!("panel {} has no targets", panel["title"]))?;
        for target in targets {
            let expr =
                target["expr"].as_str().with_context(|| format!("a target of {} has no expr", panel["title"]))?;
            let found = metric_names(expr);
            ensure!(!found.is_empty(), "no metric in {expr}");
            names.extend(found);
        }
    }
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        let query = variable["query"]["query"].as_str().or(variable["query"].as_str()).unwrap_or_default();
        if let Some(inner) = query.strip_prefix("label_values(").and_then(|q| q.rsplit_once(',')) {
            names.extend(metric_names(inner.0));
        }
    }
    Ok(names)
}

#[test]
fn metric_names_are_read_from_promql() {
    let expr = r#"histogram_quantile(0.99, sum by (le, method) (rate(warren_worker_handler_duration_seconds_bucket{namespace=~"$namespace",outcome!="ok"}[$__rate_interval]))) / on (pod) group_left warren_worker_requests_in_flight offset 5m"#;
    assert_eq!(
        metric_names(expr),
        ["warren_worker_handler_duration_seconds_bucket", "warren_worker_requests_in_flight"]
    );
}

#[tokio::test]
async fn the_dashboard_queries_only_metrics_a_running_operator_and_worker_export() -> anyhow::Result<()> {
    let path = warren_tests::workspace_root().join("charts/warren/dashboards/warren.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let dashboard: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let names = dashboard_metric_names(&dashboard)?;
    eprintln!("the dashboard queries {} metrics: {names:?}", names.len());

    let _broker = broker::shared().await;
    let ns = setup("obs-dashboard").await?;
    let operator = OperatorProcess::start(ns.name(), &[])?;
    create_service(&ns, "calc").await?;
    let queue = format!("{}.calc", ns.name());
    let _cleanup = broker::QueueCleanup::service(&queue);
    // A backlog makes the operator scale (scale decisions), then a worker serves calls that succeed and fail.
    wait_queue_status(&ns, "calc", "the first figures", |q| q["ready"] == json!(0)).await?;
    publish_backlog(&queue, 40).await?;
    wait_for("a scale decision", WAIT, || async {
        let text = operator.metrics().await.unwrap_or_default();
        Ok(has_series(&text, "warren_operator_service_scale_decisions_total").then_some(()))
    })
    .await?;
    let worker = WorkerCommand::new(&queue).start().await?;
    let client = Client::connect(&broker_uri()).await?;
    client.call(&queue, Some("add"), json!([1, 2]), WAIT).await?;
    let failed = client.call(&queue, Some("fail"), json!([]), WAIT).await;
    ensure!(failed.is_err(), "fail answered {failed:?}");
    // The queue drained: the delay is estimated again.
    wait_queue_status(&ns, "calc", "the delay after draining", |q| q["queueingDelaySeconds"] == json!(0.0)).await?;

    let (operator_text, worker_text) = (operator.metrics().await.unwrap_or_default(), worker.metrics().await);
    let mut missing = Vec::new();
    let (mut on_operator, mut on_worker) = (0, 0);
    for name in &names {
        if has_series(&operator_text, name) {
            on_operator += 1;
        } else if has_series(&worker_text, name) {
            on_worker += 1;
        } else {
            missing.push(name.as_str());
        }
    }
    eprintln!("{on_operator} found on the operator's /metrics, {on_worker} on the worker's, {} missing", missing.len());
    if !missing.is_empty() {
        bail!(
            "the dashboard queries metrics nothing exports: {missing:?}\n--- operator:\n{operator_text}\n--- worker:\n{worker_text}"
        );
    }
    client.close().await?;
    ns.cleanup().await
}
