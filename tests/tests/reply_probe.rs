//! Probe (run by hand): what the broker does with a reply published to the direct reply-to address of a caller whose
//! node is down. `cargo test -p warren-tests --test reply_probe -- --ignored --nocapture`.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use warren_tests::chaos_broker::ChaosCluster;

#[tokio::test]
#[ignore]
async fn a_reply_to_a_caller_on_a_stopped_node() {
    let mut cluster = ChaosCluster::start(2).await.unwrap();
    let server = Connection::connect(&cluster.nodes[0].uri(), ConnectionProperties::default()).await.unwrap();
    let server_channel = server.create_channel().await.unwrap();
    let queue = "probe-requests";
    server_channel.queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let mut requests = server_channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();

    let caller = Connection::connect(&cluster.nodes[1].uri(), ConnectionProperties::default()).await.unwrap();
    let caller_channel = caller.create_channel().await.unwrap();
    let _replies = caller_channel
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    caller_channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
        )
        .await
        .unwrap();
    let request = requests.next().await.unwrap().unwrap();
    let reply_to = request.properties.reply_to().clone().unwrap();
    eprintln!("PROBE reply_to = {}", reply_to.as_str());

    cluster.nodes[1].stop().unwrap();
    eprintln!("PROBE node 1 stopped");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let publisher = Connection::connect(&cluster.nodes[0].uri(), ConnectionProperties::default()).await.unwrap();
    let channel = publisher.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for attempt in 0..3 {
        let published = channel
            .basic_publish(
                "".into(),
                reply_to.clone(),
                BasicPublishOptions::default(),
                b"reply",
                BasicProperties::default(),
            )
            .await;
        let outcome = match published {
            Ok(confirm) => format!("{:?}", tokio::time::timeout(Duration::from_secs(10), confirm).await),
            Err(e) => format!("publish error: {e}"),
        };
        eprintln!(
            "PROBE reply {attempt}: {outcome}; channel connected {}, connection connected {}",
            channel.status().connected(),
            publisher.status().connected()
        );
        if !publisher.status().connected() {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The node's own log says why it closed the connection.
    let tree = std::env::var("WARREN_RABBITMQ_TREE").unwrap_or_default();
    let tmp = if tree.is_empty() { std::env::temp_dir() } else { std::path::Path::new(&tree).join("tmp") };
    let node = cluster.nodes[0].node_name().to_owned();
    let id = node.trim_start_matches("warren-chaos-").trim_end_matches("@localhost");
    let log = tmp.join(format!("warren-chaos-{id}/log/{node}.log"));
    let text = std::fs::read_to_string(&log).unwrap_or_else(|e| format!("(no log at {}: {e})", log.display()));
    for line in text
        .lines()
        .filter(|l| l.contains("error") || l.contains("crash") || l.contains("reason") || l.contains("exception"))
        .take(60)
    {
        eprintln!("PROBE LOG {line}");
    }
}
