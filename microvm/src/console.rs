//! The guest's kernel console as the VMM keeps it: the last lines (they explain a panic or a
//! hang), whether the kernel panicked, and optionally a copy to a writer as it comes.

use std::collections::VecDeque;
use std::io::Write;

/// Console lines kept for error reports.
pub const TAIL_LINES: usize = 40;
/// What Linux prints when it panics.
pub const PANIC_MARKER: &str = "Kernel panic - not syncing";
/// Longest line kept; the rest of a longer one is dropped.
const MAX_LINE: usize = 1024;

/// A `Write` for [`crate::Vm::run`]'s console.
pub struct ConsoleLog {
    lines: VecDeque<String>,
    partial: Vec<u8>,
    panic: Option<String>,
    echo: Option<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for ConsoleLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleLog").field("lines", &self.lines.len()).field("panic", &self.panic).finish()
    }
}

impl ConsoleLog {
    /// A log that also copies everything to `echo`, if given.
    pub fn new(echo: Option<Box<dyn Write + Send>>) -> Self {
        ConsoleLog { lines: VecDeque::new(), partial: Vec::new(), panic: None, echo }
    }

    /// The last lines, indented for an error message.
    pub fn tail(&self) -> String {
        let mut lines: Vec<String> = self.lines.iter().map(|l| format!("  | {l}")).collect();
        if !self.partial.is_empty() {
            lines.push(format!("  | {}", String::from_utf8_lossy(&self.partial)));
        }
        if lines.is_empty() {
            return "  (the console printed nothing; run with --verbose for the kernel's messages)".into();
        }
        lines.join("\n")
    }

    /// The kernel's panic line, if it panicked.
    pub fn panic_line(&self) -> Option<&str> {
        self.panic.as_deref()
    }

    fn end_line(&mut self) {
        let line = String::from_utf8_lossy(&self.partial).trim_end_matches('\r').to_owned();
        self.partial.clear();
        if self.panic.is_none() && line.contains(PANIC_MARKER) {
            self.panic = Some(line.trim_start().to_owned());
        }
        self.lines.push_back(line);
        if self.lines.len() > TAIL_LINES {
            self.lines.pop_front();
        }
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(echo) = self.echo.as_mut() {
            // A closed echo (e.g. `| head`) must not stop the VM.
            if echo.write_all(buf).and_then(|()| echo.flush()).is_err() {
                self.echo = None;
            }
        }
        for &b in buf {
            match b {
                b'\n' => self.end_line(),
                _ if self.partial.len() < MAX_LINE => self.partial.push(b),
                _ => {}
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::legacy::serial::SharedBuffer;

    #[test]
    fn keeps_the_last_lines_finds_the_panic_and_echoes() {
        let echo = SharedBuffer::new();
        let mut c = ConsoleLog::new(Some(Box::new(echo.clone())));
        for i in 0..100 {
            writeln!(c, "line {i}\r").unwrap();
        }
        write!(c, "[    1.0] Kernel panic - not syncing: Attempted to kill init!\npartial").unwrap();
        let text = c.tail();
        assert!(!text.contains("line 59\n"), "{text}");
        assert!(text.contains("line 99") && text.ends_with("  | partial"), "{text}");
        assert!(!text.contains('\r'));
        assert_eq!(c.panic_line(), Some("[    1.0] Kernel panic - not syncing: Attempted to kill init!"));
        let mut copied = Vec::new();
        echo.drain_to(&mut copied).unwrap();
        assert!(copied.starts_with(b"line 0\r\n") && copied.ends_with(b"partial"));
        assert!(ConsoleLog::new(None).tail().contains("printed nothing"));
        assert_eq!(ConsoleLog::new(None).panic_line(), None);
    }
}
