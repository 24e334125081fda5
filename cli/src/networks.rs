//! Network commands: `twinbox network create|ls|inspect|rm|prune`.

use std::path::Path;

use anyhow::Result;
use clap::{Args, Subcommand};
use twinbox_engine::network::{Networks, Subnet, BUILTIN};

#[derive(Args, Debug)]
pub struct NetworkArgs {
    #[command(subcommand)]
    command: NetworkCommand,
}

#[derive(Subcommand, Debug)]
enum NetworkCommand {
    /// Create a bridge network; prints its id.
    Create {
        /// The network's IPv4 subnet, ADDRESS/PREFIX (default: a free /24 of 10.90.0.0/16).
        #[arg(long)]
        subnet: Option<String>,
        /// The MTU of the network's bridge, its containers' interfaces and their routes (68 to
        /// 65535). Without it: 65520 on the links within the host (fewer packets between
        /// containers and the host) and 1500 on the containers' default route.
        #[arg(long)]
        mtu: Option<u32>,
        /// Network name.
        name: String,
    },
    /// List networks.
    #[command(alias = "list")]
    Ls {
        /// Only names.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show networks as JSON, with the addresses their containers hold.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove networks no container uses.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove every network no container uses (and bridges left by an interrupted create).
    Prune,
}

pub fn network(root: &Path, a: NetworkArgs) -> Result<i32> {
    let nets = Networks::new(root);
    match a.command {
        NetworkCommand::Create { subnet, mtu, name } => {
            let subnet = subnet.map(|s| s.parse::<Subnet>()).transpose()?;
            println!("{}", nets.create(&name, subnet, mtu)?.id);
        }
        NetworkCommand::Ls { quiet } => {
            let list = nets.list()?;
            if quiet {
                for n in &list {
                    println!("{}", n.name);
                }
                return Ok(0);
            }
            println!("{:<14}{:<20}{:<10}{:<20}BRIDGE", "NETWORK ID", "NAME", "DRIVER", "SUBNET");
            for n in &list {
                println!("{:<14}{:<20}{:<10}{:<20}{}", &n.id[..12], n.name, n.driver, n.subnet.to_string(), n.bridge);
            }
            for b in BUILTIN {
                println!("{:<14}{:<20}{:<10}{:<20}", "-", b, b, "");
            }
        }
        NetworkCommand::Inspect { names } => {
            let all = names.iter().map(|n| nets.get(n)).collect::<Result<Vec<_>, _>>()?;
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
        NetworkCommand::Rm { names } => {
            return crate::containers::each(&names, |n| {
                nets.remove(n)?;
                println!("{n}");
                Ok(())
            })
        }
        NetworkCommand::Prune => {
            for n in nets.prune()? {
                println!("{n}");
            }
        }
    }
    Ok(0)
}
