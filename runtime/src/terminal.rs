//! Terminals and consoles, in one place: the container's pty (opened by its init in the
//! container's devpts), the console socket that carries the pty master to whoever asked for a
//! terminal (`--console-socket`, as runc), window sizes, and the caller's side (a console
//! socket of its own, and the proxy between its stdio and the master, stdin in raw mode).

use std::io::{IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::sys::stat::Mode;

/// A new pty: the master and the path of its slave.
pub struct Pty {
    pub master: OwnedFd,
    pub slave_path: PathBuf,
}

/// Opens a pty in the devpts mounted at /dev/pts (the container's, in its init).
pub fn open_pty() -> nix::Result<Pty> {
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let slave_path = PathBuf::from(ptsname_r(&master)?);
    Ok(Pty { master: master.into(), slave_path })
}

/// Opens the slave of a pty.
pub fn open_slave(path: &Path) -> nix::Result<OwnedFd> {
    nix::fcntl::open(path, OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC, Mode::empty())
}

/// Sets a terminal's window size.
pub fn set_size(fd: RawFd, rows: u16, cols: u16) -> nix::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a winsize from the valid pointer given.
    Errno::result(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// A terminal's window size as (rows, columns); `None` when `fd` is not a terminal.
pub fn size(fd: RawFd) -> Option<(u16, u16)> {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes a winsize into the valid pointer given.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0).then_some((ws.ws_row, ws.ws_col))
}

/// The size of our own terminal: stdin's, or stdout's when stdin is not one (`exec -t` with
/// its input redirected); `None` when neither is a terminal.
pub fn our_size() -> Option<(u16, u16)> {
    size(libc::STDIN_FILENO).or_else(|| size(libc::STDOUT_FILENO))
}

/// Makes the terminal `fd` the controlling terminal of this process (a session leader).
pub fn make_controlling(fd: RawFd) -> nix::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal it from another session).
    Errno::result(unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) }).map(drop)
}

/// Connects to a console socket (a unix stream socket listening at `path`).
pub fn connect_socket(path: &Path) -> nix::Result<OwnedFd> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType};
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(fd)
}

/// Sends `fd` over the unix socket `sock` with SCM_RIGHTS, `payload` as the message (runc
/// sends the slave's path).
pub fn send_fd(sock: RawFd, fd: RawFd, payload: &[u8]) -> nix::Result<()> {
    let iov = [IoSlice::new(payload)];
    let fds = [fd];
    sendmsg::<UnixAddr>(sock, &iov, &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None).map(drop)
}

/// Receives the descriptor sent with [`send_fd`] on the connected socket `conn`.
pub fn receive_fd(conn: RawFd) -> std::io::Result<OwnedFd> {
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<UnixAddr>(conn, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: SCM_RIGHTS just installed this descriptor in our table; nothing else
                // owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(std::io::Error::other("no descriptor received on the console socket"))
}

/// A console socket of the caller's own, for a foreground run or exec that needs a terminal
/// and was given no `--console-socket` (runc does the same); removed when dropped.
pub struct ConsoleSocket {
    pub path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    /// Listens on a new socket in the temp directory.
    pub fn listen() -> std::io::Result<ConsoleSocket> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!("twinbox-console-{}-{nanos}.sock", std::process::id()));
        let listener = UnixListener::bind(&path)?;
        Ok(ConsoleSocket { path, listener })
    }

    /// The pty master the container's init (or exec'd process) sent.
    pub fn receive(&self) -> std::io::Result<OwnedFd> {
        let (conn, _) = self.listener.accept()?;
        receive_fd(conn.as_raw_fd())
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Copies between this process's stdio and a pty master, stdin in raw mode while it runs.
/// Dropping it (on any path, [`finish`](Self::finish) included) gives our terminal back its
/// modes.
pub struct ConsoleProxy {
    master: Arc<std::fs::File>,
    saved: Option<nix::sys::termios::Termios>,
    output: Option<std::thread::JoinHandle<()>>,
}

impl ConsoleProxy {
    /// Starts copying both ways, with the pty given our terminal's size.
    pub fn start(master: OwnedFd) -> ConsoleProxy {
        Self::with_input(master, true)
    }

    /// Starts copying the pty's output only: the pty gets no input from us and our terminal
    /// keeps its modes (Docker's `exec -t` without `-i`).
    pub fn output_only(master: OwnedFd) -> ConsoleProxy {
        Self::with_input(master, false)
    }

    fn with_input(master: OwnedFd, input: bool) -> ConsoleProxy {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let master = Arc::new(std::fs::File::from(master));
        let stdin = std::io::stdin();
        let saved = if input { tcgetattr(&stdin).ok() } else { None };
        if let Some(t) = &saved {
            let mut raw = t.clone();
            cfmakeraw(&mut raw);
            let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        }
        let m = Arc::clone(&master);
        let output = std::thread::spawn(move || {
            let mut out = std::io::stdout();
            // Ends with EIO once every slave descriptor is closed.
            let _ = std::io::copy(&mut &*m, &mut out);
            let _ = out.flush();
        });
        if input {
            let m = Arc::clone(&master);
            // Not joined: it is blocked reading our stdin when the process ends.
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin(), &mut &*m);
            });
        }
        let proxy = ConsoleProxy { master, saved, output: Some(output) };
        proxy.resize();
        proxy
    }

    /// Gives the pty our terminal's size ([`our_size`]; on start and on SIGWINCH).
    pub fn resize(&self) {
        if let Some((rows, cols)) = our_size() {
            let _ = set_size(self.master.as_raw_fd(), rows, cols);
        }
    }

    /// Drains the output, then restores the terminal.
    pub fn finish(mut self) {
        if let Some(output) = self.output.take() {
            let _ = output.join();
        }
    }

    /// [`finish`](Self::finish) for a process that has ended but whose children may keep the
    /// pty open (an exec's `cmd &`): what it wrote is drained for at most `grace`, then the
    /// copier is left behind instead of waiting for them (as `docker exec -t` returns).
    pub fn finish_within(mut self, grace: std::time::Duration) {
        if let Some(output) = self.output.take() {
            let deadline = std::time::Instant::now() + grace;
            while !output.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if output.is_finished() {
                let _ = output.join();
            }
        }
    }
}

impl Drop for ConsoleProxy {
    fn drop(&mut self) {
        if let Some(t) = self.saved.take() {
            let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pty_master_travels_over_a_console_socket_with_its_size() {
        let Ok(pty) = open_pty() else {
            eprintln!("SKIPPED: no /dev/ptmx here");
            return;
        };
        set_size(pty.master.as_raw_fd(), 33, 120).unwrap();
        let sock = ConsoleSocket::listen().unwrap();
        let path = sock.path.clone();
        let sender = std::thread::spawn(move || {
            let conn = connect_socket(&path).unwrap();
            send_fd(conn.as_raw_fd(), pty.master.as_raw_fd(), pty.slave_path.to_string_lossy().as_bytes()).unwrap();
            pty.slave_path
        });
        let master = sock.receive().unwrap();
        let slave_path = sender.join().unwrap();
        assert_eq!(size(master.as_raw_fd()), Some((33, 120)), "the same pty");
        let slave = open_slave(&slave_path).unwrap();
        assert_eq!(size(slave.as_raw_fd()), Some((33, 120)));
        let path = sock.path.clone();
        drop(sock);
        assert!(!path.exists(), "the socket file goes with it");
        assert_eq!(size(libc::STDIN_FILENO).is_some(), std::io::IsTerminal::is_terminal(&std::io::stdin()));
    }
}
