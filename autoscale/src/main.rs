//! `warren-autoscale`: runs the autoscaling policy outside the operator. `simulate` compares it with KEDA + HPA
//! on load traces in a queue model (docs/autoscaling.md, "Simulation").

mod simulate;

use clap::{Parser, Subcommand};

/// warren's autoscaling policy, outside the operator.
#[derive(Parser)]
#[command(name = "warren-autoscale", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compare warren's autoscaler with KEDA + HPA on load traces in a queue model (docs/autoscaling.md).
    Simulate(simulate::SimulateArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Simulate(args) => print!("{}", simulate::execute(&args)?),
    }
    Ok(())
}
