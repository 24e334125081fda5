//! `twinbox`: a thin adapter over the libraries — parse arguments, call, print errors.

mod images;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// One OCI image, two isolation models: containers and KVM microVMs, measured side by side.
#[derive(Parser, Debug)]
#[command(name = "twinbox", version, about, propagate_version = true)]
struct Cli {
    /// Image store root (an OCI image layout).
    #[arg(long, global = true, env = "TWINBOX_ROOT", default_value = twinbox_image::store::DEFAULT_ROOT)]
    root: std::path::PathBuf,
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build an image from a Dockerfile.
    Build(images::BuildArgs),
    /// List images.
    Images(images::ImagesArgs),
    /// Show an image's manifest and config as JSON.
    Inspect(images::InspectArgs),
    /// Give an image another name.
    Tag(images::TagArgs),
    /// Remove images.
    Rmi(images::RmiArgs),
    /// Write images to an OCI archive.
    Save(images::SaveArgs),
    /// Read images from an OCI or docker archive.
    Load(images::LoadArgs),
    /// Remove blobs, layer directories and build cache no image uses.
    Prune(images::PruneArgs),
    /// Write an image's root filesystem (all layers applied) into a directory.
    Unpack(images::UnpackArgs),
}

/// Errors the user can fix (exit 1), as opposed to internal failures (exit 125).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UserError(pub String);

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(1),
            };
        }
    };
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Build(a) => images::build(&cli.root, a),
        Command::Images(a) => images::images(&cli.root, a),
        Command::Inspect(a) => images::inspect(&cli.root, a),
        Command::Tag(a) => images::tag(&cli.root, a),
        Command::Rmi(a) => images::rmi(&cli.root, a),
        Command::Save(a) => images::save(&cli.root, a),
        Command::Load(a) => images::load(&cli.root, a),
        Command::Prune(a) => images::prune(&cli.root, a),
        Command::Unpack(a) => images::unpack(&cli.root, a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twinbox: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

/// Docker's convention: 1 for what the user can fix, 125 for failures of twinbox itself.
fn exit_code(e: &anyhow::Error) -> u8 {
    use twinbox_image::archive::ArchiveError;
    use twinbox_image::StoreError;
    for cause in e.chain() {
        if cause.is::<UserError>()
            || cause.is::<twinbox_image::reference::ReferenceError>()
            || cause.is::<twinbox_image::build::BuildError>()
        {
            return 1;
        }
        if let Some(s) = cause.downcast_ref::<StoreError>() {
            return match s {
                StoreError::NoSuchImage(_)
                | StoreError::Ambiguous(_)
                | StoreError::InUse { .. }
                | StoreError::NoPlatform { .. } => 1,
                _ => 125,
            };
        }
        if let Some(a) = cause.downcast_ref::<ArchiveError>() {
            match a {
                ArchiveError::NotAnArchive
                | ArchiveError::Missing(_)
                | ArchiveError::Name { .. }
                | ArchiveError::Json(..)
                | ArchiveError::TooLarge(_) => return 1,
                ArchiveError::Store(_) => continue,
                ArchiveError::Io { .. } => return 1,
            }
        }
    }
    125
}
