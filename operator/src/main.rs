use clap::{Parser, Subcommand};

/// warren's Kubernetes operator.
#[derive(Parser)]
#[command(name = "warren-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the RpcService CRD as YAML (what crds/rpcservice.yaml holds).
    Crd,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", warren_operator::crd_yaml()),
    }
    Ok(())
}
