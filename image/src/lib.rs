//! Images for twinbox: OCI references, a content-addressed store in the OCI image-layout
//! format, a layer unpacker, OCI/docker archives and a Dockerfile builder.
//!
//! ```text
//! Reference ─► Store (blobs by sha256, tags in index.json) ─► unpacked layer dirs (by diff-id)
//!                                                           ├► flattened rootfs (rootfs::flatten)
//!                                                           └► ext4 root disk for microVMs (disk::root_disk)
//! ```
//!
//! | module | what |
//! |---|---|
//! | `reference`, `digest` | `name[:tag][@sha256:…]` parsed as Docker does; digests and hashing readers/writers |
//! | `store` | the OCI layout (blobs verified on write, tags in `index.json`), unpacked layers, holds, locks, prune |
//! | `unpack`, `pipeline` | layer tarballs into directories, treated as hostile; decompression on its own thread |
//! | `rootfs`, `disk` | an image as one directory, or as an ext4 disk (`mkfs.ext4 -d`, cached by digest) |
//! | `launch` | the process an image starts (entrypoint, cmd, env, workdir, user) with a run's overrides |
//! | `archive` | `save`/`load`: OCI archives and `docker save` output |
//! | `atomic` | the one atomic file replacement (temp file and rename; synced when asked) |
//! | `build` | the Dockerfile builder (its `RUN` step is a [`build::RunStep`] the engine provides) |
//! | `registry` | the OCI distribution client: pull, push (one worker pool), login, credentials |

pub mod archive;
pub mod atomic;
pub mod build;
pub mod digest;
pub mod disk;
pub mod launch;
pub mod pipeline;
pub mod reference;
pub mod registry;
pub mod rootfs;
pub mod store;
pub mod unpack;

pub use digest::Digest;
pub use reference::Reference;
pub use store::{Image, Store, StoreError};
