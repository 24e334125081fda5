//! `twinbox snapshot ls|rm`: the warm templates `run --isolation microvm --snapshot` restores
//! (`twinbox_engine::template`).

use std::io::Write;
use std::path::Path;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::images::{human_size, open};
use crate::UserError;

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// List the templates: key, image, VM shape, disk use, when made.
    Ls {
        /// Only the keys.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove templates, by key (a unique prefix does) or by image reference (all of its).
    Rm {
        /// Keys or images.
        #[arg(required = true)]
        what: Vec<String>,
    },
}

pub fn snapshot(root: &Path, a: SnapshotArgs) -> Result<()> {
    let store = open(root)?;
    let templates = twinbox_engine::template::list(&store);
    match a.command {
        SnapshotCommand::Ls { quiet } => {
            let mut out = std::io::stdout().lock();
            if !quiet {
                writeln!(out, "{:<14}{:<28}{:<22}{:>10}  CREATED", "KEY", "IMAGE", "SHAPE", "SIZE")?;
            }
            for (t, bytes) in &templates {
                if quiet {
                    writeln!(out, "{}", t.key)?;
                    continue;
                }
                let shape = format!("{} MiB {} vCPU{}", t.memory_mib, t.vcpus, if t.network { " +net" } else { "" });
                writeln!(
                    out,
                    "{:<14}{:<28}{:<22}{:>10}  {}",
                    &t.key[..12],
                    t.image,
                    shape,
                    human_size(*bytes),
                    t.created
                )?;
            }
        }
        SnapshotCommand::Rm { what } => {
            let mut missing = Vec::new();
            for w in &what {
                let by_key: Vec<_> = templates.iter().filter(|(t, _)| t.key.starts_with(w.as_str())).collect();
                let chosen = if by_key.len() == 1 && w.len() >= 4 {
                    by_key
                } else {
                    let digest = store.resolve(w).ok().map(|i| i.manifest_digest.to_string());
                    templates
                        .iter()
                        .filter(|(t, _)| t.image == *w || digest.as_deref() == Some(t.image_digest.as_str()))
                        .collect()
                };
                if chosen.is_empty() {
                    missing.push(w.clone());
                }
                for (t, _) in chosen {
                    twinbox_engine::template::remove(&store, &t.key)?;
                    println!("{}", t.key);
                }
            }
            if !missing.is_empty() {
                return Err(UserError(format!(
                    "no template for {}; `twinbox snapshot ls` lists them",
                    missing.join(", ")
                ))
                .into());
            }
        }
    }
    Ok(())
}
