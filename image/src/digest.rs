//! Content digests (`sha256:<64 hex>`) and hashing readers/writers.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};
use twinbox_exit::ExitCode;

/// Why a digest string was refused.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    /// Only sha256 is supported, as everywhere in OCI today.
    #[error("unsupported digest algorithm in {0:?}: only sha256 is supported")]
    Algorithm(String),
    /// Not 64 lowercase hex characters.
    #[error("malformed digest {0:?}: expected sha256: followed by 64 lowercase hex characters")]
    Malformed(String),
}

impl ExitCode for DigestError {
    fn exit_code(&self) -> i32 {
        match self {
            DigestError::Algorithm(_) | DigestError::Malformed(_) => twinbox_exit::USER_ERROR,
        }
    }
}

/// A sha256 content digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// Digest of a byte slice.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    fn from_hasher(h: Sha256) -> Self {
        Self { hex: hex::encode(h.finalize()) }
    }

    /// The 64 hex characters, as used for file names under `blobs/sha256/`.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Build from the bare hex part (a blob file name).
    pub fn from_hex(hex: &str) -> Result<Self, DigestError> {
        if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(Self { hex: hex.to_owned() })
        } else {
            Err(DigestError::Malformed(hex.to_owned()))
        }
    }

    /// A short form for humans (12 hex characters), as `docker images` shows.
    pub fn short(&self) -> &str {
        &self.hex[..12]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, DigestError> {
        match s.split_once(':') {
            Some(("sha256", hex)) => Self::from_hex(hex).map_err(|_| DigestError::Malformed(s.to_owned())),
            Some((_, _)) => Err(DigestError::Algorithm(s.to_owned())),
            None => Err(DigestError::Malformed(s.to_owned())),
        }
    }
}

impl TryFrom<&oci_spec::image::Digest> for Digest {
    type Error = DigestError;
    fn try_from(d: &oci_spec::image::Digest) -> Result<Self, DigestError> {
        d.to_string().parse()
    }
}

impl From<&Digest> for oci_spec::image::Digest {
    fn from(d: &Digest) -> Self {
        oci_spec::image::Sha256Digest::from_str(d.hex())
            .expect("a Digest always holds 64 lowercase hex characters")
            .into()
    }
}

/// A writer that hashes and counts everything written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wrap `inner`.
    pub fn new(inner: W) -> Self {
        Self { inner, hasher: Sha256::new(), len: 0 }
    }

    /// The digest and length of what was written, and the inner writer.
    pub fn finish(self) -> (Digest, u64, W) {
        (Digest::from_hasher(self.hasher), self.len, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wrap `inner`.
    pub fn new(inner: R) -> Self {
        Self { inner, hasher: Sha256::new(), len: 0 }
    }

    /// The digest and length of what was read so far.
    pub fn finish(self) -> (Digest, u64) {
        (Digest::from_hasher(self.hasher), self.len)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// A reader that checks, when it reaches the end, that what it read has the expected digest
/// and size; a mismatch is returned as an `InvalidData` error instead of the end of stream.
pub struct VerifyingReader<R> {
    inner: HashingReader<R>,
    expected: Digest,
    checked: bool,
}

impl<R: Read> VerifyingReader<R> {
    /// Wrap `inner`, which should yield content whose digest is `expected`.
    pub fn new(inner: R, expected: Digest) -> Self {
        Self { inner: HashingReader::new(inner), expected, checked: false }
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.checked {
            self.checked = true;
            let got = Digest::from_hasher(self.inner.hasher.clone());
            if got != self.expected {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("content of blob {} hashes to {got}: the blob is corrupt", self.expected),
                ));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let d = Digest::of(b"");
        assert_eq!(d.to_string(), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert!(matches!("md5:abc".parse::<Digest>(), Err(DigestError::Algorithm(_))));
        assert!(matches!("sha256:ABC".parse::<Digest>(), Err(DigestError::Malformed(_))));
        assert!("sha256:../../etc/passwd".parse::<Digest>().is_err());
    }

    #[test]
    fn verifying_reader_rejects_wrong_content() {
        let mut ok = VerifyingReader::new(&b"hello"[..], Digest::of(b"hello"));
        let mut out = Vec::new();
        ok.read_to_end(&mut out).unwrap();
        let mut bad = VerifyingReader::new(&b"hellO"[..], Digest::of(b"hello"));
        let err = bad.read_to_end(&mut out).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
