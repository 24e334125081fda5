//! Network namespace set-up. For now: bring the loopback interface up in a new network
//! namespace (a fresh namespace has `lo` down). Bridges and veth pairs would go here.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use twinbox_exit::ExitCode;

/// Errors of network set-up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("opening a socket for interface ioctls")]
    Socket(#[source] Errno),
    #[error("interface name {0:?} is too long")]
    Name(String),
    #[error("reading flags of {name}")]
    GetFlags {
        name: String,
        #[source]
        source: Errno,
    },
    #[error("bringing {name} up")]
    SetFlags {
        name: String,
        #[source]
        source: Errno,
    },
}

impl ExitCode for NetworkError {
    fn exit_code(&self) -> i32 {
        match self {
            NetworkError::Name(_) => twinbox_exit::USER_ERROR,
            NetworkError::Socket(_) | NetworkError::GetFlags { .. } | NetworkError::SetFlags { .. } => {
                twinbox_exit::INTERNAL
            }
        }
    }
}

/// Bring `lo` up.
pub fn loopback_up() -> Result<(), NetworkError> {
    interface_up("lo")
}

/// Set IFF_UP on an interface with SIOCGIFFLAGS/SIOCSIFFLAGS.
pub fn interface_up(name: &str) -> Result<(), NetworkError> {
    let sock: OwnedFd =
        socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).map_err(NetworkError::Socket)?;
    let mut req = ifreq_for(name)?;
    // SAFETY: `req` is a properly initialised ifreq with a NUL-terminated name; SIOCGIFFLAGS
    // writes only the flags member of that struct.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    Errno::result(r).map_err(|source| NetworkError::GetFlags { name: name.to_string(), source })?;
    // SAFETY: the kernel filled ifru_flags above; reading and updating that union member is
    // how this ioctl pair is used.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    // SAFETY: as above; SIOCSIFFLAGS reads the name and flags from `req`.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    Errno::result(r).map_err(|source| NetworkError::SetFlags { name: name.to_string(), source })?;
    Ok(())
}

fn ifreq_for(name: &str) -> Result<libc::ifreq, NetworkError> {
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(NetworkError::Name(name.to_string()));
    }
    // SAFETY: ifreq is plain old data (a name array and a union of integers/sockaddrs); all
    // zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_long_names() {
        assert!(matches!(ifreq_for("a-very-long-interface-name"), Err(NetworkError::Name(_))));
        let r = ifreq_for("lo").unwrap();
        assert_eq!(r.ifr_name[0] as u8, b'l');
        assert_eq!(r.ifr_name[2], 0);
    }
}
