//! Volume commands: `twinbox volume create|ls|inspect|rm`.

use std::path::Path;

use anyhow::Result;
use clap::{Args, Subcommand};
use twinbox_engine::volume::Driver;

#[derive(Args, Debug)]
pub struct VolumeArgs {
    #[command(subcommand)]
    command: VolumeCommand,
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// Create a named volume; prints its name.
    Create {
        /// local: a directory, for containers; disk: an ext4 disk, for microVMs.
        #[arg(short, long, default_value = "local")]
        driver: String,
        /// A disk volume's size (b/k/m/g; default 1g; the file is sparse).
        #[arg(long, value_parser = parse_size)]
        size: Option<i64>,
        /// Volume name.
        name: String,
    },
    /// List volumes.
    #[command(alias = "list")]
    Ls {
        /// Only names.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show volumes as JSON, with where their data lies.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove volumes no container or microVM mounts.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn parse_size(s: &str) -> Result<i64, String> {
    crate::containers::parse_bytes(s, "volume size", 8 << 20)
}

pub fn volume(root: &Path, a: VolumeArgs) -> Result<i32> {
    let eng = crate::containers::engine(root)?;
    let vols = eng.volumes();
    vols.reconcile();
    match a.command {
        VolumeCommand::Create { driver, size, name } => {
            let driver: Driver = driver.parse()?;
            println!("{}", vols.create(&name, driver, size.map(|s| s as u64))?.name);
        }
        VolumeCommand::Ls { quiet } => {
            let list = vols.list()?;
            if quiet {
                for v in &list {
                    println!("{}", v.name);
                }
                return Ok(0);
            }
            println!("{:<8}{:<10}{:<26}NAME", "DRIVER", "SIZE", "CREATED");
            for v in &list {
                let size = v.size.map(|s| format!("{}M", s >> 20)).unwrap_or_else(|| "-".into());
                println!("{:<8}{:<10}{:<26}{}", v.driver, size, v.created, v.name);
            }
        }
        VolumeCommand::Inspect { names } => {
            let mut all = Vec::new();
            for n in &names {
                let v = vols.get(n)?;
                let data = match v.driver {
                    Driver::Local => vols.data_dir(n),
                    Driver::Disk => vols.disk_path(n),
                };
                let mut json = serde_json::to_value(&v)?;
                json["data"] = serde_json::Value::String(data.display().to_string());
                all.push(json);
            }
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
        VolumeCommand::Rm { names } => {
            return crate::containers::each(&names, |n| {
                eng.remove_volume(n)?;
                println!("{n}");
                Ok(())
            })
        }
    }
    Ok(0)
}
