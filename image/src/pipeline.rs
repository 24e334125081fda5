//! Decompression on its own thread, so that inflating a layer and writing its files to disk
//! overlap (about a third of an unpack is gzip on this kind of machine).

use std::io::{self, Read};
use std::sync::mpsc::{sync_channel, Receiver};

use crate::unpack::{self, Compression};

const CHUNK: usize = 1 << 20;
const DEPTH: usize = 4;

/// Read until `buf` is full or the stream ends; returns how much was read (a short count only
/// at the end of the stream).
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A reader fed by a thread that reads and decompresses `compressed`. An error on that side
/// (including the blob's own digest check at its end) comes out of `read` here.
pub struct BackgroundReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
}

/// Decompress `compressed` with `c` on a new thread.
pub fn decompress_in_background<R: Read + Send + 'static>(compressed: R, c: Compression) -> BackgroundReader {
    let (tx, rx) = sync_channel::<io::Result<Vec<u8>>>(DEPTH);
    std::thread::spawn(move || {
        let mut r = match unpack::decompress(compressed, c) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                return;
            }
        };
        loop {
            let mut chunk = vec![0u8; CHUNK];
            // Fill whole chunks so the consumer does few channel round trips.
            let filled = match read_full(&mut r, &mut chunk) {
                Ok(n) => n,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            chunk.truncate(filled);
            let end = filled == 0;
            // A closed receiver means the consumer stopped early (an unpack error): stop too.
            if tx.send(Ok(chunk)).is_err() || end {
                return;
            }
        }
    });
    BackgroundReader { rx, buf: Vec::new(), pos: 0, done: false }
}

impl Read for BackgroundReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) if chunk.is_empty() => self.done = true,
                Ok(Ok(chunk)) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Err(io::Error::new(io::ErrorKind::BrokenPipe, "decompression thread ended early"));
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn round_trips_and_reports_errors() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let gz = gz.finish().unwrap();
        let mut out = Vec::new();
        decompress_in_background(io::Cursor::new(gz.clone()), Compression::Gzip).read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        let mut cut = gz;
        cut.truncate(cut.len() / 2);
        let err = decompress_in_background(io::Cursor::new(cut), Compression::Gzip).read_to_end(&mut Vec::new());
        assert!(err.is_err(), "a truncated stream is an error, not a short read");
    }
}
