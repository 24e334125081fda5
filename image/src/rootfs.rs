//! Rootfs materialisers: turn a stored image into a directory tree a runtime can use.
//!
//! - [`flatten`]: apply every layer, base first, into one directory (whiteouts delete what
//!   lower layers made) — what `umoci unpack` and `docker export` give, and the input of a
//!   VM root disk.
//! - The overlayfs form (one cached directory per layer) is [`Store::unpacked_layers`].

use std::io;
use std::path::Path;

use crate::digest::Digest;
use crate::store::{Image, Store, StoreError};
use crate::unpack::{self, Compression, Mode, UnpackOptions, UnpackStats};

/// Apply the layers of `image` into `target` (created if missing; should be empty).
pub fn flatten(store: &Store, image: &Image, target: &Path) -> Result<UnpackStats, StoreError> {
    std::fs::create_dir_all(target).map_err(|source| StoreError::Io {
        op: "create directory",
        path: target.to_owned(),
        source,
    })?;
    let mut total = UnpackStats::default();
    let opts = UnpackOptions::new(Mode::Flatten);
    for layer in image.manifest.layers() {
        let digest = Digest::try_from(layer.digest())?;
        let wrap = |source| StoreError::Unpack { layer: digest.clone(), source };
        let compression = Compression::from_media_type(layer.media_type().as_ref()).map_err(wrap)?;
        let mut stream = crate::pipeline::decompress_in_background(store.open_blob(&digest)?, compression);
        let stats = unpack::unpack(&mut stream, target, &opts).map_err(wrap)?;
        // Drain the end-of-archive padding so the blob's digest check at EOF runs.
        io::copy(&mut stream, &mut io::sink()).map_err(|source| StoreError::Io {
            op: "read layer",
            path: store.blob_path(&digest),
            source,
        })?;
        total.entries += stats.entries;
        total.bytes += stats.bytes;
    }
    Ok(total)
}
