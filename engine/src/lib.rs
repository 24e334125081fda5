//! twinbox's engine: everything between an image in the store and a running instance of either
//! isolation model. `runtime` (the OCI runtime, what runc is) and `microvm` (the VMM, what
//! Firecracker is) know nothing of images; this crate turns an image and `twinbox run`'s
//! options into a bundle for the one or a guest configuration and disk for the other.
//!
//! | module | what |
//! |---|---|
//! | [`container`] | containers over the OCI runtime: run options ([`RunOptions`]) and the spec built from them ([`container::spec`]), records and names under `<store>/containers/`, foreground runs, detached runs watched by one [`container::monitor`] per store (the freestanding `engine/monitor` program, a few KiB, installed in `<store>/bin/`, a subreaper that starts each container's launcher), mount points an image lacks in one shared lower layer (`<store>/mountpoints/`), `ps`/`logs`/`stop`/`kill`/`rm`/`start`/`exec`; microVM instances beside them ([`container::vm`]: a record, a name, a tap on a bridge network, published ports) |
//! | [`microvm`] | an image run as a microVM: the guest agent's configuration (network included), the image's ext4 root disk, the VMM's configuration, boot and output |
//! | [`network`] | networks shared by both models: a bridge each (made through rtnetlink, [`network::netlink`]) with its NAT in nftables ([`network::nft`]), records and address management in `<store>/networks/`, under one lock; published ports ([`network::publish`]); CNI networks ([`network::cni`]) |
//! | [`volume`] | named volumes under `<store>/volumes/` (a directory for containers, an ext4 disk for microVMs) and the `-v` mounts of both models |
//! | [`build_run`] | the Dockerfile `RUN` step: a throwaway container of the runtime whose upper directory becomes a layer |

pub mod build_run;
pub mod container;
pub mod microvm;
pub mod network;
pub mod template;
pub mod vmm;
pub mod volume;

pub use container::{Engine, EngineError, ExecOptions, Phase, Record, RunOptions};

/// An flock on the file at `path` (made, empty, if missing): `how` says shared or exclusive,
/// waiting or not. The store's lock files (names, volumes, a VM's VMM) all go through here.
pub(crate) fn lock_file(
    path: &std::path::Path,
    how: nix::fcntl::FlockArg,
) -> std::io::Result<nix::fcntl::Flock<std::fs::File>> {
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
    nix::fcntl::Flock::lock(file, how).map_err(|(_, e)| e.into())
}

/// Docker's rule for the names of containers and networks: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at
/// most `max` bytes. Such a name is also a safe file name in the store.
pub(crate) fn valid_name(name: &str, max: usize) -> bool {
    let mut chars = name.chars();
    name.len() <= max
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}
