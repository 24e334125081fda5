//! Images for twinbox: OCI references, a content-addressed store in the OCI image-layout
//! format, a layer unpacker, OCI/docker archives and a Dockerfile builder.
//!
//! ```text
//! Reference ─► Store (blobs by sha256, tags in index.json) ─► unpacked layer dirs (by diff-id)
//!                                                           ├► flattened rootfs (rootfs::flatten)
//!                                                           └► ext4 root disk for microVMs (disk::root_disk)
//! ```

pub mod archive;
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
